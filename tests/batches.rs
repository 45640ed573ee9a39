//! Invariant 6 on the real model, with shared batches on (the default): a conversation's tokens
//! do not depend on its neighbours. Two conversations (one greedy, one sampling from a seed and
//! then from its own stream) are run alone, then among 1, 3 and 7 busy neighbours arriving in
//! different orders, with a restart between their turns so the second turn continues from the
//! restored snapshot. Every run must produce the alone run's tokens. Once with the default f16
//! cache, once with q8_0 K and V (flash attention on).

mod common;

use std::time::Duration;

use common::{Daemon, long_prose};
use serde_json::{Value, json};
use uuid::Uuid;

const ARGS: [&str; 4] = ["-c", "8192", "-np", "8"];
/// The same with q8_0 K and V, which need flash attention: measured exact too.
const Q8_0_ARGS: [&str; 10] = [
    "-c", "8192", "-np", "8", "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0",
];

/// One of the two watched conversations.
struct Target {
    prompt: &'static str,
    first: Value,
    second: Value,
}

fn targets() -> [Target; 2] {
    [
        Target {
            prompt: "The old lighthouse keeper climbed the stairs and",
            first: json!({"n_predict": 24, "temperature": 0, "ignore_eos": true}),
            second: json!({"n_predict": 16, "temperature": 0, "ignore_eos": true}),
        },
        // A seed on the first turn, the conversation's own random stream on the second.
        Target {
            prompt: "A recipe for bread begins with",
            first: json!({"n_predict": 24, "temperature": 0.9, "seed": 11, "ignore_eos": true}),
            second: json!({"n_predict": 16, "temperature": 0.9, "ignore_eos": true}),
        },
    ]
}

/// Who arrives, in order: a target (by index) or a neighbour that keeps generating.
#[derive(Clone, Copy)]
enum Arrival {
    Target(usize),
    Neighbour,
}

fn turn_body(template: &Value, prompt: String, session: &str) -> Value {
    let mut body = template.clone();
    body["prompt"] = json!(prompt);
    body["session_id"] = json!(session);
    body["return_tokens"] = json!(true);
    body
}

/// Sends every arrival in order, 40 ms apart (so they take slots in that order), while the
/// neighbours generate for longer than the targets; returns the targets' replies.
async fn run_turn(d: &Daemon, arrivals: &[Arrival], bodies: &[Value; 2]) -> [Value; 2] {
    let mut requests = Vec::new();
    for (n, arrival) in arrivals.iter().enumerate() {
        let body = match *arrival {
            Arrival::Target(i) => bodies[i].clone(),
            Arrival::Neighbour => json!({
                "prompt": format!("Neighbour {n}. {}", long_prose(20 + 60 * (n % 4))),
                "n_predict": 48, "ignore_eos": true, "temperature": 0.7, "seed": n,
                "cache_prompt": false,
            }),
        };
        requests.push(async move {
            tokio::time::sleep(Duration::from_millis(40 * n as u64)).await;
            (*arrival, d.ok("/completion", body).await)
        });
    }
    let mut replies = [Value::Null, Value::Null];
    for (arrival, reply) in futures::future::join_all(requests).await {
        if let Arrival::Target(i) = arrival {
            replies[i] = reply;
        }
    }
    replies
}

/// Both turns of both targets among `arrivals`, with a restart of the daemon between the
/// turns; returns ([first turns], [second turns]).
async fn converse(args: &[&str], arrivals: &[Arrival], restart: bool) -> ([Value; 2], [Value; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let targets = targets();
    let sessions = [Uuid::new_v4().to_string(), Uuid::new_v4().to_string()];
    let d = Daemon::start_on(dir.path(), &data, args);
    let firsts = run_turn(
        &d,
        arrivals,
        &std::array::from_fn(|i| {
            turn_body(&targets[i].first, targets[i].prompt.into(), &sessions[i])
        }),
    )
    .await;
    let d = if restart {
        d.stop();
        Daemon::start_on(dir.path(), &data, args)
    } else {
        d
    };
    let before = d.metric("kvsnap_decode_calls_total").await;
    let generated_before = d.metric("kvsnap_tokens_generated_total").await;
    let seconds = run_turn(
        &d,
        arrivals,
        &std::array::from_fn(|i| {
            // (A target absent from `arrivals` has no first turn; its body goes unused.)
            let prompt = format!(
                "{}{} Then",
                targets[i].prompt,
                firsts[i]["content"].as_str().unwrap_or_default()
            );
            turn_body(&targets[i].second, prompt, &sessions[i])
        }),
    )
    .await;
    let calls = d.metric("kvsnap_decode_calls_total").await - before;
    let generated = d.metric("kvsnap_tokens_generated_total").await - generated_before;
    if arrivals.len() >= 4 {
        // The neighbours really shared decode calls with each other and the targets.
        assert!(
            calls < generated,
            "{calls} decode calls for {generated} generated tokens: nothing was shared"
        );
    }
    if restart {
        for (i, second) in seconds.iter().enumerate() {
            assert!(
                second["timings"]["cache_n"].as_u64().unwrap() > 0,
                "target {i}'s second turn continued from its restored snapshot"
            );
        }
    }
    (firsts, seconds)
}

/// One test, the two caches in turn: eight busy sequences of two daemons at once would share
/// this machine's two cores with spinning threads.
#[tokio::test]
async fn a_conversation_decodes_the_same_alone_and_among_busy_neighbours() {
    decodes_the_same_alone_and_among_busy_neighbours(&ARGS).await;
    decodes_the_same_alone_and_among_busy_neighbours(&Q8_0_ARGS).await;
}

async fn decodes_the_same_alone_and_among_busy_neighbours(args: &[&str]) {
    use Arrival::{Neighbour as N, Target as T};
    // Alone: each target in a daemon of its own, without a restart.
    let mut alone_first = Vec::new();
    let mut alone_second = Vec::new();
    for i in 0..2 {
        let (firsts, seconds) = converse(args, &[T(i)], false).await;
        alone_first.push(firsts[i]["tokens"].clone());
        alone_second.push(seconds[i]["tokens"].clone());
        assert_eq!(alone_first[i].as_array().unwrap().len(), 24);
    }
    let scenarios: [(&str, Vec<Arrival>); 4] = [
        ("1 neighbour", vec![T(0), T(1)]),
        ("3 neighbours, targets first", vec![T(1), T(0), N, N]),
        ("3 neighbours, targets between", vec![N, T(0), N, T(1)]),
        ("7 neighbours", vec![N, N, T(1), N, N, N, N, T(0)]),
    ];
    for (name, arrivals) in scenarios {
        let (firsts, seconds) = converse(args, &arrivals, true).await;
        for i in 0..2 {
            assert_eq!(
                firsts[i]["tokens"], alone_first[i],
                "{name}: target {i}'s first turn"
            );
            assert_eq!(
                seconds[i]["tokens"], alone_second[i],
                "{name}: target {i}'s second turn, after a restart and restore"
            );
        }
    }
}
