//! `make bench`: what chat frontends re-read (issue 30). Frontends send the whole history in
//! every request and name no conversation; this measures how much of it each server serves from
//! a cache, kvsnap beside llama-server (built from PyPI's llama-cpp-python sdist for the same
//! profile, `LLAMA_SERVER`), each server alone on the machine, in one run:
//!
//! 1. six new conversations, one after another, sharing a long system prompt (first turn
//!    each, a one-token reply: what is measured is the prompt, which is what is reused, not
//!    the reply every server generates alike): the median time of conversations 2-6 against
//!    the first's, and the tokens reused;
//! 2. eight users sharing that system prompt take turns on four sequences for three rounds:
//!    the share of rounds 2-3's prompt tokens served from a cache, and their median turn;
//! 3. a three-turn conversation, `kill -9`, a restart, a fourth turn: the share of the history
//!    restored, and that turn's time;
//! 4. (kvsnap) page bytes written per anonymous turn against the K/V rows the turn added.
//!
//! kvsnap runs twice: as it runs by default, and with `--keep-unnamed off` (what it did
//! before unnamed entries).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Daemon, long_prose};
use serde_json::{Value, json};

const SERVER_ARGS: [&str; 8] = ["-c", "16384", "-np", "4", "-t", "2", "-b", "2048"];
const USERS: usize = 8;
const ROUNDS: usize = 3;
const REPLY: u64 = 32;

/// A server under test.
struct Server {
    base: String,
    client: reqwest::Client,
    kvsnap: Option<Daemon>,
    _llama: Option<common::LlamaServer>,
}

/// Which server, and how to start it again on the same state.
#[derive(Clone)]
enum Kind {
    Kvsnap {
        extra: Vec<&'static str>,
        dir: std::path::PathBuf,
    },
    Llama(String),
}

impl Kind {
    fn name(&self) -> String {
        match self {
            Kind::Kvsnap { extra, .. } if extra.is_empty() => "kvsnap".into(),
            Kind::Kvsnap { extra, .. } => format!("kvsnap {}", extra.join(" ")),
            Kind::Llama(_) => "llama-server".into(),
        }
    }

    async fn start(&self) -> Server {
        match self {
            Kind::Kvsnap { extra, dir } => {
                let mut args: Vec<&str> = SERVER_ARGS.to_vec();
                args.extend(extra.iter().copied());
                let daemon = Daemon::start_on(dir, &dir.join("kvsnap.redb"), &args);
                Server {
                    base: daemon.base.clone(),
                    client: reqwest::Client::new(),
                    kvsnap: Some(daemon),
                    _llama: None,
                }
            }
            Kind::Llama(path) => llama_server(path).await,
        }
    }
}

async fn llama_server(path: &str) -> Server {
    let llama = common::start_llama_server(path, &SERVER_ARGS).await;
    Server {
        base: llama.base.clone(),
        client: reqwest::Client::new(),
        kvsnap: None,
        _llama: Some(llama),
    }
}

/// One chat turn as a frontend sends it.
struct Turn {
    seconds: f64,
    prompt: u64,
    cached: u64,
    completion: u64,
}

impl Server {
    async fn chat(&self, messages: &mut Vec<Value>, line: &str) -> Turn {
        self.chat_with(messages, line, REPLY).await
    }

    /// `chat`, with a reply of at most `reply` tokens.
    async fn chat_with(&self, messages: &mut Vec<Value>, line: &str, reply: u64) -> Turn {
        messages.push(json!({"role": "user", "content": line}));
        let started = Instant::now();
        let answer: Value = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&json!({"messages": messages, "max_tokens": reply, "temperature": 0}))
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("json");
        let seconds = started.elapsed().as_secs_f64();
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{answer}"))
            .to_string();
        messages.push(json!({"role": "assistant", "content": content}));
        let usage = &answer["usage"];
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .or_else(|| answer["timings"]["cache_n"].as_u64())
            .unwrap_or(0);
        Turn {
            seconds,
            prompt: usage["prompt_tokens"].as_u64().unwrap_or(0),
            cached,
            completion: usage["completion_tokens"].as_u64().unwrap_or(0),
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        match &self.kvsnap {
            Some(d) => d.metric(name).await,
            None => 0.0,
        }
    }
}

fn system() -> Value {
    json!({"role": "system", "content": format!("You are the harbour's chronicler. {}", long_prose(1150))})
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What one server measured.
#[derive(Default)]
struct Figures {
    shared_ratio: f64,
    shared_reused: u64,
    users_cached_share: f64,
    users_median_turn: f64,
    restart_restored_share: f64,
    restart_turn: f64,
    bytes_per_turn: f64,
    rows_per_turn: f64,
}

async fn measure(kind: &Kind) -> Figures {
    let mut figures = Figures::default();

    // 1. New conversations sharing the system prompt.
    let server = kind.start().await;
    let mut times = Vec::new();
    for i in 0..6 {
        let mut messages = vec![system()];
        let turn = server
            .chat_with(
                &mut messages,
                &format!("Conversation {i}: what happened first?"),
                1,
            )
            .await;
        times.push(turn.seconds);
        if i > 0 {
            figures.shared_reused += turn.cached;
        }
    }
    figures.shared_ratio = median(times[1..].to_vec()) / times[0];
    drop(server);
    fresh_state(kind);

    // 2. Eight users on four sequences, three rounds.
    let server = kind.start().await;
    let per_token = kv_bytes_per_token(&server).await;
    let mut chats: Vec<Vec<Value>> = (0..USERS).map(|_| vec![system()]).collect();
    let (mut prompt, mut cached, mut turns, mut written, mut new_tokens) = (0, 0, vec![], 0.0, 0);
    for round in 0..ROUNDS {
        for (user, messages) in chats.iter_mut().enumerate() {
            let before = server.metric("kvsnap_page_bytes_written_total").await;
            let turn = server
                .chat(messages, &format!("User {user}, round {round}: and then?"))
                .await;
            if round > 0 {
                prompt += turn.prompt;
                cached += turn.cached;
                turns.push(turn.seconds);
                // Let the writer finish this turn's entry before it is counted.
                tokio::time::sleep(Duration::from_millis(300)).await;
                written += server.metric("kvsnap_page_bytes_written_total").await - before;
                new_tokens += turn.prompt - turn.cached + turn.completion;
            }
        }
    }
    figures.users_cached_share = cached as f64 / prompt as f64;
    figures.users_median_turn = median(turns.clone());
    figures.bytes_per_turn = written / turns.len() as f64;
    figures.rows_per_turn = per_token * new_tokens as f64 / turns.len() as f64;
    drop(server);
    fresh_state(kind);

    // 3. Three turns, kill -9, restart, a fourth.
    let server = kind.start().await;
    let mut messages = vec![system()];
    let mut history = 0;
    for line in ["What happened first?", "And then?", "Who was there?"] {
        let turn = server.chat(&mut messages, line).await;
        history = turn.prompt + turn.completion;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill_9(server);
    let server = kind.start().await;
    let turn = server.chat(&mut messages, "How did it end?").await;
    figures.restart_restored_share = turn.cached as f64 / history as f64;
    figures.restart_turn = turn.seconds;
    drop(server);
    fresh_state(kind);
    figures
}

/// Bytes of K/V rows one token adds, measured: a named conversation inside the window, its
/// stored snapshot's bytes per token (0 for llama-server, which keeps nothing).
async fn kv_bytes_per_token(server: &Server) -> f64 {
    let Some(d) = &server.kvsnap else {
        return 0.0;
    };
    let id = uuid::Uuid::new_v4().to_string();
    d.ok(
        "/completion",
        json!({"prompt": long_prose(250), "n_predict": 1, "session_id": id}),
    )
    .await;
    let info = d.get_ok_json(&format!("/v1/sessions/{id}")).await;
    info["bytes"].as_f64().unwrap() / info["tokens"].as_f64().unwrap()
}

fn kill_9(mut server: Server) {
    if let Some(d) = server.kvsnap.take() {
        d.kill_9();
    }
    drop(server._llama.take());
}

/// The next workload starts from an empty store.
fn fresh_state(kind: &Kind) {
    if let Kind::Kvsnap { dir, .. } = kind {
        let _ = std::fs::remove_file(dir.join("kvsnap.redb"));
    }
}

#[tokio::main]
async fn main() {
    println!(
        "kvsnap resume benchmark (issue 30), compute profile {}; servers: {}; model {}",
        kvsnap::compute::THIS_BUILD,
        SERVER_ARGS.join(" "),
        common::model_path().display()
    );
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut kinds = vec![
        Kind::Kvsnap {
            extra: vec![],
            dir: dirs[0].path().to_path_buf(),
        },
        Kind::Kvsnap {
            extra: vec!["--keep-unnamed", "off"],
            dir: dirs[1].path().to_path_buf(),
        },
    ];
    match std::env::var("LLAMA_SERVER") {
        Ok(path) => kinds.push(Kind::Llama(path)),
        Err(_) => {
            println!("LLAMA_SERVER is not set: run `make bench` to compare with llama-server")
        }
    }
    let mut results = Vec::new();
    for kind in &kinds {
        results.push((kind.name(), measure(kind).await));
    }
    println!();
    println!(
        "{:<28} {:>14} {:>12} {:>12} {:>12} {:>12}",
        "server", "shared: x cold", "reused tok", "8 users: %", "median turn", "restart: %"
    );
    for (name, f) in &results {
        println!(
            "{name:<28} {:>14.2} {:>12} {:>11.0}% {:>11.2}s {:>11.0}%",
            f.shared_ratio,
            f.shared_reused,
            100.0 * f.users_cached_share,
            f.users_median_turn,
            100.0 * f.restart_restored_share
        );
    }
    println!();
    for (name, f) in &results {
        println!(
            "{name}: turn after restart {:.2}s; page bytes written per turn {:.0} against {:.0} \
             bytes of new K/V rows ({:.2}x)",
            f.restart_turn,
            f.bytes_per_turn,
            f.rows_per_turn,
            if f.rows_per_turn > 0.0 {
                f.bytes_per_turn / f.rows_per_turn
            } else {
                0.0
            }
        );
    }
    println!();
    println!(
        "Targets (issue 30): shared prefix <= 0.05x of cold; 8 users >= 95% from a cache with \
         a median turn no slower than llama-server's; >= 95% restored after a restart; per \
         anonymous turn at most 2x its new rows."
    );
}
