//! `--sleep-idle-seconds` on the real model: the idle daemon saves everything, unloads the
//! model (its memory is given back), answers read-only routes asleep, and the next turn of
//! every conversation, named or not, continues exactly as on a daemon that never slept; a
//! token count wakes it, as llama-server's does.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, long_prose};
use serde_json::{Value, json};

const ARGS: [&str; 4] = ["-c", "8192", "-np", "2"];

/// A conversation's two turns: the first's prompt, and the request shape of both.
struct Script {
    history: String,
    first: Value,
    second: Value,
    /// Named by a session id, or found again by its tokens.
    named: bool,
}

fn scripts() -> Vec<Script> {
    vec![
        // Past Gemma's 512-token window, with temperature: the conversation's own stream.
        Script {
            history: long_prose(560),
            first: json!({"n_predict": 12, "temperature": 0.8, "seed": 5}),
            second: json!({"n_predict": 12, "temperature": 0.8}),
            named: true,
        },
        Script {
            history: "The old lighthouse keeper climbed the stairs and".into(),
            first: json!({"n_predict": 12, "temperature": 0}),
            second: json!({"n_predict": 12, "temperature": 0}),
            named: true,
        },
        // No session id: kept as an unnamed entry when the daemon falls asleep.
        Script {
            history: long_prose(300),
            first: json!({"n_predict": 10, "temperature": 0}),
            second: json!({"n_predict": 10, "temperature": 0}),
            named: false,
        },
    ]
}

fn request(shape: &Value, prompt: String, session: Option<&str>) -> Value {
    let mut body = shape.clone();
    body["prompt"] = json!(prompt);
    body["return_tokens"] = json!(true);
    if let Some(id) = session {
        body["session_id"] = json!(id);
    }
    body
}

/// Every script's first turn; the sessions named.
async fn first_turns(daemon: &Daemon) -> Vec<(Option<String>, Value)> {
    let mut turns = Vec::new();
    for script in scripts() {
        let session = script.named.then(|| uuid::Uuid::new_v4().to_string());
        let reply = daemon
            .ok(
                "/completion",
                request(&script.first, script.history.clone(), session.as_deref()),
            )
            .await;
        turns.push((session, reply));
    }
    turns
}

/// Every script's second turn, continuing its first's text.
async fn second_turns(daemon: &Daemon, firsts: &[(Option<String>, Value)]) -> Vec<Value> {
    let mut replies = Vec::new();
    for (script, (session, first)) in scripts().iter().zip(firsts) {
        let prompt = format!(
            "{}{} And then",
            script.history,
            first["content"].as_str().expect("content")
        );
        let body = request(&script.second, prompt, session.as_deref());
        replies.push(daemon.ok("/completion", body).await);
    }
    replies
}

async fn is_sleeping(daemon: &Daemon) -> bool {
    daemon.get_ok_json("/props").await["is_sleeping"] == true
}

/// The daemon's resident memory, from the kernel.
fn resident_bytes(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kib * 1024
}

#[tokio::test]
async fn sleeping_frees_the_model_and_every_conversation_resumes_exactly() {
    let awake_throughout = Daemon::start(&ARGS);
    let firsts = first_turns(&awake_throughout).await;
    let expected = second_turns(&awake_throughout, &firsts).await;
    drop(awake_throughout);

    let mut args = ARGS.to_vec();
    args.extend(["--sleep-idle-seconds", "1"]);
    let daemon = Daemon::start(&args);
    let sleepers = first_turns(&daemon).await;
    for ((_, mine), (_, theirs)) in sleepers.iter().zip(&firsts) {
        assert_eq!(mine["tokens"], theirs["tokens"]);
        assert_eq!(mine["content"], theirs["content"]);
    }
    let awake_bytes = resident_bytes(&daemon);
    wait_for_sleep(&daemon).await;
    let asleep_bytes = resident_bytes(&daemon);
    eprintln!(
        "resident memory: {} MiB awake, {} MiB asleep",
        awake_bytes >> 20,
        asleep_bytes >> 20
    );
    // Gemma 3 270M's weights alone are 253 MB.
    assert!(
        awake_bytes.saturating_sub(asleep_bytes) > 150 << 20,
        "sleeping gave back too little: {awake_bytes} B awake, {asleep_bytes} B asleep"
    );

    // Read-only routes answer without waking it.
    assert_eq!(daemon.get_ok_json("/health").await["status"], "ok");
    assert!(daemon.get_ok_json("/v1/models").await["data"][0]["id"].is_string());
    assert_eq!(daemon.metric("kvsnap_asleep").await, 1.0);
    let listed = daemon.get_ok_json("/v1/sessions").await;
    assert!(
        listed["data"].as_array().is_some_and(|l| l.len() == 2),
        "{listed}"
    );
    // Describing a conversation reads it from the store: nothing is resident asleep.
    for (session, first) in sleepers.iter().filter_map(|(s, f)| Some((s.as_ref()?, f))) {
        let info = daemon.get_ok_json(&format!("/v1/sessions/{session}")).await;
        let read = first["timings"]["prompt_n"].as_u64().unwrap()
            + first["timings"]["cache_n"].as_u64().unwrap();
        assert!(info["tokens"].as_u64() >= Some(read), "{info}");
    }
    assert!(is_sleeping(&daemon).await, "a read-only route woke it");

    // The next turns wake it, and each continues exactly, reading its history from the store.
    let seconds = second_turns(&daemon, &sleepers).await;
    for (index, script) in scripts().iter().enumerate() {
        let (mine, theirs) = (&seconds[index], &expected[index]);
        assert_eq!(mine["tokens"], theirs["tokens"], "script {index}");
        assert_eq!(mine["content"], theirs["content"], "script {index}");
        let cached = mine["timings"]["cache_n"].as_u64().unwrap_or(0);
        if script.named {
            // All the history it held awake, restored from its stored state.
            assert_eq!(
                mine["timings"]["cache_n"], theirs["timings"]["cache_n"],
                "script {index}"
            );
        } else {
            // An unnamed entry is found at a multiple of 64 tokens.
            assert!(
                cached >= 64,
                "script {index} read its history again: {mine}"
            );
        }
    }
    assert!(!is_sleeping(&daemon).await);
    // The throughput gauges cover the time between two scrapes, as llama-server's do: the
    // turns above show in the first scrape after them, and nothing runs while asleep.
    assert!(daemon.metric("llamacpp:predicted_tokens_seconds").await > 0.0);
    assert!(daemon.metric("kvsnap_wakes_total").await >= 1.0);
    wait_for_sleep(&daemon).await;
    assert_eq!(
        daemon.metric("llamacpp:predicted_tokens_seconds").await,
        0.0
    );
    // Counting tokens wakes it: a turn usually follows.
    let counted = daemon
        .ok(
            "/v1/messages/count_tokens",
            json!({"messages": [{"role": "user", "content": "Hello world"}]}),
        )
        .await;
    assert!(counted["input_tokens"].as_u64() > Some(0), "{counted}");
    assert!(
        !is_sleeping(&daemon).await,
        "counting tokens did not wake it"
    );
    wait_for_sleep(&daemon).await;
    daemon.ok("/tokenize", json!({"content": "Hello"})).await;
    assert!(!is_sleeping(&daemon).await, "tokenizing did not wake it");
    assert_eq!(
        daemon.metric("llamacpp:predicted_tokens_seconds").await,
        0.0
    );
}

async fn wait_for_sleep(daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_sleeping(daemon).await {
        assert!(
            Instant::now() < deadline,
            "still awake 30 s after the last request"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
