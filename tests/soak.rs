//! The kill -9 soak (`make soak`; ignored by `make test`, it takes about ten minutes):
//! many cycles of start, turns on several conversations at once, `kill -9` at a random moment
//! during them. Under the `turn` policy a reply ends only after its save committed, so every
//! turn acknowledged (a 200 with its whole reply) must be found after the restart: the
//! conversation's stored history holds at least the tokens that reply counted. Prints the
//! acknowledged turns, the turns found, and the losses (the target is 0), then checks the store
//! offline (no manifest pointing at a missing page, no page without a reference) and that
//! every conversation still continues.
//!
//! `KVSNAP_SOAK_CYCLES` sets the number of cycles (200 by default).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Daemon, Dice, long_prose};
use kvsnap::sessions::paging;
use kvsnap::snapshot::Snapshot;
use kvsnap::store::{SessionStore, Store};
use serde_json::{Value, json};
use uuid::Uuid;

/// Conversations taking turns at once (one per sequence).
const WRITERS: usize = 2;
/// A conversation is retired once its history passes this: within Gemma 3's 512-token sliding
/// window, so a turn whose text re-tokenizes differently at the joint can still trim the
/// restored cache back and reuse it (beyond the window a restored cache holds only the window's
/// cells, and such a turn evaluates the whole history again: seconds, not a loss).
const RETIRE_AT_TOKENS: u64 = 450;

/// What a conversation looks like from the client's side.
#[derive(Debug, Clone)]
struct Conversation {
    id: String,
    /// The text of every acknowledged turn: prompt and reply, in order.
    text: String,
    /// The history's length after its last acknowledged turn, as the store counts it: the
    /// reply's `tokens_cached` less its last token, which is sampled but not yet decoded (the
    /// snapshot keeps it as the pending token).
    acknowledged_tokens: u64,
    acknowledged_turns: u64,
}

/// Takes turns on `conversation` until the daemon dies, recording each acknowledged one.
async fn take_turns(
    client: reqwest::Client,
    url: String,
    conversation: Arc<Mutex<Conversation>>,
    turns: Arc<Mutex<u64>>,
) {
    for step in 0.. {
        let (id, prompt) = {
            let c = conversation.lock().unwrap();
            let words = 10 + (step % 3) * 15;
            (c.id.clone(), format!("{} {}", c.text, long_prose(words)))
        };
        let answer = client
            .post(&url)
            .json(&json!({"prompt": prompt, "n_predict": 8, "temperature": 0,
                          "session_id": id}))
            .send()
            .await;
        let Ok(answer) = answer else { return };
        if answer.status() != 200 {
            return;
        }
        // The reply is acknowledged only once its whole body arrived.
        let Ok(reply) = answer.json::<Value>().await else {
            return;
        };
        let mut c = conversation.lock().unwrap();
        c.text = format!("{prompt}{}", reply["content"].as_str().unwrap_or(""));
        c.acknowledged_tokens = reply["tokens_cached"].as_u64().expect("tokens_cached") - 1;
        c.acknowledged_turns += 1;
        *turns.lock().unwrap() += 1;
        if c.acknowledged_tokens > RETIRE_AT_TOKENS {
            return;
        }
    }
}

#[tokio::test]
#[ignore = "a long campaign: make soak"]
async fn kill_9_soak_loses_no_acknowledged_turn() {
    let cycles: u64 = std::env::var("KVSNAP_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let args = ["-c", "4096", "-np", "2", "-t", "1", "--persist", "turn"];
    let mut dice = Dice::seeded(0x9e37_79b9_7f4a_7c15);
    let mut conversations: HashMap<String, Conversation> = HashMap::new();
    let (mut acknowledged, mut found, mut lost) = (0u64, 0u64, 0u64);
    let started = Instant::now();

    for cycle in 0..cycles {
        let d = Daemon::start_on(dir.path(), &data, &args);
        // Every turn acknowledged before the last kill is here.
        for c in conversations.values() {
            let info = d.get_json(&format!("/v1/sessions/{}", c.id)).await;
            let stored = info["tokens"].as_u64().unwrap_or(0);
            if stored >= c.acknowledged_tokens {
                found += c.acknowledged_turns;
            } else if c.acknowledged_turns > 0 {
                lost += c.acknowledged_turns;
                eprintln!(
                    "cycle {cycle}: {} holds {stored} tokens, {} were acknowledged: {info}",
                    c.id, c.acknowledged_tokens
                );
            }
            acknowledged += c.acknowledged_turns;
        }
        for c in conversations.values_mut() {
            c.acknowledged_turns = 0;
        }

        // Writers continue the conversations with room left, or start new ones.
        let mut open: Vec<Conversation> = conversations
            .values()
            .filter(|c| c.acknowledged_tokens <= RETIRE_AT_TOKENS)
            .take(WRITERS)
            .cloned()
            .collect();
        while open.len() < WRITERS {
            let id = Uuid::new_v4().to_string();
            open.push(Conversation {
                id,
                text: format!("Soak conversation {cycle}-{}:", open.len()),
                acknowledged_tokens: 0,
                acknowledged_turns: 0,
            });
        }
        let turns = Arc::new(Mutex::new(0u64));
        let shared: Vec<Arc<Mutex<Conversation>>> =
            open.into_iter().map(|c| Arc::new(Mutex::new(c))).collect();
        let writers: Vec<_> = shared
            .iter()
            .map(|c| {
                tokio::spawn(take_turns(
                    d.client.clone(),
                    d.url("/completion"),
                    c.clone(),
                    turns.clone(),
                ))
            })
            .collect();
        // Kill at a random moment once turns are flowing: during a decode, a save, or between
        // them (the first turn after a start may restore and evaluate for a while).
        let flowing = Instant::now();
        while *turns.lock().unwrap() == 0 && flowing.elapsed() < Duration::from_secs(20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(dice.below(1_500))).await;
        d.kill_9();
        for writer in writers {
            let _ = writer.await;
        }
        for c in shared {
            let c = c.lock().unwrap().clone();
            conversations.insert(c.id.clone(), c);
        }
        if cycle % 10 == 9 {
            eprintln!(
                "soak: {} of {cycles} cycles, {acknowledged} acknowledged turns checked, \
                 {lost} lost, {:.0} s",
                cycle + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }

    // The last cycle's turns, and every conversation continuing.
    let d = Daemon::start_on(dir.path(), &data, &args);
    let mut continued_from_store = 0;
    for c in conversations.values() {
        let info = d.get_json(&format!("/v1/sessions/{}", c.id)).await;
        let stored = info["tokens"].as_u64().unwrap_or(0);
        acknowledged += c.acknowledged_turns;
        if stored >= c.acknowledged_tokens {
            found += c.acknowledged_turns;
        } else {
            lost += c.acknowledged_turns;
        }
        if c.acknowledged_tokens > 0 {
            let reply = d
                .ok(
                    "/completion",
                    json!({"prompt": format!("{} And", c.text), "n_predict": 1,
                           "session_id": c.id}),
                )
                .await;
            if reply["timings"]["cache_n"].as_u64().unwrap() > 0 {
                continued_from_store += 1;
            }
        }
    }
    d.stop();
    println!(
        "soak: {cycles} kill -9 cycles, {} conversations ({continued_from_store} continued \
         from their stored history), {acknowledged} acknowledged turns, {found} found after \
         restart, {lost} lost, {:.0} s",
        conversations.len(),
        started.elapsed().as_secs_f64()
    );

    let store = Store::open(&data).unwrap();
    assert_eq!(store.check().unwrap(), Vec::<String>::new());
    for (id, record) in store.list(usize::MAX, &|_| true).unwrap() {
        let bytes = paging::stored_file(&store, id, &record).unwrap().unwrap();
        Snapshot::decode(&bytes).unwrap_or_else(|e| panic!("{id}: {e}"));
    }
    assert_eq!(lost, 0, "acknowledged turns lost to kill -9");
    assert!(
        acknowledged > cycles,
        "the soak acknowledged too few turns to mean much"
    );
}
