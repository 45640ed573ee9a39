//! `make bench`: prefill and generation speed of kvsnap beside llama-server with 1, 4 and 8
//! users at once, same machine, same model, same run, both built for the same instruction set
//! (`make bench` runs this once per profile).
//!
//! llama-server (built by `make llama-server` from the llama.cpp sources in PyPI's
//! llama-cpp-python sdist) is the measuring stick; its path comes in `LLAMA_SERVER`. Each server
//! runs alone, with the same context, parallel sequences, threads and batch sizes, and flash
//! attention off on both (kvsnap's default). kvsnap is measured twice: as it runs by default (shared batches, exact) and with
//! `--shared-batches off` (each conversation decoded alone, the earlier default). Every figure
//! is the median of several rounds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Daemon, long_prose};
use serde_json::{Value, json};

const RUNS: usize = 3;
const GENERATED: usize = 64;
const FIGURES: usize = 6;
const SERVER_ARGS: [&str; 10] = [
    "-c", "16384", "-np", "8", "-t", "2", "-b", "2048", "-ub", "512",
];

/// A server under test: its base URL and what keeps it alive.
struct Server {
    base: String,
    client: reqwest::Client,
    _kvsnap: Option<Daemon>,
    _llama: Option<common::LlamaServer>,
}

impl Server {
    fn kvsnap(extra: &[&str]) -> Server {
        let mut args: Vec<&str> = SERVER_ARGS.to_vec();
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&args);
        Server {
            base: daemon.base.clone(),
            client: reqwest::Client::new(),
            _kvsnap: Some(daemon),
            _llama: None,
        }
    }

    async fn llama_server(path: &str) -> Server {
        let llama = common::start_llama_server(path, &SERVER_ARGS).await;
        Server {
            base: llama.base.clone(),
            client: reqwest::Client::new(),
            _kvsnap: None,
            _llama: Some(llama),
        }
    }

    async fn complete(&self, body: Value) -> Value {
        let response = self
            .client
            .post(format!("{}/completion", self.base))
            .json(&body)
            .send()
            .await
            .expect("request");
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.expect("json")
    }

    /// Aggregate prompt tokens per second over `prompts` evaluated at once.
    async fn prefill(&self, prompts: &[String]) -> f64 {
        let started = Instant::now();
        let replies = futures::future::join_all(prompts.iter().map(|p| {
            self.complete(json!({"prompt": p, "n_predict": 1, "cache_prompt": false,
                                 "temperature": 0}))
        }))
        .await;
        let tokens: u64 = replies
            .iter()
            .map(|r| r["timings"]["prompt_n"].as_u64().unwrap())
            .sum();
        tokens as f64 / started.elapsed().as_secs_f64()
    }

    /// Aggregate generated tokens per second over `n` conversations generating at once.
    async fn generate(&self, n: usize) -> f64 {
        let started = Instant::now();
        let replies = futures::future::join_all((0..n).map(|i| {
            self.complete(json!({"prompt": format!("Story {i}: once upon a time"),
                                 "n_predict": GENERATED, "ignore_eos": true,
                                 "cache_prompt": false, "temperature": 0}))
        }))
        .await;
        let tokens: u64 = replies
            .iter()
            .map(|r| r["timings"]["predicted_n"].as_u64().unwrap())
            .sum();
        tokens as f64 / started.elapsed().as_secs_f64()
    }

    /// One round of the figures, in table order.
    async fn round(&self, prompts: &[String]) -> [f64; FIGURES] {
        [
            self.prefill(&prompts[..1]).await,
            self.prefill(&prompts[..4]).await,
            self.prefill(&prompts[..8]).await,
            self.generate(1).await,
            self.generate(4).await,
            self.generate(8).await,
        ]
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let llama_path = std::env::var("LLAMA_SERVER").ok();
    println!(
        "kvsnap serving benchmark, compute profile {} (llama-server built for the same): {} \
         runs each, median; model {}",
        kvsnap::compute::THIS_BUILD,
        RUNS,
        common::model_path().display()
    );
    println!("servers: {}", SERVER_ARGS.join(" "));

    // All servers run at once and are measured round by round, so the machine's drift (these
    // machines are noisy) falls on each of them alike; each figure is the median of its rounds.
    let mut servers = vec![
        Server::kvsnap(&[]),
        Server::kvsnap(&["--shared-batches", "off"]),
    ];
    match &llama_path {
        Some(path) => servers.push(Server::llama_server(path).await),
        None => println!(
            "LLAMA_SERVER is not set: run `make bench` to build and compare with llama-server"
        ),
    }
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Document {i}. {}", long_prose(800 + 10 * i)))
        .collect();
    for server in &servers {
        // Warm-up: first-touch page faults and thread start-up are not what we measure.
        server.prefill(&prompts[..1]).await;
    }
    let mut rounds: Vec<Vec<[f64; FIGURES]>> = vec![Vec::new(); servers.len()];
    for _ in 0..RUNS {
        for (i, server) in servers.iter().enumerate() {
            rounds[i].push(server.round(&prompts).await);
        }
    }
    let medians: Vec<[f64; FIGURES]> = rounds
        .iter()
        .map(|r| std::array::from_fn(|f| median(r.iter().map(|x| x[f]).collect())))
        .collect();
    let exact = medians[0];
    let alone = medians[1];
    let llama = medians.get(2).copied();

    let names = [
        "prefill tok/s, 1 user",
        "prefill tok/s, 4 users",
        "prefill tok/s, 8 users",
        "generation tok/s, 1 user",
        "generation tok/s, 4 users",
        "generation tok/s, 8 users",
    ];
    println!();
    println!(
        "{:<28} {:>10} {:>14} {:>14} {:>8} {:>8}",
        "figure", "kvsnap", "kvsnap alone", "llama-server", "ratio", "alone"
    );
    for (i, name) in names.iter().enumerate() {
        let (baseline, ratio, ratio_alone) = match &llama {
            Some(l) => (
                format!("{:.1}", l[i]),
                format!("{:.2}", exact[i] / l[i]),
                format!("{:.2}", alone[i] / l[i]),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{name:<28} {:>10.1} {:>14.1} {baseline:>14} {ratio:>8} {ratio_alone:>8}",
            exact[i], alone[i]
        );
    }
    println!();
    println!(
        "ratio = kvsnap (default: shared batches of at most {} conversations, each exact) / \
         llama-server;",
        kvsnap::compute::EXACT_BATCH_ROWS
    );
    println!(
        "alone = kvsnap --shared-batches off (each conversation decoded alone) / llama-server. \
         Target at 4 users: ratio >= 0.90."
    );
}
