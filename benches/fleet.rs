//! `make bench`: the fleet tier against a real SeaweedFS, each figure beside its baseline.
//!
//! - Resume on instance B of a 2k-token conversation instance A saved (B fetches it from the
//!   bucket: a cold fetch, every page checked, then a restore), against B re-reading the same
//!   history from scratch. Target: at most 1/20.
//! - Upload: the bucket bytes per second of A's remote-sync saves (pages the bucket lacks, then
//!   the conversation object), against one plain PUT of the same number of bytes to the same
//!   bucket.
//!
//! The instances run one after the other, each with both cores.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::weed::Weed;
use common::{Daemon, first_token, long_prose};
use object_store::ObjectStoreExt;
use serde_json::json;
use uuid::Uuid;

const ROUNDS: usize = 3;
/// Leases of 1 s: B takes A's conversations over soon after A stops.
const ARGS: [&str; 8] = ["-c", "8192", "-np", "2", "-t", "2", "--lease-seconds", "1"];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn member(weed: &Weed, dir: &std::path::Path, durability: &str) -> Daemon {
    let url = weed.url("bench");
    let mut args = ARGS.to_vec();
    args.extend(["--remote", &url, "--remote-durability", durability]);
    Daemon::start_with_env(dir, &dir.join("kvsnap.redb"), &args, &weed.env())
}

#[tokio::main]
async fn main() {
    println!(
        "kvsnap fleet benchmark: SeaweedFS on loopback; daemon {}; medians of {ROUNDS}",
        ARGS.join(" ")
    );
    let weed = Weed::start("kvsnap-bench").await;
    let history = long_prose(1820).trim_end().to_string();
    let prompts: Vec<(String, String)> = (0..ROUNDS)
        .map(|i| {
            (
                Uuid::new_v4().to_string(),
                format!("Conversation {i}. {history}"),
            )
        })
        .collect();

    // A fresh SeaweedFS grows its first volumes on the first writes (measured: an upload
    // 10x slower than the next); both sides are measured after that has happened.
    let objects = weed.objects();
    for i in 0..64 {
        let path = object_store::path::Path::from(format!("warm-up/{i}"));
        objects
            .put(&path, vec![i as u8; 256 << 10].into())
            .await
            .unwrap();
    }

    // A: each conversation's first turn, saved to the bucket before its reply ends.
    let a_dir = tempfile::tempdir().unwrap();
    let a = member(&weed, a_dir.path(), "remote-sync");
    let mut tokens = 0;
    for (session, prompt) in &prompts {
        let reply = a
            .ok(
                "/completion",
                json!({"prompt": prompt, "session_id": session, "n_predict": 1,
                       "temperature": 0}),
            )
            .await;
        tokens = reply["tokens_evaluated"].as_u64().unwrap_or(0);
    }
    let uploaded = a.metric("kvsnap_remote_page_bytes_uploaded_total").await;
    let pages = a.metric("kvsnap_remote_pages_uploaded_total").await;
    let (upload_seconds, uploads) = (
        a.metric("kvsnap_remote_upload_seconds_sum").await,
        a.metric("kvsnap_remote_upload_seconds_count").await,
    );
    drop(a);

    // The same number of bytes as one upload, as one plain PUT.
    let per_upload = (uploaded / uploads.max(1.0)) as usize;
    let mut plain = Vec::new();
    for i in 0..ROUNDS {
        let bytes: Vec<u8> = (0..per_upload).map(|b| (b * 31 + i) as u8).collect();
        let path = object_store::path::Path::from(format!("plain/{i}"));
        let started = Instant::now();
        objects.put(&path, bytes.into()).await.unwrap();
        plain.push(per_upload as f64 / started.elapsed().as_secs_f64() / 1e6);
    }

    // The same bytes as plain PUTs of objects of the pages' size, as many at once as kvsnap.
    let per_page = (uploaded / pages.max(1.0)) as usize;
    let pages_per_upload = (pages / uploads.max(1.0)).round() as usize;
    let mut plain_pages = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        futures::future::try_join_all((0..pages_per_upload).map(|i| {
            let bytes: Vec<u8> = (0..per_page).map(|b| (b * 7 + i + round) as u8).collect();
            let path = object_store::path::Path::from(format!("plain/{round}/{i}"));
            let objects = &objects;
            async move { objects.put(&path, bytes.into()).await }
        }))
        .await
        .unwrap();
        plain_pages
            .push((per_page * pages_per_upload) as f64 / started.elapsed().as_secs_f64() / 1e6);
    }

    // B: a new instance that has none of them (A's leases have run out).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = member(&weed, b_dir.path(), "async");
    let (mut resumed, mut reread) = (Vec::new(), Vec::new());
    for (session, prompt) in &prompts {
        let next = format!("{prompt} And then");
        let (seconds, _) = first_token(
            &b,
            json!({"prompt": next, "session_id": session, "n_predict": 2, "temperature": 0}),
        )
        .await;
        resumed.push(seconds);
        let fresh = Uuid::new_v4().to_string();
        let (seconds, _) = first_token(
            &b,
            json!({"prompt": next, "session_id": fresh, "n_predict": 2, "temperature": 0}),
        )
        .await;
        reread.push(seconds);
    }
    let fetches = b.metric("kvsnap_remote_fetches_total").await;
    assert_eq!(
        fetches as usize, ROUNDS,
        "every resume fetched from the bucket"
    );

    println!();
    println!(" tokens | re-read ms | resume on B ms (cold fetch) | ratio");
    println!(
        " {tokens:>6} | {:>10.1} | {:>27.1} | 1/{:.0}",
        median(reread.clone()) * 1e3,
        median(resumed.clone()) * 1e3,
        median(reread) / median(resumed)
    );
    println!("Target: resume <= 1/20 of re-read at 2,048 tokens.");
    println!();
    println!(
        " upload: {:.1} MB per save ({} saves), {:.0} MB/s; one plain PUT of as many bytes: \
         {:.0} MB/s ({:.2}x)",
        per_upload as f64 / 1e6,
        uploads,
        uploaded / upload_seconds / 1e6,
        median(plain.clone()),
        (uploaded / upload_seconds / 1e6) / median(plain)
    );
    println!(
        " plain PUTs of {pages_per_upload} objects of {:.2} MB each, all at once: {:.0} MB/s",
        per_page as f64 / 1e6,
        median(plain_pages)
    );
    println!("upload = pages the bucket lacks (HEAD, then PUT If-None-Match, 16 at once) and the");
    println!("conversation object (PUT If-Match), timed inside the daemon.");
}
