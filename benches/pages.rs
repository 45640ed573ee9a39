//! `make bench`: what the page store writes and keeps, each figure beside its baseline.
//!
//! - Bytes a turn of about 64 new tokens writes (pages + manifest) at 512, 2k and 4k tokens of
//!   history, against the whole state (what every save wrote before pages) and against the
//!   floor: the new tokens' own K and V rows.
//! - 16 conversations of one owner with the same ~1,500-token system prompt and different
//!   questions: bytes stored, against 16 whole snapshots and against one snapshot plus each
//!   other conversation's unique tokens; and where sharing stops.
//! - The decode stall: time between tokens of a generating conversation while three others
//!   (2k-token histories) take short turns that each end in a save, against the same run with
//!   saves off (`--persist shutdown`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Daemon, long_prose};
use kvsnap::snapshot::manifest::Manifest;
use kvsnap::store::{SessionStore, Store};
use serde_json::json;
use uuid::Uuid;

const ARGS: [&str; 6] = ["-c", "16384", "-np", "2", "-t", "2"];
const HISTORIES: [usize; 3] = [512, 2048, 4096];

/// A prose prompt of about `tokens` tokens (this prose is ~1.1 tokens a word).
fn history(tokens: usize) -> String {
    long_prose(tokens * 10 / 11).trim_end().to_string()
}

async fn written(d: &Daemon) -> u64 {
    (d.metric("kvsnap_page_bytes_written_total").await
        + d.metric("kvsnap_manifest_bytes_written_total").await) as u64
}

/// Bytes of one position's rows across every cache and layer (K and V).
fn row_bytes(manifest: &Manifest) -> u64 {
    manifest
        .layout
        .caches
        .iter()
        .flat_map(|c| &c.layers)
        .map(|l| l.k_row_size + l.v_cell_size)
        .sum()
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

#[tokio::main]
async fn main() {
    println!(
        "kvsnap page store benchmark; model {}",
        common::model_path().display()
    );
    println!("daemon: {}", ARGS.join(" "));
    // `cargo bench --bench pages -- stall` runs one part; no names run them all.
    let only: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |part: &str| only.is_empty() || only.iter().any(|o| o == part);
    if wanted("turns") {
        turn_bytes().await;
    }
    if wanted("dedup") {
        dedup().await;
    }
    if wanted("stall") {
        stall().await;
    }
}

/// Gaps between a streamed generation's tokens, in ms, while `savers` take turns.
async fn token_gaps(persist: &str) -> Vec<f64> {
    let mut args = ARGS.to_vec();
    args[3] = "4";
    args.extend(["--persist", persist]);
    let d = Daemon::start(&args);
    let histories: Vec<(String, String)> = (0..3)
        .map(|i| {
            (
                Uuid::new_v4().to_string(),
                format!("Saver {i}. {}", history(2000)),
            )
        })
        .collect();
    for (session, prompt) in &histories {
        d.ok(
            "/completion",
            json!({"prompt": prompt, "session_id": session,
                                   "n_predict": 1, "temperature": 0}),
        )
        .await;
    }
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut savers = Vec::new();
    for (session, prompt) in histories {
        let (client, url, done) = (d.client.clone(), d.url("/completion"), done.clone());
        savers.push(tokio::spawn(async move {
            let mut prompt = prompt;
            let mut turns = 0;
            let mut busy = 0.0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let started = std::time::Instant::now();
                let reply: serde_json::Value = client
                    .post(&url)
                    .json(&json!({"prompt": prompt, "session_id": session,
                                  "n_predict": 2, "temperature": 0}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                prompt.push_str(reply["content"].as_str().unwrap_or(""));
                prompt.push_str(" And");
                turns += 1;
                busy += started.elapsed().as_secs_f64();
                // The same load in both runs: a turn, then a pause, as a person would.
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            (turns, busy)
        }));
    }
    let mut response = d
        .client
        .post(d.url("/completion"))
        .json(
            &json!({"prompt": "Once upon a time", "n_predict": 160, "ignore_eos": true,
                      "stream": true, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    let mut arrivals = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        let now = std::time::Instant::now();
        let text = String::from_utf8_lossy(&chunk);
        for line in text.lines().filter(|l| l.starts_with("data:")) {
            if line.contains("\"content\"") {
                arrivals.push(now);
            }
        }
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut turns, mut busy) = (0, 0.0);
    for saver in savers {
        let (t, b) = saver.await.unwrap();
        turns += t;
        busy += b;
    }
    println!(
        "  ({persist}: {} tokens streamed while the others took {turns} turns, {:.0} ms each \
         to the reply's end)",
        arrivals.len(),
        busy * 1e3 / f64::from(turns.max(1))
    );
    arrivals
        .windows(2)
        .skip(1)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1e3)
        .collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn stall() {
    const ROUNDS: usize = 3;
    println!();
    println!("decode stall: ms between tokens of one generation while 3 conversations of 2k");
    println!("tokens take turns (a turn, a 250 ms pause, again; each turn saved), against the");
    println!("same with saves off; {ROUNDS} rounds, alternating");
    println!("{:>8} {:>22} {:>8} {:>8}", "round", "", "p50", "p99");
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let saving = token_gaps("turn").await;
        let off = token_gaps("shutdown").await;
        for (name, gaps) in [("saves every turn", &saving), ("saves off", &off)] {
            println!(
                "{round:>8} {name:>22} {:>8.1} {:>8.1}",
                percentile(gaps, 0.5),
                percentile(gaps, 0.99)
            );
        }
        ratios.push(percentile(&saving, 0.99) / percentile(&off, 0.99));
    }
    println!(
        "p99 ratio, median of {ROUNDS} rounds: {:.2} (rounds {}; target <= 1.2): saves are \
         paged and committed by the writer thread at a lower priority",
        percentile(&ratios, 0.5),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

async fn turn_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let d = Daemon::start_on(dir.path(), &data, &ARGS);
    let extra = " Then the keeper walked down to the harbour where the boats lay in rows and \
                 the nets dried in the wind, and he asked the oldest fisherman about the storm \
                 that had come in the night before the last market day of the year, and what \
                 the gulls had done when the sea rose over the quay and the bells rang.";
    let extra: Vec<i64> = d
        .ok("/tokenize", json!({"content": extra, "add_special": false}))
        .await["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect();
    // 1 pending token + 56 prompt tokens + 7 of the 8 generated (the last is not decoded yet):
    // exactly 64 new tokens in the cache.
    assert!(
        extra.len() >= 56,
        "the extra text is {} tokens",
        extra.len()
    );
    let extra = &extra[..56];
    let mut rows = Vec::new();
    for tokens in HISTORIES {
        let session = Uuid::new_v4().to_string();
        let first = d
            .ok(
                "/completion",
                json!({"prompt": history(tokens), "session_id": session,
                                      "n_predict": 8, "temperature": 0,
                                      "return_tokens": true}),
            )
            .await;
        let stored = d
            .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
            .await;
        let mut prompt: Vec<i64> = kvsnap::snapshot::Snapshot::decode(&stored)
            .unwrap()
            .tokens
            .iter()
            .map(|&t| i64::from(t))
            .collect();
        let before_tokens = prompt.len() as u64;
        prompt.push(
            first["tokens"]
                .as_array()
                .unwrap()
                .last()
                .unwrap()
                .as_i64()
                .unwrap(),
        );
        prompt.extend_from_slice(extra);
        let before = written(&d).await;
        let second = d
            .ok(
                "/v1/completions",
                json!({"prompt": prompt, "session_id": session,
                                          "max_tokens": 8, "temperature": 0}),
            )
            .await;
        assert_eq!(
            second["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap(),
            before_tokens,
            "the second turn continued from the cache"
        );
        let wrote = written(&d).await - before;
        let info = d.get_json(&format!("/v1/sessions/{session}")).await;
        let new_tokens = info["tokens"].as_u64().unwrap() - before_tokens;
        rows.push((
            session,
            before_tokens,
            new_tokens,
            wrote,
            info["bytes"].as_u64().unwrap(),
        ));
    }
    d.stop();
    let store = Store::open(&data).unwrap();
    println!();
    println!("a turn's save: page store bytes written vs the whole state and the floor");
    println!(
        "{:>8} {:>6} {:>12} {:>12} {:>8} {:>12} {:>8}",
        "history", "new", "written", "floor", "x floor", "whole state", "x whole"
    );
    for (session, history, new_tokens, wrote, whole) in rows {
        let manifest = Manifest::decode(
            &store
                .manifest(Uuid::parse_str(&session).unwrap())
                .unwrap()
                .unwrap(),
        )
        .unwrap();
        let floor = new_tokens * row_bytes(&manifest);
        println!(
            "{history:>8} {new_tokens:>6} {:>12} {:>12} {:>8.2} {:>12} {:>8.3}",
            mb(wrote),
            mb(floor),
            wrote as f64 / floor as f64,
            mb(whole),
            wrote as f64 / whole as f64
        );
    }
    println!("floor = the new tokens' own K and V rows (every layer, both caches).");
    println!("Target: written <= 2x floor + manifest at every history length.");
}

async fn dedup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let d = Daemon::start_on(dir.path(), &data, &ARGS);
    let system = history(1500);
    let topics = [
        "the harbour",
        "the chapel bell",
        "the fishing boats",
        "the storm",
        "the bread seller",
        "the gulls",
        "the salted cod",
        "the nets",
        "the quay",
        "the morning service",
        "the children",
        "the cold water",
        "the barrels",
        "the grey sky",
        "the old woman",
        "the market",
    ];
    let mut sessions = Vec::new();
    for topic in topics {
        let session = Uuid::new_v4();
        d.ok(
            "/completion",
            json!({"prompt": format!("{system}\nQuestion: tell me about {topic}.\nAnswer:"),
                   "session_id": session.to_string(), "n_predict": 16, "temperature": 0}),
        )
        .await;
        sessions.push(session);
    }
    d.stop();
    let store = Store::open(&data).unwrap();
    let stats = store.page_stats().unwrap();
    let mut whole_total = 0;
    let mut manifests = Vec::new();
    for id in &sessions {
        let record = store.record(*id).unwrap().unwrap();
        whole_total += record.bytes;
        let manifest = Manifest::decode(&store.manifest(*id).unwrap().unwrap()).unwrap();
        manifests.push((record, manifest));
    }
    let manifest_bytes: u64 = sessions
        .iter()
        .map(|id| store.manifest(*id).unwrap().unwrap().len() as u64)
        .sum();
    // The ideal: one whole snapshot, plus each other conversation's tokens after the prefix it
    // shares with the first.
    let (first_record, first) = &manifests[0];
    let per_token = row_bytes(first);
    let mut ideal = first_record.bytes;
    let mut shared_tokens = Vec::new();
    for (_, manifest) in &manifests[1..] {
        let common = first
            .tokens
            .iter()
            .zip(&manifest.tokens)
            .take_while(|(a, b)| a == b)
            .count() as u64;
        shared_tokens.push(common);
        ideal += (manifest.tokens.len() as u64 - common) * per_token;
    }
    // Where sharing stops: per cache, the last position of the pages both first conversations
    // reference.
    let second = &manifests[1].1;
    let mut stops = Vec::new();
    for (a, b) in first.state.caches.iter().zip(&second.state.caches) {
        let shared_end = a
            .pages
            .iter()
            .filter(|p| b.pages.iter().any(|q| q.id == p.id))
            .map(|p| p.end)
            .max()
            .unwrap_or(0);
        let first_position = a.positions.iter().min().copied().unwrap_or(0);
        stops.push((first_position, shared_end));
    }
    println!();
    println!("16 conversations, one owner, the same ~1,500-token system prompt:");
    println!(
        "  stored in pages        {:>12}  (pages {} + manifests {})",
        mb(stats.page_bytes + manifest_bytes),
        mb(stats.page_bytes),
        mb(manifest_bytes)
    );
    println!(
        "  16 whole snapshots     {:>12}  ({:.2}x the pages)",
        mb(whole_total),
        whole_total as f64 / (stats.page_bytes + manifest_bytes) as f64
    );
    println!(
        "  one snapshot + unique  {:>12}  (ideal; pages are {:.2}x it)",
        mb(ideal),
        (stats.page_bytes + manifest_bytes) as f64 / ideal as f64
    );
    println!(
        "  tokens in common with the first conversation: {:?}",
        shared_tokens.iter().min().zip(shared_tokens.iter().max())
    );
    for (cache, (from, end)) in stops.iter().enumerate() {
        println!(
            "  cache {cache}: holds positions from {from}; pages shared by the first two up to position {end}"
        );
    }
    println!(
        "  pages {} referenced {} times",
        stats.pages, stats.references
    );
}
