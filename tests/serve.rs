//! Serving against the real model and the real HTTP server: conversations reuse their cache,
//! streaming, parallel equals sequential, seeds, auth, and bad input.

mod common;

use std::time::Duration;

use common::{Daemon, long_prose, sse_data};
use serde_json::{Value, json};
use uuid::Uuid;

const LIGHTHOUSE: &str = "Once upon a time, in a small village by the sea, there lived an old \
                          lighthouse keeper named Tomas. Every night he";

fn small() -> Vec<&'static str> {
    vec!["-c", "4096", "-np", "4"]
}

#[tokio::test]
async fn a_continued_conversation_evaluates_only_its_new_tokens() {
    let d = Daemon::start(&small());
    let session = Uuid::new_v4().to_string();
    let first_messages = json!([{"role": "user", "content": "Tell me about lighthouses."}]);
    let first = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": first_messages, "max_tokens": 16, "temperature": 0,
                   "session_id": session}),
        )
        .await;
    let first_prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let reply = first["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(first["session_id"], json!(session));

    let second = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": [
                    {"role": "user", "content": "Tell me about lighthouses."},
                    {"role": "assistant", "content": reply},
                    {"role": "user", "content": "And who keeps them?"}],
                   "max_tokens": 8, "temperature": 0, "session_id": session}),
        )
        .await;
    let usage = &second["usage"];
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached >= first_prompt,
        "the first turn's {first_prompt} prompt tokens should come from cache, got {cached}"
    );
    assert!(
        prompt - cached < 30,
        "only the new turn is evaluated: {usage}"
    );

    // The same through llama-server's native route, with the session in the header.
    let native_session = Uuid::new_v4().to_string();
    let response = d
        .client
        .post(d.url("/completion"))
        .header("X-Session-Id", &native_session)
        .json(&json!({"prompt": LIGHTHOUSE, "n_predict": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-session-id"].to_str().unwrap(),
        native_session
    );
    let one: Value = response.json().await.unwrap();
    let continued = format!("{LIGHTHOUSE}{} The end.", one["content"].as_str().unwrap());
    let two = d
        .ok(
            "/completion",
            json!({"prompt": continued, "n_predict": 4, "temperature": 0,
                   "session_id": native_session}),
        )
        .await;
    let evaluated_before = one["tokens_evaluated"].as_u64().unwrap();
    assert!(two["timings"]["cache_n"].as_u64().unwrap() >= evaluated_before);
    assert!(two["timings"]["prompt_n"].as_u64().unwrap() < 10, "{two}");
}

/// How many leading tokens two prompts share, as the server tokenizes them.
async fn shared_prefix(d: &Daemon, a: &str, b: &str) -> u64 {
    let tokens = |text: &str| d.ok("/tokenize", json!({"content": text, "add_special": true}));
    let (a, b) = (tokens(a).await, tokens(b).await);
    let (a, b) = (
        a["tokens"].as_array().unwrap(),
        b["tokens"].as_array().unwrap(),
    );
    a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
}

#[tokio::test]
async fn an_edited_history_is_cut_back_to_the_common_prefix_or_evaluated_afresh() {
    let d = Daemon::start(&["-c", "8192", "-np", "2"]);
    let long = long_prose(1200); // about 1,500 tokens: beyond the 512-token window and its cache
    let cut = long.char_indices().nth(long.len() / 3).unwrap().0;
    let near_end = long.len() - 40;
    let cases = [
        (
            "short history, edited near its end",
            long_prose(60),
            long_prose(60).len() - 20,
            true,
        ),
        // Past the window, a turn ends with the cache laid out as a restore lays it out, so an
        // edit is cut back as a restored conversation's would be: to the common prefix when
        // llama.cpp removed the tail and still holds what the next token attends to, else
        // evaluated from the start (`docs/rules.md`, engine rule 5). Either way, never anything in between.
        (
            "long history, edited near its end",
            long.clone(),
            near_end,
            false,
        ),
        ("long history, edited far back", long.clone(), cut, false),
    ];
    for (what, history, edit_at, reusable) in cases {
        let session = Uuid::new_v4().to_string();
        d.ok(
            "/completion",
            json!({"prompt": history, "n_predict": 8, "temperature": 0, "session_id": session}),
        )
        .await;
        let edited = format!("{} Then the baker whispered", &history[..edit_at]);
        let reply = d
            .ok(
                "/completion",
                json!({"prompt": edited, "n_predict": 12, "temperature": 0,
                       "session_id": session, "return_tokens": true}),
            )
            .await;
        let cache_n = reply["timings"]["cache_n"].as_u64().unwrap();
        if reusable {
            // Only the tokens after the common prefix were evaluated.
            assert_eq!(
                cache_n,
                shared_prefix(&d, &history, &edited).await,
                "{what}"
            );
        } else if cache_n != 0 {
            assert_eq!(
                cache_n,
                shared_prefix(&d, &history, &edited).await,
                "{what}: the common prefix or nothing"
            );
        } else {
            // Evaluated from the start: it answers exactly as a fresh evaluation does.
            let fresh = d
                .ok(
                    "/completion",
                    json!({"prompt": edited, "n_predict": 12, "temperature": 0,
                           "cache_prompt": false, "return_tokens": true}),
                )
                .await;
            assert_eq!(reply["tokens"], fresh["tokens"], "{what}");
        }
        assert_eq!(reply["tokens_predicted"], json!(12), "{what}");
    }
}

#[tokio::test]
async fn streaming_chat_sends_deltas_usage_and_done() {
    let d = Daemon::start(&small());
    // Both evaluate the prompt afresh: a reused prefix decodes the last prompt token in a batch
    // of another shape, and llama.cpp's numerics follow batch shapes (as llama-server documents
    // for `cache_prompt`).
    let body = json!({"messages": [{"role": "user", "content": "Count to five."}],
                      "max_tokens": 12, "temperature": 0, "cache_prompt": false});
    let whole = d.ok("/v1/chat/completions", body.clone()).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = d
        .client
        .post(d.url("/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse_data(&response.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(chunks.len() > 3, "several chunks: {chunks:?}");
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], json!(12));
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // llama-server's native stream: objects with `stop`, the last one carrying timings.
    let response = d
        .client
        .post(d.url("/completion"))
        .json(&json!({"prompt": LIGHTHOUSE, "n_predict": 6, "temperature": 0, "stream": true}))
        .send()
        .await
        .unwrap();
    let events: Vec<Value> = sse_data(&response.text().await.unwrap())
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["stop"], json!(true));
    assert_eq!(last["timings"]["predicted_n"], json!(6));
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["stop"] == json!(false))
    );
}

#[tokio::test]
async fn stop_strings_end_the_text_before_them() {
    let d = Daemon::start(&small());
    let plain = d
        .ok(
            "/completion",
            json!({"prompt": LIGHTHOUSE, "n_predict": 12, "temperature": 0}),
        )
        .await;
    let text = plain["content"].as_str().unwrap();
    // Stop at the third word of the greedy continuation.
    let word = text.split_whitespace().nth(2).unwrap().to_string();
    let stopped = d
        .ok(
            "/completion",
            json!({"prompt": LIGHTHOUSE, "n_predict": 12, "temperature": 0, "stop": [word]}),
        )
        .await;
    assert_eq!(stopped["stop_type"], "word");
    let expected = &text[..text.find(&word).unwrap()];
    assert_eq!(stopped["content"].as_str().unwrap(), expected);
}

#[tokio::test]
async fn four_parallel_conversations_give_the_same_greedy_tokens_as_one_at_a_time() {
    let d = Daemon::start(&small());
    let prompts = [
        LIGHTHOUSE.to_string(),
        "The recipe for a good soup starts with".to_string(),
        long_prose(120),
        "In the year 1850 the railway reached the town, and".to_string(),
    ];
    let request = |p: &str| {
        json!({"prompt": p, "n_predict": 24, "temperature": 0, "cache_prompt": false,
               "return_tokens": true})
    };
    let mut sequential = Vec::new();
    for p in &prompts {
        sequential.push(d.ok("/completion", request(p)).await["tokens"].clone());
    }
    let parallel =
        futures::future::join_all(prompts.iter().map(|p| d.ok("/completion", request(p)))).await;
    let slots: std::collections::HashSet<_> =
        parallel.iter().map(|r| r["id_slot"].as_u64()).collect();
    assert_eq!(slots.len(), 4, "each request had a sequence of its own");
    for (i, reply) in parallel.iter().enumerate() {
        assert_eq!(reply["tokens"], sequential[i], "prompt {i}");
    }
}

#[tokio::test]
async fn the_same_seed_gives_the_same_text_and_a_conversation_continues_its_stream() {
    let d = Daemon::start(&small());
    let sample = |seed: i64| {
        json!({"prompt": LIGHTHOUSE, "n_predict": 24, "temperature": 1.0, "seed": seed,
               "cache_prompt": false})
    };
    let a = d.ok("/completion", sample(42)).await["content"].clone();
    let b = d.ok("/completion", sample(42)).await["content"].clone();
    assert_eq!(a, b);
    let mut others = Vec::new();
    for seed in [1, 2, 3] {
        others.push(d.ok("/completion", sample(seed)).await["content"].clone());
    }
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds give different text"
    );

    // Two conversations seeded alike, then continued without a seed, stay alike: each turn
    // continues the conversation's own random stream.
    let mut turns = Vec::new();
    for _ in 0..2 {
        let session = Uuid::new_v4().to_string();
        let one = d
            .ok(
                "/completion",
                json!({"prompt": LIGHTHOUSE, "n_predict": 8, "temperature": 1.0, "seed": 7,
                       "session_id": session}),
            )
            .await;
        let two = d
            .ok(
                "/completion",
                json!({"prompt": format!("{LIGHTHOUSE}{}", one["content"].as_str().unwrap()),
                       "n_predict": 16, "temperature": 1.0, "session_id": session}),
            )
            .await;
        turns.push((one["content"].clone(), two["content"].clone()));
    }
    assert_eq!(turns[0], turns[1]);
}

#[tokio::test]
async fn api_keys_guard_every_route_but_health() {
    let d = Daemon::start(&[
        "-c",
        "2048",
        "-np",
        "1",
        "--api-key",
        "user-key",
        "--admin-api-key",
        "admin-key",
    ]);
    let get = |key: Option<&str>, path: &str| {
        let mut request = d.client.get(d.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    assert_eq!(get(None, "/health").await.unwrap().status(), 200);
    let missing = get(None, "/v1/models").await.unwrap();
    assert_eq!(missing.status(), 401);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(
        get(Some("wrong"), "/v1/models").await.unwrap().status(),
        401
    );
    assert_eq!(
        get(Some("user-key"), "/v1/models").await.unwrap().status(),
        200
    );
    assert_eq!(
        get(Some("admin-key"), "/v1/models").await.unwrap().status(),
        200
    );
    // llama-server's other header for the key.
    let by_header = |key: &'static str| {
        d.client
            .get(d.url("/v1/models"))
            .header("x-api-key", key)
            .send()
    };
    assert_eq!(by_header("user-key").await.unwrap().status(), 200);
    assert_eq!(by_header("wrong").await.unwrap().status(), 401);
    let response = d
        .client
        .post(d.url("/completion"))
        .json(&json!({"prompt": "Hi", "n_predict": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_sentence_and_nothing_breaks() {
    let d = Daemon::start(&["-c", "1024", "-np", "4", "--max-body-bytes", "100000"]);
    let raw = |path: &'static str, body: Vec<u8>| {
        d.client
            .post(d.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let check = |status: u16, body: Value, expected: u16, what: &str| {
        assert_eq!(status, expected, "{what}: {body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.len() > 10, "{what} explains itself: {body}");
        assert_eq!(body["error"]["code"], json!(expected), "{what}");
    };

    let r = raw("/v1/chat/completions", b"{\"messages\": [".to_vec())
        .await
        .unwrap();
    check(
        r.status().as_u16(),
        r.json().await.unwrap(),
        400,
        "malformed JSON",
    );
    let r = raw("/completion", vec![b'{', 0xff, 0xfe, b'}'])
        .await
        .unwrap();
    check(
        r.status().as_u16(),
        r.json().await.unwrap(),
        400,
        "invalid UTF-8",
    );
    // The daemon answers 413 before reading the whole body and then drops the connection;
    // without `connection: close` the client could pick that connection from its pool for
    // the next request and lose the race with its closing (a flake seen once).
    let r = d
        .client
        .post(d.url("/completion"))
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(vec![b' '; 200_000])
        .send()
        .await
        .unwrap();
    check(
        r.status().as_u16(),
        r.json().await.unwrap(),
        413,
        "oversized body",
    );

    let cases = [
        (
            "/completion",
            json!({"prompt": "Hi", "session_id": "not-a-uuid"}),
            "session id",
        ),
        (
            "/completion",
            json!({"prompt": long_prose(400), "n_predict": 4}),
            "prompt too long",
        ),
        (
            "/completion",
            json!({"prompt": "Hi", "top_p": 5.0}),
            "top_p out of range",
        ),
        (
            "/completion",
            json!({"prompt": "Hi", "temperature": "hot"}),
            "wrong type",
        ),
        (
            "/completion",
            json!({"prompt": "Hi", "n_predict": -7}),
            "negative n_predict",
        ),
        (
            "/completion",
            json!({"prompt": [1, 2, 99999999]}),
            "token outside the vocabulary",
        ),
        ("/completion", json!({"prompt": []}), "empty prompt"),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            "no messages",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            "role",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens 0",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "n": 9}),
            "n > 8",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a\u{0}b"}]}),
            "NUL in a message",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}),
            "several prompts",
        ),
        ("/detokenize", json!({"tokens": [-5]}), "negative token id"),
    ];
    for (path, body, what) in cases {
        let (status, reply) = d.post(path, body).await;
        check(status, reply, 400, what);
    }
    let response = d
        .client
        .post(d.url("/completion"))
        .header("X-Session-Id", "12345")
        .json(&json!({"prompt": "Hi"}))
        .send()
        .await
        .unwrap();
    check(
        response.status().as_u16(),
        response.json().await.unwrap(),
        400,
        "header id",
    );
    let r = d.client.get(d.url("/nowhere")).send().await.unwrap();
    check(
        r.status().as_u16(),
        r.json().await.unwrap(),
        404,
        "unknown route",
    );

    // Still serving after all of that.
    let fine = d
        .ok(
            "/completion",
            json!({"prompt": LIGHTHOUSE, "n_predict": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(fine["tokens_predicted"], json!(2));
}

#[tokio::test]
async fn requests_beyond_capacity_get_503_with_retry_after() {
    let d = Daemon::start(&["-c", "2048", "-np", "1", "--queue-size", "1"]);
    let long = json!({"prompt": LIGHTHOUSE, "n_predict": 300, "temperature": 0,
                      "cache_prompt": false});
    let send = || d.client.post(d.url("/completion")).json(&long).send();
    let responses = futures::future::join_all((0..4).map(|_| send())).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| r.as_ref().unwrap().status().as_u16())
        .collect();
    assert!(statuses.contains(&200), "{statuses:?}");
    let refused: Vec<_> = responses
        .into_iter()
        .map(Result::unwrap)
        .filter(|r| r.status() == 503)
        .collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    for response in refused {
        assert_eq!(response.headers()["retry-after"], "1");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "unavailable_error");
    }
}

#[tokio::test]
async fn tokenize_detokenize_models_and_metrics() {
    let d = Daemon::start(&small());
    let tokens = d
        .ok(
            "/tokenize",
            json!({"content": LIGHTHOUSE, "add_special": true}),
        )
        .await["tokens"]
        .clone();
    // The fixture's prompt tokens, as llama.cpp tokenized them.
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/llama-cpp/lighthouse.json")).unwrap();
    assert_eq!(tokens, fixture["prompt_tokens"]);
    let text = d.ok("/detokenize", json!({"tokens": tokens})).await["content"].clone();
    assert!(text.as_str().unwrap().ends_with(LIGHTHOUSE));

    let models: Value = d.get_json("/v1/models").await;
    assert_eq!(models["data"][0]["id"], "gemma-3-270m-q4_k_m.gguf");
    assert_eq!(models["data"][0]["meta"]["n_ctx_per_sequence"], json!(1024));

    d.ok("/completion", json!({"prompt": LIGHTHOUSE, "n_predict": 3}))
        .await;
    d.ok("/completion", json!({"prompt": LIGHTHOUSE, "n_predict": 3}))
        .await;
    let metrics = d
        .client
        .get(d.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "kvsnap_tokens_evaluated_total",
        "kvsnap_tokens_reused_total",
        "kvsnap_tokens_generated_total",
        "kvsnap_queue_depth",
        "kvsnap_http_requests_total",
        "kvsnap_http_request_duration_seconds",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn sigterm_lets_streams_finish_then_cancels_them_at_the_deadline() {
    let mut d = Daemon::start(&["-c", "2048", "-np", "1", "--shutdown-grace", "1"]);
    let response = d
        .client
        .post(d.url("/completion"))
        .json(
            &json!({"prompt": LIGHTHOUSE, "n_predict": 1500, "temperature": 0,
                      "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    std::process::Command::new("kill")
        .args(["-TERM", &d.pid().to_string()])
        .status()
        .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends after the grace period")
        .unwrap();
    let events = sse_data(&body);
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["stop"], json!(true));
    assert_eq!(
        last["stop_type"], "none",
        "cancelled at the deadline: {last}"
    );
    let status = d
        .wait_exit(Duration::from_secs(30))
        .expect("the daemon exits");
    assert!(status.success(), "{status:?}\n{}", d.stderr());
}

#[test]
fn sigterm_the_moment_it_says_listening_is_a_clean_shutdown() {
    // The handlers are installed before the port is announced: a supervisor that signals at once
    // gets a graceful exit, not the default disposition's kill (CI once lost a stream to that).
    for _ in 0..3 {
        Daemon::start(&["-c", "512", "-np", "1"]).stop();
    }
}

#[test]
fn a_missing_or_broken_model_exits_with_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.gguf");
    let broken = dir.path().join("broken.gguf");
    std::fs::write(&broken, b"GGUF this is not a model").unwrap();
    for (model, expected) in [(&missing, "make model"), (&broken, "not a GGUF model")] {
        let output = std::process::Command::new(common::binary())
            .args(["serve", "--port", "0", "-m"])
            .arg(model)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!stdout.contains("listening"), "the port never opened");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
    let output = std::process::Command::new(common::binary())
        .args(["serve", "--parallel", "0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("parallel must be"));
}

#[tokio::test]
async fn generation_steps_are_shared_unless_turned_off() {
    // Four conversations generating 32 tokens each: decoded together (the default), in calls of
    // at most EXACT_BATCH_ROWS sequences; decoded each alone, at least 4 x 32 calls.
    let calls_per_step = 4usize.div_ceil(kvsnap::compute::EXACT_BATCH_ROWS) as f64;
    for (shared, check) in [("on", "together"), ("off", "alone")] {
        let d = Daemon::start(&["-c", "4096", "-np", "4", "--shared-batches", shared]);
        d.ok("/completion", json!({"prompt": "Warm up", "n_predict": 1}))
            .await;
        let before = d.metric("kvsnap_decode_calls_total").await;
        let requests = (0..4).map(|i| {
            d.ok(
                "/completion",
                json!({"prompt": format!("Story {i}: once upon a time"), "n_predict": 32,
                       "ignore_eos": true, "cache_prompt": false, "temperature": 0}),
            )
        });
        let replies = futures::future::join_all(requests).await;
        assert!(replies.iter().all(|r| r["tokens_predicted"] == json!(32)));
        let calls = d.metric("kvsnap_decode_calls_total").await - before;
        if check == "together" {
            assert!(
                calls <= calls_per_step * 32.0 + 16.0,
                "{calls} decode calls for 4 x 32 tokens decoded together"
            );
        } else {
            assert!(
                calls >= 4.0 * 32.0,
                "{calls} decode calls: each conversation alone"
            );
        }
    }
}

#[tokio::test]
async fn browsers_get_cors_answers_without_a_key() {
    // The default allows pages served from this machine; preflights need no key.
    let d = Daemon::start(&["-c", "2048", "-np", "1", "--api-key", "user-key"]);
    let preflight = |origin: &'static str| {
        d.client
            .request(reqwest::Method::OPTIONS, d.url("/completions"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "Authorization")
            .send()
    };
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    for origin in [
        "http://localhost:5173",
        "http://127.0.0.1",
        "http://[::1]:3000",
    ] {
        let r = preflight(origin).await.unwrap();
        assert_eq!(r.status(), 200, "{origin}");
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
        assert_eq!(
            header(&r, "access-control-allow-credentials").as_deref(),
            Some("true")
        );
        assert_eq!(
            header(&r, "access-control-allow-methods").as_deref(),
            Some("GET, POST, DELETE, OPTIONS")
        );
        assert_eq!(
            header(&r, "access-control-allow-headers").as_deref(),
            Some("*")
        );
    }
    for origin in [
        "http://evil.com",
        "http://localhost.evil.com",
        "http://notlocalhost",
    ] {
        let r = preflight(origin).await.unwrap();
        assert_eq!(r.status(), 200, "{origin}");
        assert_eq!(header(&r, "access-control-allow-origin"), None, "{origin}");
    }
    // An answer a page may read names its origin, errors included (here: no key, 401).
    let r = d
        .client
        .post(d.url("/completion"))
        .header("Origin", "http://localhost:5173")
        .json(&json!({"prompt": "Hi", "n_predict": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("http://localhost:5173")
    );
    drop(d);

    // `*` allows any origin; a list allows exactly its members.
    let any = Daemon::start(&["-c", "2048", "-np", "1", "--cors-origins", "*"]);
    let r = any
        .client
        .get(any.url("/v1/models"))
        .header("Origin", "https://web.mydomain.fr")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://web.mydomain.fr")
    );
    drop(any);
    let listed = Daemon::start(&[
        "-c",
        "2048",
        "-np",
        "1",
        "--cors-origins",
        "https://chat.example.com",
    ]);
    for (origin, allowed) in [
        ("https://chat.example.com", true),
        ("http://localhost:5173", false),
    ] {
        let r = listed
            .client
            .get(listed.url("/health"))
            .header("Origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(
            header(&r, "access-control-allow-origin").is_some(),
            allowed,
            "{origin}"
        );
    }
}

#[tokio::test]
async fn props_tell_a_frontend_the_defaults_slots_and_model() {
    let d = Daemon::start(&["-c", "2048", "-np", "2"]);
    let props = d.get_json("/props").await;
    assert_eq!(props["total_slots"], json!(2), "{props}");
    assert_eq!(props["default_generation_settings"]["n_ctx"], json!(1024));
    let params = &props["default_generation_settings"]["params"];
    assert_eq!(params["n_predict"], json!(-1));
    assert!(params["temperature"].as_f64().unwrap() > 0.0, "{params}");
    assert!(params["top_k"].as_u64().is_some(), "{params}");
    let model = props["model_path"].as_str().unwrap();
    assert!(model.ends_with(".gguf") && !model.contains('/'), "{model}");
    assert_eq!(props["modalities"]["vision"], json!(false));
    assert_eq!(props["bos_token"], json!("<bos>"), "{props}");
    assert!(
        props["build_info"]
            .as_str()
            .unwrap()
            .contains(kvsnap::compute::THIS_BUILD),
        "{props}"
    );
    // Gemma 3 270M base has no template of its own: the built-in one chosen for it is named.
    assert_eq!(props["chat_template"], json!("gemma"), "{props}");
}

#[tokio::test]
async fn a_chat_request_can_be_rendered_and_counted_without_generating() {
    let d = Daemon::start(&["-c", "2048", "-np", "1"]);
    let messages = json!([
        {"role": "system", "content": "You are a lighthouse keeper."},
        {"role": "user", "content": "How many ships passed today?"},
    ]);
    let rendered = d.ok("/apply-template", json!({"messages": messages})).await;
    let prompt = rendered["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("How many ships passed today?") && prompt.contains("<start_of_turn>"),
        "{prompt}"
    );
    // The count is the prompt a chat completion evaluates.
    let counted = d
        .ok(
            "/chat/completions/input_tokens",
            json!({"messages": messages}),
        )
        .await;
    let reply = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 1, "cache_prompt": false}),
        )
        .await;
    assert_eq!(
        counted["input_tokens"], reply["usage"]["prompt_tokens"],
        "{counted} {reply}"
    );
    let v1 = d
        .ok(
            "/v1/chat/completions/input_tokens",
            json!({"messages": messages}),
        )
        .await;
    assert_eq!(v1, counted);
    // Bad messages get the chat route's 400 and sentence.
    let (status, body) = d
        .post(
            "/apply-template",
            json!({"messages": [{"role": "pirate", "content": "arr"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown message role")
    );
    let (status, _) = d.post("/apply-template", json!({"messages": []})).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn ignore_eos_bans_every_end_of_generation_token_as_llama_server_does() {
    // The instruction-tuned model, which ends a short answer with its end-of-turn token.
    let d = Daemon::start_with_model(&common::smollm2_path(), &["-c", "2048", "-np", "1"]);
    let rendered = d
        .ok(
            "/apply-template",
            json!({"messages": [{"role": "user", "content": "Say yes."}]}),
        )
        .await;
    let body = |ignore_eos: bool| {
        json!({"prompt": rendered["prompt"], "n_predict": 48, "temperature": 0,
               "ignore_eos": ignore_eos, "return_tokens": true})
    };
    // Left alone, the model ends this turn early with an end-of-generation token.
    let plain = d.ok("/completion", body(false)).await;
    assert_eq!(plain["stop_type"], "eos", "{plain}");
    assert_eq!(plain["generation_settings"]["logit_bias"], json!([]));

    let ignoring = d.ok("/completion", body(true)).await;
    assert_eq!(ignoring["tokens_predicted"], 48, "{ignoring}");
    let banned = ignoring["generation_settings"]["logit_bias"]
        .as_array()
        .expect("logit_bias");
    assert!(!banned.is_empty());
    assert!(
        banned.iter().all(|entry| entry["bias"].is_null()),
        "{banned:?}"
    );
    // None of the banned tokens was drawn.
    let ids: Vec<&Value> = banned.iter().map(|entry| &entry["token"]).collect();
    let drawn = ignoring["tokens"].as_array().expect("tokens");
    assert!(drawn.iter().all(|t| !ids.contains(&t)), "{drawn:?} {ids:?}");
}
