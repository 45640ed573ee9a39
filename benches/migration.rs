//! `make bench`: migration throughput for 20 conversations of 2,048 tokens, beside a plain
//! HTTP upload of the same bytes in the same run.
//!
//! - migrate: `POST /admin/v1/migrate` on the source, timed until its job reports finished:
//!   each conversation read from the source's store, streamed with its checksum, verified and
//!   committed with fsync by the target, then deleted and forwarded at the source;
//! - plain upload: the same snapshot files PUT one after another to an HTTP sink in this
//!   process that reads and drops them (what the wire alone costs);
//! - verified upload: the same files PUT to the target's `/v1/sessions/{id}/snapshot` (the
//!   target's verify and fsync'd commit, without the protocol around them).
//!
//! All three move the files one at a time, as a migration job does.
//!
//! Then: the bytes a move sends when the target already holds the conversation's system
//! prompt, against one whose target holds nothing of it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use common::{Daemon, long_prose};
use futures::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

const CONVERSATIONS: usize = 20;
const HISTORY_TOKENS: usize = 2048;
const ROUNDS: usize = 3;
const ARGS: [&str; 8] = [
    "-c",
    "16384",
    "-np",
    "2",
    "-t",
    "2",
    "--admin-api-key",
    ADMIN,
];
/// Both daemons' admin key: migration routes need one on each side.
const ADMIN: &str = "bench-admin";

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// An HTTP server that reads every body and drops it.
async fn start_sink() -> String {
    let app = axum::Router::new().route(
        "/sink",
        axum::routing::put(|body: Body| async move {
            let mut stream = body.into_data_stream();
            let mut bytes = 0usize;
            while let Some(piece) = stream.next().await {
                bytes += piece.map(|p| p.len()).unwrap_or(0);
            }
            bytes.to_string()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// PUTs each file to `url_for(i)` in turn; returns the seconds taken.
async fn upload_all(
    client: &reqwest::Client,
    files: &[Vec<u8>],
    url_for: impl Fn(usize) -> String,
) -> f64 {
    let started = Instant::now();
    for (i, file) in files.iter().enumerate() {
        let response = client
            .put(url_for(i))
            .bearer_auth(ADMIN)
            .body(file.clone())
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }
    started.elapsed().as_secs_f64()
}

/// Stores `file` on `d` as `CONVERSATIONS` conversations; returns their ids.
async fn seed(d: &Daemon, file: &[u8]) -> Vec<String> {
    let ids: Vec<String> = (0..CONVERSATIONS)
        .map(|_| Uuid::new_v4().to_string())
        .collect();
    upload_all(&d.client, &vec![file.to_vec(); CONVERSATIONS], |i| {
        d.url(&format!("/v1/sessions/{}/snapshot", ids[i]))
    })
    .await;
    ids
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("bench dir on this disk");
    let mut target = Daemon::start_on(dir.path(), &dir.path().join("target.redb"), &ARGS);
    target.key = Some(ADMIN.into());
    let peer = target.base.clone();
    let peer_arg = format!("{peer}={ADMIN}");
    let mut source_args = ARGS.to_vec();
    source_args.extend(["--peer", &peer_arg]);
    let mut source = Daemon::start_on(dir.path(), &dir.path().join("source.redb"), &source_args);
    source.key = Some(ADMIN.into());
    let sink = start_sink().await;

    // One real conversation of 2,048 tokens; its snapshot file is the payload of all twenty.
    let session = Uuid::new_v4().to_string();
    let prompt = long_prose(HISTORY_TOKENS * 10 / 11);
    let first = source
        .ok(
            "/completion",
            json!({"prompt": prompt, "n_predict": 1, "temperature": 0, "session_id": session}),
        )
        .await;
    let tokens = first["tokens_evaluated"].as_u64().unwrap();
    let file = source
        .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
        .await;
    let total_bytes = (file.len() * CONVERSATIONS) as u64;
    println!(
        "kvsnap migration benchmark: {CONVERSATIONS} conversations of {tokens} tokens \
         ({:.1} MB each, {:.0} MB in all), median of {ROUNDS} rounds; daemons {}",
        file.len() as f64 / 1e6,
        total_bytes as f64 / 1e6,
        ARGS.join(" ")
    );

    let files = vec![file.clone(); CONVERSATIONS];
    let (mut migrations, mut plains, mut verifieds) = (Vec::new(), Vec::new(), Vec::new());
    let mut sent = Vec::new();
    for _ in 0..ROUNDS {
        // Plain upload of the same bytes to a sink.
        plains.push(upload_all(&source.client, &files, |_| format!("{sink}/sink")).await);
        // The same bytes, verified and committed by the target's upload route.
        let ids: Vec<String> = (0..CONVERSATIONS)
            .map(|_| Uuid::new_v4().to_string())
            .collect();
        verifieds.push(
            upload_all(&target.client, &files, |i| {
                target.url(&format!("/v1/sessions/{}/snapshot", ids[i]))
            })
            .await,
        );
        // The protocol.
        let ids = seed(&source, &file).await;
        let started = Instant::now();
        let (status, job) = source
            .post(
                "/admin/v1/migrate",
                json!({"target": peer, "sessions": ids}),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        let job_url = source.url(&format!(
            "/admin/v1/jobs/{}",
            job["job_id"].as_str().unwrap()
        ));
        let done: Value = loop {
            let status = source.get_json(&job_url.replace(&source.base, "")).await;
            if status["state"] == "finished" {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        migrations.push(started.elapsed().as_secs_f64());
        assert_eq!(done["sessions_moved"], json!(CONVERSATIONS), "{done}");
        // Twenty copies of one conversation of one owner: after the first, the target holds
        // every page, and only manifests travel.
        assert!(
            done["bytes_done"].as_u64().unwrap() <= total_bytes,
            "{done}"
        );
        sent.push(done["bytes_done"].as_u64().unwrap());
    }

    let row = |name: &str, seconds: f64| {
        println!(
            "{name:<16} {:>9.1} {:>9.1} {:>12.2} {:>9.2}",
            seconds * 1e3,
            total_bytes as f64 / 1e6 / seconds,
            CONVERSATIONS as f64 / seconds,
            seconds / median(plains.clone()),
        );
    };
    println!();
    println!(
        "{:<16} {:>9} {:>9} {:>12} {:>9}",
        "", "ms", "MB/s", "sessions/s", "vs plain"
    );
    row("plain upload", median(plains.clone()));
    row("verified upload", median(verifieds.clone()));
    row("migrate", median(migrations.clone()));
    println!();
    println!("plain upload = PUT of the same files to an HTTP sink that drops them; verified");
    println!("upload = PUT /v1/sessions/{{id}}/snapshot on the target (checks + fsync'd commit);");
    println!("migrate = POST /admin/v1/migrate until the job finished (store read, checksum,");
    println!("transfer, target verify + fsync'd commit, source delete + forward, one by one).");
    println!(
        "migrate sent {:.1} MB of the {:.0} MB (median): the twenty are copies of one \
         conversation, so the target lacks only the first one's pages.",
        median(sent.iter().map(|&b| b as f64).collect()) / 1e6,
        total_bytes as f64 / 1e6
    );

    // What a move sends when the target already holds the conversation's system prompt (in
    // another conversation of the same owner: pages are never shared across owners).
    println!();
    let system = format!("You are a careful assistant. {}", long_prose(1500));
    let question = format!(" Now the user asks: {}", long_prose(300));
    let greedy = |prompt: String, session: &str| json!({"prompt": prompt, "n_predict": 1, "temperature": 0, "session_id": session});
    let held = Uuid::new_v4().to_string();
    target
        .ok("/completion", greedy(system.clone(), &held))
        .await;
    println!(
        "{:<34} {:>9} {:>9} {:>7} {:>11}",
        "", "snapshot", "sent", "sent %", "pages held"
    );
    for (name, prompt) in [
        (
            "its system prompt held there",
            format!("{system}{question}"),
        ),
        (
            "nothing of it held there",
            format!("Another preamble. {system}{question}"),
        ),
    ] {
        let moving = Uuid::new_v4().to_string();
        source.ok("/completion", greedy(prompt, &moving)).await;
        let info = source.get_json(&format!("/v1/sessions/{moving}")).await;
        let snapshot = info["bytes"].as_u64().unwrap();
        let (status, report) = source
            .post(
                &format!("/admin/v1/sessions/{moving}/migrate"),
                json!({"target": peer}),
            )
            .await;
        assert_eq!(status, 200, "{report}");
        let bytes = report["bytes"].as_u64().unwrap();
        println!(
            "{name:<34} {:>8.1}M {:>8.1}M {:>6.0}% {:>5} of {:<4}",
            snapshot as f64 / 1e6,
            bytes as f64 / 1e6,
            100.0 * bytes as f64 / snapshot as f64,
            report["pages_held"],
            report["pages_held"].as_u64().unwrap() + report["pages_sent"].as_u64().unwrap()
        );
    }
    println!("(~1,830 tokens each; the system prompt is ~1,500 of them. Shared positions give");
    println!("identical pages only in the full-attention cache and only up to the last prefill");
    println!("micro-batch both evaluated alike; the sliding-window cache holds the last 512.)");
    target.stop();
    source.stop();
}
