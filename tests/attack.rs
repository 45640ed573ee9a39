//! The attack campaign (`make attack`; ignored by `make test`): a legitimate user chats (stop
//! strings, seeds, explicit saves) while hostile clients run everything issue 33 found, at once,
//! for a bounded time, and the daemon is `kill -9`'d at random moments. Printed against a quiet
//! run of the same user:
//!
//! - the legitimate user's acknowledged turns lost after a restart (target 0);
//! - cross-key reads: another key shown any of the user's conversations, slots or cached
//!   prompts (target 0);
//! - daemon crashes: exits nobody asked for (target 0);
//! - store growth from unauthenticated requests, measured on an otherwise idle daemon (0 bytes);
//! - resident memory peak (VmHWM), against the quiet run's and the configured bound;
//! - the legitimate user's p99 time between streamed tokens (at most 2x the quiet run's).
//!
//! `KVSNAP_ATTACK_ROUNDS` (default 4) rounds of `KVSNAP_ATTACK_SECONDS` (default 40) each.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Dice};
use serde_json::{Value, json};
use uuid::Uuid;

const USER: &str = "legitimate-user-key";
const HOSTILE: &str = "hostile-user-key";
const ADMIN: &str = "admin-key";
/// Prompts only the legitimate user sends: another key must never be served them from a cache.
const SECRET: &str = "Private notes of the legitimate user, never to be seen by anyone else: ";

fn args(slot_dir: &str) -> Vec<String> {
    [
        "-c",
        "4096",
        "-np",
        "2",
        "-t",
        "1",
        "--api-key",
        &format!("{USER},{HOSTILE}"),
        "--admin-api-key",
        ADMIN,
        "--slot-save-path",
        slot_dir,
        "--shutdown-grace",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What the legitimate user holds: each conversation's id and the tokens its last
/// acknowledged turn left stored.
#[derive(Default)]
struct Ledger {
    acknowledged: Vec<(String, u64)>,
    turns: u64,
    gaps_ms: Vec<f64>,
}

/// The legitimate user: streamed turns on a few conversations (some end on a stop string, some
/// are seeded, some saved explicitly), and anonymous turns that start with `SECRET`.
async fn legitimate_user(base: String, until: Instant, ledger: Arc<Mutex<Ledger>>, seed: u64) {
    let client = reqwest::Client::new();
    let mut dice = Dice::seeded(seed);
    let sessions: Vec<String> = (0..3).map(|_| Uuid::new_v4().to_string()).collect();
    let mut texts: Vec<String> = sessions
        .iter()
        .enumerate()
        .map(|(i, _)| format!("Conversation {i}. {}", common::long_prose(40)))
        .collect();
    while Instant::now() < until {
        let which = dice.below(4) as usize;
        let anonymous = which == 3;
        let mut body = json!({"n_predict": 24, "stream": true, "temperature": 0.7});
        if anonymous {
            body["prompt"] = json!(format!("{SECRET}{}", common::long_prose(30)));
        } else {
            body["prompt"] = json!(texts[which]);
            body["session_id"] = json!(sessions[which]);
        }
        if dice.chance(40) {
            body["stop"] = json!(["."]);
        }
        if dice.chance(30) {
            body["seed"] = json!(dice.below(1000));
        }
        let started = Instant::now();
        let Ok(response) = client
            .post(format!("{base}/completion"))
            .bearer_auth(USER)
            .json(&body)
            .send()
            .await
        else {
            return; // the daemon was killed
        };
        if response.status() != 200 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let mut stream = response.bytes_stream();
        let mut last = started;
        let mut gaps = Vec::new();
        let mut buffer = String::new();
        let mut done: Option<Value> = None;
        let mut content = String::new();
        use futures::StreamExt;
        while let Some(chunk) = stream.next().await {
            let Ok(chunk) = chunk else { break };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                let Ok(value) = serde_json::from_str::<Value>(data) else {
                    continue;
                };
                let now = Instant::now();
                if value["content"].as_str().is_some_and(|c| !c.is_empty()) {
                    if last != started {
                        gaps.push((now - last).as_secs_f64() * 1e3);
                    }
                    last = now;
                }
                content.push_str(value["content"].as_str().unwrap_or(""));
                if value["stop"] == json!(true) {
                    done = Some(value);
                }
            }
        }
        // Acknowledged: the stream's last event arrived and says it stopped normally.
        let Some(done) = done else { continue };
        let counted = {
            let mut ledger = ledger.lock().unwrap();
            ledger.gaps_ms.extend(gaps);
            let counted = !anonymous && done["stop_type"] != "none";
            if counted {
                ledger.turns += 1;
                let stored = done["tokens_cached"]
                    .as_u64()
                    .unwrap_or(1)
                    .saturating_sub(1);
                let id = sessions[which].clone();
                ledger.acknowledged.retain(|(s, _)| *s != id);
                ledger.acknowledged.push((id, stored));
            }
            counted
        };
        if !counted {
            continue;
        }
        texts[which].push_str(&content);
        texts[which].push_str(" And then");
        // Keep conversations short of their context: start the text over in a new one.
        if texts[which].len() > 6000 {
            texts[which] = format!("Conversation {which} again. {}", common::long_prose(40));
        }
        if dice.chance(20) {
            let _ = client
                .post(format!("{base}/v1/sessions/{}/save", sessions[which]))
                .bearer_auth(USER)
                .send()
                .await;
        }
    }
}

#[derive(Default)]
struct Hostile {
    /// Whether the hostile key already sent the user's secret prompt since the daemon started:
    /// after that, a match may be its own cache, not the user's.
    probed: AtomicBool,
    requests: AtomicU64,
    cross_key_reads: AtomicU64,
    findings: Mutex<Vec<String>>,
}

impl Hostile {
    fn found(&self, what: String) {
        self.cross_key_reads.fetch_add(1, Ordering::Relaxed);
        let mut findings = self.findings.lock().unwrap();
        if findings.len() < 20 {
            findings.push(what);
        }
    }
}

/// Everything a hostile key, or no key, can try, in a loop until `until` or until the daemon
/// is gone.
async fn hostile_client(
    base: String,
    until: Instant,
    victims: Arc<Mutex<Ledger>>,
    slot_dir: std::path::PathBuf,
    hostile: Arc<Hostile>,
    seed: u64,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut dice = Dice::seeded(seed);
    let address = base.trim_start_matches("http://").to_string();
    let mut slow_connections = Vec::new();
    while Instant::now() < until {
        hostile.requests.fetch_add(1, Ordering::Relaxed);
        let victim = victims
            .lock()
            .unwrap()
            .acknowledged
            .first()
            .map(|(id, _)| id.clone());
        let get = |path: String, key: Option<&'static str>| {
            let mut request = client.get(format!("{base}{path}"));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            request.send()
        };
        match dice.below(12) {
            // Another key's conversations, by id and by listing.
            0 | 1 => {
                if let Some(id) = &victim {
                    for path in [
                        format!("/v1/sessions/{id}"),
                        format!("/v1/sessions/{id}/snapshot"),
                        format!("/v1/sessions/{id}/export?format=llama"),
                    ] {
                        if let Ok(r) = get(path.clone(), Some(HOSTILE)).await
                            && r.status().is_success()
                        {
                            hostile.found(format!("GET {path} answered {}", r.status()));
                        }
                    }
                    let deleted = client
                        .delete(format!("{base}/v1/sessions/{id}"))
                        .bearer_auth(HOSTILE)
                        .send()
                        .await;
                    if deleted.is_ok_and(|r| r.status().is_success()) {
                        hostile.found(format!("DELETE /v1/sessions/{id} succeeded"));
                    }
                }
                for path in ["/v1/sessions", "/slots"] {
                    if let Ok(r) = get(path.into(), Some(HOSTILE)).await
                        && let Ok(text) = r.text().await
                        && let Some(id) = &victim
                        && text.contains(id.as_str())
                    {
                        hostile.found(format!("{path} names the user's conversation"));
                    }
                }
            }
            // The user's cached prompt, guessed: served from a cache only to its own key.
            2 if !hostile.probed.swap(true, Ordering::SeqCst) => {
                let reply = client
                    .post(format!("{base}/completion"))
                    .bearer_auth(HOSTILE)
                    .json(&json!({"prompt": SECRET, "n_predict": 1}))
                    .send()
                    .await;
                if let Ok(reply) = reply
                    && let Ok(value) = reply.json::<Value>().await
                    // One token (the BOS every prompt starts with) is any cache's.
                    && value["timings"]["cache_n"].as_u64().unwrap_or(0) > 1
                {
                    hostile.found(format!("a cached prompt matched: {}", value["timings"]));
                }
            }
            // Slot files: listing, saving, erasing, and a forged file restored.
            3 => {
                let forged = slot_dir.join("forged.bin");
                let mut file = b"ggsq".to_vec();
                file.extend(std::iter::repeat_n(7u8, 4096));
                let _ = std::fs::write(&forged, &file);
                for action in ["save", "restore", "erase"] {
                    let r = client
                        .post(format!("{base}/slots/0?action={action}"))
                        .bearer_auth(HOSTILE)
                        .json(&json!({"filename": "forged.bin"}))
                        .send()
                        .await;
                    if r.is_ok_and(|r| r.status().is_success()) {
                        hostile.found(format!("slot {action} by another key succeeded"));
                    }
                }
            }
            // Uploads: junk, oversized, and slow ones that hold their places.
            4 => {
                let junk = client
                    .put(format!("{base}/v1/sessions/{}/snapshot", Uuid::new_v4()))
                    .bearer_auth(HOSTILE)
                    .body(vec![b'x'; 8 << 20])
                    .send()
                    .await;
                drop(junk);
                let mut huge = kvsnap::snapshot::MAGIC.to_vec();
                huge.resize(96 << 20, 0);
                let _ = client
                    .put(format!("{base}/v1/sessions/{}/snapshot", Uuid::new_v4()))
                    .bearer_auth(HOSTILE)
                    .body(huge)
                    .send()
                    .await;
            }
            // Half-sent requests, left open.
            5 => {
                if let Ok(mut socket) = std::net::TcpStream::connect(&address) {
                    let _ =
                        socket.write_all(b"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl");
                    slow_connections.push(socket);
                }
                if slow_connections.len() > 64 {
                    slow_connections.drain(..32);
                }
            }
            // Refused requests without a key, with long paths, many of them.
            6 => {
                let long = "z".repeat(8000);
                for _ in 0..20 {
                    let _ = client
                        .post(format!("{base}/admin/v1/sessions/{long}/migrate"))
                        .json(&json!({}))
                        .send()
                        .await;
                }
            }
            // Large inputs: a prompt of megabytes, many prompts, a huge grammar.
            7 => {
                let _ = client
                    .post(format!("{base}/tokenize"))
                    .bearer_auth(HOSTILE)
                    .json(&json!({"content": "word ".repeat(1 << 20)}))
                    .send()
                    .await;
                let prompts: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
                let _ = client
                    .post(format!("{base}/completion"))
                    .bearer_auth(HOSTILE)
                    .json(&json!({"prompt": prompts, "n_predict": 1}))
                    .send()
                    .await;
                let grammar = format!("root ::= {}", vec!["\"a\""; 100_000].join(" | "));
                let _ = client
                    .post(format!("{base}/completion"))
                    .bearer_auth(HOSTILE)
                    .json(&json!({"prompt": "x", "n_predict": 1, "grammar": grammar}))
                    .send()
                    .await;
            }
            // A page of another origin, and a rebound host name.
            8 => {
                let _ = client
                    .post(format!("{base}/completion"))
                    .header("Origin", "http://evil.example")
                    .header("Content-Type", "text/plain")
                    .body(json!({"prompt": "x", "n_predict": 1}).to_string())
                    .send()
                    .await;
                if let Ok(r) = client
                    .get(format!("{base}/v1/sessions"))
                    .header("Host", "evil.example")
                    .bearer_auth(USER)
                    .send()
                    .await
                    && r.status().is_success()
                {
                    hostile.found("a rebound host name was served".into());
                }
            }
            // Admin routes with a user key.
            9 => {
                let _ = client
                    .get(format!("{base}/admin/v1/audit"))
                    .bearer_auth(HOSTILE)
                    .send()
                    .await;
            }
            // Ordinary competing work from the other key (KVSNAP_ATTACK_COMPETE=0 leaves it
            // out, to tell what sharing the model costs from what the attacks cost).
            _ if env_or("KVSNAP_ATTACK_COMPETE", 1) == 1 => {
                let _ = client
                    .post(format!("{base}/completion"))
                    .bearer_auth(HOSTILE)
                    .json(&json!({"prompt": common::long_prose(60), "n_predict": 8}))
                    .send()
                    .await;
            }
            _ => {}
        }
        if dice.chance(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The process's peak resident memory, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn p99(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 * 0.99) as usize).min(values.len() - 1)]
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "the attack campaign: `make attack`"]
async fn attack_campaign() {
    let rounds = env_or("KVSNAP_ATTACK_ROUNDS", 4);
    let seconds = env_or("KVSNAP_ATTACK_SECONDS", 40);
    let dir = tempfile::tempdir().unwrap();
    let slot_dir = dir.path().join("slots");
    std::fs::create_dir(&slot_dir).unwrap();
    let args = args(slot_dir.to_str().unwrap());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    // Quiet: the legitimate user alone.
    let quiet_data = dir.path().join("quiet.redb");
    let quiet = Daemon::start_on(dir.path(), &quiet_data, &args);
    let quiet_ledger = Arc::new(Mutex::new(Ledger::default()));
    legitimate_user(
        quiet.base.clone(),
        Instant::now() + Duration::from_secs(seconds),
        quiet_ledger.clone(),
        1,
    )
    .await;
    let quiet_rss = peak_rss_kib(quiet.pid());
    quiet.stop();
    let mut quiet_gaps = std::mem::take(&mut quiet_ledger.lock().unwrap().gaps_ms);
    let quiet_p99 = p99(&mut quiet_gaps);

    // Unauthenticated floods alone: the store may not grow by a byte.
    let data = dir.path().join("attacked.redb");
    let d = Daemon::start_on(dir.path(), &data, &args);
    let before = std::fs::metadata(&data).unwrap().len();
    let client = reqwest::Client::new();
    let long = "z".repeat(8000);
    for i in 0..1000 {
        let path = match i % 4 {
            0 => format!("/admin/v1/sessions/{long}/migrate"),
            1 => "/admin/v1/import/llama".to_string(),
            2 => format!("/v1/sessions/{long}"),
            _ => "/admin/v1/rekey".to_string(),
        };
        let _ = client
            .post(format!("{}{path}", d.base))
            .body(vec![b'x'; 1024])
            .send()
            .await;
    }
    let growth = std::fs::metadata(&data).unwrap().len() as i64 - before as i64;
    d.stop();

    // Attacked: rounds of the user beside hostile clients, each ended by a kill -9 at a random
    // moment (or by the round's end), then every acknowledged turn looked for.
    let mut dice = Dice::seeded(33);
    let hostile = Arc::new(Hostile::default());
    let mut attacked_gaps = Vec::new();
    let (mut turns, mut lost, mut crashes, mut attacked_rss) = (0u64, 0u64, 0u64, 0u64);
    for round in 0..rounds {
        let mut d = Daemon::start_on(dir.path(), &data, &args);
        hostile.probed.store(false, Ordering::SeqCst);
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let until = Instant::now() + Duration::from_secs(seconds);
        let kill_after = Duration::from_millis(dice.below(seconds * 1000));
        let user = tokio::spawn(legitimate_user(
            d.base.clone(),
            until,
            ledger.clone(),
            round,
        ));
        let mut attackers = Vec::new();
        for i in 0..3 {
            attackers.push(tokio::spawn(hostile_client(
                d.base.clone(),
                until,
                ledger.clone(),
                slot_dir.clone(),
                hostile.clone(),
                round * 10 + i,
            )));
        }
        let started = Instant::now();
        let died = Arc::new(AtomicBool::new(false));
        while started.elapsed() < kill_after {
            if d.wait_exit(Duration::from_millis(200)).is_some() {
                died.store(true, Ordering::SeqCst);
                break;
            }
        }
        if died.load(Ordering::SeqCst) {
            crashes += 1;
            eprintln!(
                "round {round}: the daemon exited by itself:\n{}",
                common::last_lines(&d.stderr(), 30)
            );
        }
        attacked_rss = attacked_rss.max(peak_rss_kib(d.pid()));
        d.kill_9();
        let _ = user.await;
        for attacker in attackers {
            let _ = attacker.await;
        }

        let ledger = std::mem::take(&mut *ledger.lock().unwrap());
        attacked_gaps.extend(ledger.gaps_ms);
        turns += ledger.turns;
        let mut d = Daemon::start_on(dir.path(), &data, &args);
        d.key = Some(USER.into());
        for (id, tokens) in &ledger.acknowledged {
            let info = d.get_json(&format!("/v1/sessions/{id}")).await;
            let stored = info["tokens"].as_u64().unwrap_or(0);
            if stored < *tokens {
                lost += 1;
                eprintln!(
                    "round {round}: {id} holds {stored} tokens, {tokens} acknowledged: {info}"
                );
            }
        }
        d.stop();
        eprintln!(
            "round {round}: killed after {kill_after:?}, {} turns acknowledged",
            ledger.turns
        );
    }
    let attacked_p99 = p99(&mut attacked_gaps);
    let cross = hostile.cross_key_reads.load(Ordering::Relaxed);
    // What the configuration lets clients hold: two uploads being read, and a request body on
    // every connection allowed (512 × 8 MiB by default), beside what the quiet run needed.
    let config_bound_kib = quiet_rss + (kvsnap_upload_bound_bytes() * 2 + 512 * (8 << 20)) / 1024;

    println!("attack campaign: {rounds} rounds of {seconds} s, each ended by kill -9");
    println!("| figure | quiet | attacked | target |");
    println!("| --- | --- | --- | --- |");
    println!("| legitimate turns acknowledged | - | {turns} | - |");
    println!("| legitimate turns lost | - | {lost} | 0 |");
    println!(
        "| hostile requests / cross-key reads | - | {} / {cross} | 0 reads |",
        hostile.requests.load(Ordering::Relaxed)
    );
    println!("| daemon crashes | - | {crashes} | 0 |");
    println!("| store growth from 1,000 unauthenticated requests | - | {growth} bytes | 0 |");
    println!(
        "| resident memory peak | {} MiB | {} MiB | at most {} MiB |",
        quiet_rss / 1024,
        attacked_rss / 1024,
        config_bound_kib / 1024
    );
    println!(
        "| p99 time between tokens | {quiet_p99:.1} ms | {attacked_p99:.1} ms ({:.2}x) | at most 2x |",
        attacked_p99 / quiet_p99.max(1e-9)
    );
    for finding in hostile.findings.lock().unwrap().iter() {
        println!("cross-key read: {finding}");
    }
    assert_eq!(lost, 0, "acknowledged turns lost");
    assert_eq!(cross, 0, "cross-key reads");
    assert_eq!(crashes, 0, "daemon crashes");
    assert_eq!(growth, 0, "store growth from unauthenticated requests");
    assert!(
        attacked_rss <= config_bound_kib,
        "resident memory {attacked_rss} KiB over the bound {config_bound_kib} KiB"
    );
}

/// Two uploads at once, each at most the largest state this test's server holds (-c 4096,
/// -np 2: 2,048 tokens of Gemma 3 270M, about 12 MiB) and its envelope.
fn kvsnap_upload_bound_bytes() -> u64 {
    16 << 20
}
