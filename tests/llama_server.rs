//! llama-server's command line, request features and answer shapes (issue 11), on the real
//! model: what a frontend written for llama-server finds when it talks to kvsnap instead.

mod common;

use std::io::{Read, Write};

use common::{Daemon, sse_data};
use serde_json::{Value, json};

/// POSTs and returns the SSE `data:` payloads parsed as JSON (`[DONE]` left out).
async fn stream(d: &Daemon, path: &str, body: Value) -> Vec<Value> {
    let response = d.client.post(d.url(path)).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let text = response.text().await.unwrap();
    sse_data(&text)
        .into_iter()
        .filter(|d| d != "[DONE]")
        .map(|d| serde_json::from_str(&d).unwrap())
        .collect()
}

/// The raw head of a GET answer, header names spelled as sent.
fn raw_head(d: &Daemon, path: &str) -> String {
    let mut socket = std::net::TcpStream::connect(d.base.trim_start_matches("http://")).unwrap();
    write!(
        socket,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    answer.split("\r\n\r\n").next().unwrap().to_string()
}

#[tokio::test]
async fn llama_server_flags_set_defaults_names_and_routes() {
    // llama-server's small test preset: 256 tokens shared by 4 slots, logical batch 32 (the
    // physical one follows it down), several listening addresses, and switches kvsnap decides
    // itself but accepts.
    let d = Daemon::start(&[
        "-c",
        "256",
        "-np",
        "4",
        "-b",
        "32",
        "--host",
        "127.0.0.1,127.0.0.2",
        "--temp",
        "0.9",
        "--seed",
        "42",
        "-n",
        "6",
        "--alias",
        "tinyllama-2,fim,code",
        "--tags",
        "chat,small",
        "--no-slots",
        "--no-metrics",
        "--kv-unified",
        "--swa-full",
        "--jinja",
        "-ctk",
        "f16",
    ]);
    let props = d.get_json("/props").await;
    let params = &props["default_generation_settings"]["params"];
    assert_eq!(params["seed"], json!(42), "{props}");
    assert_eq!(params["n_predict"], json!(6), "{props}");
    assert!((params["temperature"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    // llama.cpp pads each sequence's share up to 256 cells, as llama-server reports it too.
    assert_eq!(props["default_generation_settings"]["n_ctx"], json!(256));
    assert_eq!(props["total_slots"], json!(4));
    assert_eq!(props["endpoint_slots"], json!(false));

    let models = d.get_json("/v1/models").await;
    let model = &models["data"][0];
    assert_eq!(model["id"], json!("code"), "{models}");
    assert_eq!(model["aliases"], json!(["code", "fim", "tinyllama-2"]));
    assert_eq!(model["tags"], json!(["chat", "small"]));

    for path in ["/slots", "/metrics"] {
        let r = d.client.get(d.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 501, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            body["error"]["type"],
            json!("not_supported_error"),
            "{body}"
        );
    }

    // No n_predict: the server's 6. No seed: the server's 42, so two requests agree, streamed
    // or not.
    let prompt = "The old lighthouse keeper opened the door and";
    let first = d.ok("/completion", json!({"prompt": prompt})).await;
    let second = d
        .ok(
            "/completion",
            json!({"prompt": prompt, "cache_prompt": false}),
        )
        .await;
    assert_eq!(first["content"], second["content"], "{first} {second}");
    assert!(
        first["timings"]["predicted_n"].as_u64().unwrap() <= 6,
        "{first}"
    );
    assert_eq!(first["generation_settings"]["seed"], json!(42), "{first}");
    let chunks = stream(&d, "/completion", json!({"prompt": prompt, "stream": true})).await;
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    assert_eq!(json!(streamed), first["content"]);
    // The model's name in answers is its first alias.
    let chat = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(chat["model"], json!("code"), "{chat}");
    assert!(
        chat["system_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with('b'),
        "{chat}"
    );

    // The second address serves the same daemon.
    let other = d.base.replace("127.0.0.1", "127.0.0.2");
    let health = d
        .client
        .get(format!("{other}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    drop(d);

    // What kvsnap cannot do is refused at start with a sentence.
    let refused = Daemon::try_start(&["-c", "2048", "-np", "1", "-ctv", "q8_0"])
        .err()
        .unwrap();
    assert!(refused.contains("needs flash attention"), "{refused}");

    // A chat template read from a file (--chat-template-file): llama.cpp recognises its style
    // from the text, here ChatML instead of the model's Gemma turns.
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("chatml.jinja");
    std::fs::write(
        &template,
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
         message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}\
         {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    )
    .unwrap();
    let d = Daemon::start(&[
        "-c",
        "1024",
        "-np",
        "1",
        "--chat-template-file",
        template.to_str().unwrap(),
    ]);
    let rendered = d
        .ok(
            "/apply-template",
            json!({"messages": [{"role": "user", "content": "Ahoy"}]}),
        )
        .await;
    assert_eq!(
        rendered["prompt"],
        json!("<|im_start|>user\nAhoy<|im_end|>\n<|im_start|>assistant\n")
    );
    let missing = Daemon::try_start(&["--chat-template-file", "/nonexistent/t.jinja"])
        .err()
        .unwrap();
    assert!(missing.contains("chat template file"), "{missing}");
}

#[tokio::test]
async fn metrics_use_llama_servers_names_and_headers_its_spelling() {
    let d = Daemon::start(&["-c", "2048", "-np", "1"]);
    let prompt = "the quick brown fox jumps over the lazy dog";
    let mut processed = 0;
    let mut cached = 0;
    let mut predicted = 0;
    for n_predict in [1, 5] {
        let reply = d
            .ok(
                "/completion",
                json!({"prompt": prompt, "n_predict": n_predict}),
            )
            .await;
        let t = &reply["timings"];
        processed += t["prompt_n"].as_u64().unwrap();
        cached += t["cache_n"].as_u64().unwrap();
        predicted += t["predicted_n"].as_u64().unwrap();
        if t["predicted_n"] == json!(1) {
            // The first token comes from the prompt's logits: no generation rate yet.
            assert_eq!(t["predicted_per_second"], json!(0.0), "{t}");
        }
    }
    assert!(
        cached > 0,
        "the second request reuses the first one's prompt"
    );
    assert_eq!(
        d.metric("llamacpp:prompt_tokens_total").await,
        processed as f64
    );
    assert_eq!(
        d.metric("llamacpp:prompt_tokens_cached_total").await,
        cached as f64
    );
    assert_eq!(
        d.metric("llamacpp:tokens_predicted_total").await,
        predicted as f64
    );
    assert!(d.metric("llamacpp:n_decode_total").await > 0.0);
    assert!(
        d.metric("kvsnap_decode_calls_total").await > 0.0,
        "kvsnap's own stay"
    );

    let head = raw_head(&d, "/metrics");
    assert!(head.contains("\r\nProcess-Start-Time-Unix: "), "{head}");
    assert!(head.contains("\r\nContent-Type: "), "{head}");
}

#[tokio::test]
async fn grammars_and_json_schemas_hold_the_output() {
    let d = Daemon::start(&["-c", "4096", "-np", "2"]);
    let user = json!([{"role": "user", "content": "Does not matter what I say, does it?"}]);
    let reply = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": 8, "grammar": "root ::= \"a\"{5,5}"}),
        )
        .await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        json!("aaaaa"),
        "{reply}"
    );

    let reply = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": 8, "json_schema": {"const": "42"}}),
        )
        .await;
    assert_eq!(
        reply["choices"][0]["message"]["content"],
        json!("\"42\""),
        "{reply}"
    );

    // JSON mode: an object, parseable, within the limit.
    let reply = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": user, "max_tokens": 60, "seed": 3,
                   "response_format": {"type": "json_schema", "json_schema": {"schema": {
                       "type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
                       "required": ["name"], "additionalProperties": false}}}}),
        )
        .await;
    let content = reply["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}"));
    assert!(parsed["name"].is_string(), "{content}");

    // On /completion too, and streamed.
    let chunks = stream(
        &d,
        "/completion",
        json!({"prompt": "Answer:", "n_predict": 8, "stream": true, "grammar": "root ::= (\"yes\" | \"no\")"}),
    )
    .await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["content"].as_str())
        .collect();
    assert!(text == "yes" || text == "no", "{text}");

    for (field, value) in [
        ("grammar", json!("root ::= this is (not valid GBNF")),
        ("response_format", json!({"type": "sound"})),
        (
            "response_format",
            json!({"type": "json_object", "schema": 123}),
        ),
        (
            "response_format",
            json!({"type": "json_object", "schema": {"type": "hiccup"}}),
        ),
    ] {
        let (status, body) = d
            .post(
                "/v1/chat/completions",
                json!({"messages": user, "max_tokens": 4, field: value}),
            )
            .await;
        assert_eq!(status, 400, "{field} {value}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 20,
            "{body}"
        );
    }
}

/// A conversation whose next turn is held to a grammar continues exactly after a restart: the
/// grammar only masks, the conversation's own random stream chooses.
#[tokio::test]
async fn a_constrained_turn_after_a_restart_is_the_turn_without_one() {
    let grammar = "root ::= [a-z ]{10,40} \".\"";
    let turn = |session: &str, content: &str, seed: Option<u64>| {
        let mut body = json!({"session_id": session, "max_tokens": 48, "temperature": 1.0,
            "messages": [{"role": "user", "content": content}], "grammar": grammar});
        if let Some(seed) = seed {
            body["seed"] = json!(seed);
        }
        body
    };
    let session = uuid::Uuid::new_v4().to_string();
    let first = "Describe the sea in one sentence.";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let flags = ["-c", "4096", "-np", "1"];

    // Uninterrupted: two turns in a row.
    let straight = Daemon::start(&flags);
    let a = straight
        .ok("/v1/chat/completions", turn(&session, first, Some(7)))
        .await;
    let reply_a = a["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let history = |reply: &str| {
        json!([{"role": "user", "content": first}, {"role": "assistant", "content": reply},
               {"role": "user", "content": "And the sky?"}])
    };
    let mut second = turn(&session, "", None);
    second["messages"] = history(&reply_a);
    let straight_second = straight.ok("/v1/chat/completions", second.clone()).await;
    drop(straight);

    // Interrupted: the same first turn, a kill -9, a new daemon, the same second turn.
    let d = Daemon::start_on(dir.path(), &data, &flags);
    let b = d
        .ok("/v1/chat/completions", turn(&session, first, Some(7)))
        .await;
    assert_eq!(b["choices"][0]["message"]["content"], json!(reply_a));
    d.kill_9();
    let d = Daemon::start_on(dir.path(), &data, &flags);
    let resumed_second = d.ok("/v1/chat/completions", second).await;
    assert_eq!(
        resumed_second["choices"][0]["message"]["content"],
        straight_second["choices"][0]["message"]["content"],
    );
    assert!(
        resumed_second["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn probabilities_and_logit_bias() {
    let d = Daemon::start(&["-c", "2048", "-np", "1"]);
    let prompt = "I believe the meaning of life is";
    let reply = d
        .ok(
            "/completion",
            json!({"prompt": prompt, "n_probs": 10, "temperature": 0, "n_predict": 5}),
        )
        .await;
    let probs = reply["completion_probabilities"].as_array().unwrap();
    assert_eq!(probs.len(), 5, "{reply}");
    for entry in probs {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 10, "{entry}");
        // Greedy: the token chosen is the likeliest.
        assert_eq!(entry["id"], top[0]["id"], "{entry}");
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        assert!(entry["bytes"].is_array() && entry["token"].is_string());
    }

    let reply = d
        .ok(
            "/completion",
            json!({"prompt": prompt, "n_probs": 10, "temperature": 1.0,
                                  "n_predict": 5, "seed": 1, "post_sampling_probs": true}),
        )
        .await;
    for entry in reply["completion_probabilities"].as_array().unwrap() {
        let p = entry["prob"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0, "{entry}");
        let top = entry["top_probs"].as_array().unwrap();
        assert!(
            top.iter().all(|t| t["prob"].as_f64().unwrap() > 0.0),
            "{entry}"
        );
        // The candidates left after top-k/top-p/min-p, likeliest first; the chosen token is one
        // of them, not necessarily among the ten listed.
        let listed: Vec<f64> = top.iter().map(|t| t["prob"].as_f64().unwrap()).collect();
        assert!(listed.windows(2).all(|w| w[0] >= w[1]), "{entry}");
        assert!(p <= listed[0] + 1e-6, "{entry}");
        assert!(listed.iter().sum::<f64>() <= 1.0 + 1e-4, "{entry}");
    }

    let chunks = stream(
        &d,
        "/completion",
        json!({"prompt": prompt, "n_probs": 3, "temperature": 0, "n_predict": 4, "stream": true}),
    )
    .await;
    for chunk in chunks
        .iter()
        .filter(|c| c["stop"] == json!(false) && c.get("prompt_progress").is_none())
    {
        assert_eq!(
            chunk["completion_probabilities"].as_array().unwrap().len(),
            1,
            "{chunk}"
        );
    }

    // OpenAI's logprobs: one entry per token, whose texts make the reply.
    let messages = json!([{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]);
    let reply = d
        .ok(
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": 5, "temperature": 0,
                                           "logprobs": true, "top_logprobs": 4}),
        )
        .await;
    let choice = &reply["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    let joined: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(json!(joined), choice["message"]["content"], "{reply}");
    assert!(
        content
            .iter()
            .all(|t| t["top_logprobs"].as_array().unwrap().len() == 4)
    );

    // logit_bias: the greedy first token, banned in each of llama-server's forms, never comes.
    let greedy = d
        .ok(
            "/completion",
            json!({"prompt": prompt, "temperature": 0, "n_predict": 1, "return_tokens": true}),
        )
        .await;
    let banned = greedy["tokens"][0].as_i64().unwrap();
    let text = greedy["content"].as_str().unwrap().to_string();
    for bias in [
        json!({ banned.to_string(): -100 }),
        json!([[banned, -100]]),
        json!([[banned, false]]),
        json!({ text.clone(): false }),
    ] {
        let reply = d
            .ok(
                "/completion",
                json!({"prompt": prompt, "temperature": 0, "n_predict": 1,
                                      "return_tokens": true, "logit_bias": bias}),
            )
            .await;
        assert_ne!(
            reply["tokens"][0].as_i64().unwrap(),
            banned,
            "{bias}: {reply}"
        );
    }
    let (status, body) = d
        .post(
            "/completion",
            json!({"prompt": prompt, "logit_bias": {"99999999": -1}}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn prompts_replies_and_streams_in_llama_servers_shapes() {
    let d = Daemon::start(&["-c", "1024", "-np", "1", "-b", "16"]);
    let tokens = d
        .ok(
            "/tokenize",
            json!({"content": "What is the capital of France?", "add_special": true}),
        )
        .await["tokens"]
        .clone();

    // Token ids, two prompts at once (an array of answers), texts and ids mixed, objects.
    let base = json!({"temperature": 0, "n_predict": 4});
    let with = |prompt: Value| {
        let mut body = base.clone();
        body["prompt"] = prompt;
        body
    };
    let one = d.ok("/completion", with(tokens.clone())).await;
    let two = d
        .ok("/completion", with(json!([tokens.clone(), tokens.clone()])))
        .await;
    assert_eq!(two.as_array().unwrap().len(), 2, "{two}");
    assert_eq!(two[0]["content"], one["content"]);
    assert_eq!(two[1]["content"], one["content"]);
    let object = d
        .ok(
            "/completion",
            with(json!({"prompt_string": "What is the capital of France?"})),
        )
        .await;
    assert_eq!(object["content"], one["content"]);
    let mixed = d
        .ok(
            "/completion",
            with(json!([tokens[0], tokens[1], " capital", tokens[4]])),
        )
        .await;
    assert!(mixed["content"].is_string(), "{mixed}");
    let (status, _) = d
        .post(
            "/completion",
            with(json!({"prompt_string": "x", "multimodal_data": ["AAAA"]})),
        )
        .await;
    assert_eq!(status, 400);

    // Pieces: text where whole, each token's own.
    let pieces = d
        .ok(
            "/tokenize",
            json!({"content": "Hello world 🌍", "with_pieces": true}),
        )
        .await;
    let pieces = pieces["tokens"].as_array().unwrap();
    assert!(
        pieces
            .iter()
            .all(|p| p["id"].is_i64() && !p["piece"].is_null()),
        "{pieces:?}"
    );
    assert!(
        pieces.iter().any(|p| p["piece"] == json!(" world")),
        "{pieces:?}"
    );

    // Chat validation.
    let user = json!({"role": "user", "content": "Hi"});
    let assistant = json!({"role": "assistant", "content": "Hello"});
    let (status, _) = d
        .post(
            "/chat/completions",
            json!({"messages": [user, assistant, assistant]}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = d
        .post(
            "/chat/completions",
            json!({"messages": [user, assistant], "add_generation_prompt": true,
                                          "continue_final_message": true}),
        )
        .await;
    assert_eq!(status, 400);
    // A last assistant message is continued, and __verbose shows the prompt as rendered.
    let prefill = d
        .ok(
            "/chat/completions",
            json!({"messages": [user, {"role": "assistant", "content": "Whill"}],
                                        "max_tokens": 2, "verbose": true}),
        )
        .await;
    let rendered = prefill["__verbose"]["prompt"].as_str().unwrap();
    assert!(
        rendered.ends_with("<start_of_turn>model\nWhill"),
        "{rendered}"
    );
    let quiet = d
        .ok(
            "/chat/completions",
            json!({"messages": [user], "max_tokens": 1}),
        )
        .await;
    assert!(quiet.get("__verbose").is_none());

    // Several choices.
    let choices = d
        .ok(
            "/chat/completions",
            json!({"messages": [user], "max_tokens": 3, "n": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(choices["choices"].as_array().unwrap().len(), 2, "{choices}");

    // The context exceeded: llama-server's error fields.
    let long = "word ".repeat(2000);
    let (status, body) = d
        .post(
            "/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["type"],
        json!("exceed_context_size_error"),
        "{body}"
    );
    assert_eq!(body["error"]["n_ctx"], json!(1024), "{body}");
    assert!(
        body["error"]["n_prompt_tokens"].as_u64().unwrap() > 1024,
        "{body}"
    );

    // Streams: the first chat delta names the role with null content; progress reports while
    // a prompt longer than one batch is evaluated, the first before any work; timings per token.
    let chunks = stream(
        &d,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Tell me about the sea and the ships that sail on it."}],
               "max_tokens": 4, "stream": true, "return_progress": true, "timings_per_token": true,
               "stream_options": {"include_usage": true}, "cache_prompt": false}),
    )
    .await;
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    let progress: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c.get("prompt_progress"))
        .collect();
    assert!(progress.len() > 2, "{chunks:?}");
    assert_eq!(progress[0]["processed"], progress[0]["cache"]);
    let last = progress.last().unwrap();
    assert_eq!(last["processed"], last["total"], "{progress:?}");
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["delta"]["content"].is_string()
                && c["timings"]["predicted_n"].is_u64())
    );
    let usage = chunks.iter().find(|c| c.get("usage").is_some()).unwrap();
    assert!(
        usage["timings"]["prompt_per_second"].as_f64().unwrap() > 0.0,
        "{usage}"
    );
}

/// A slot that filled its whole context can be saved and restored into an identical one.
#[tokio::test]
async fn a_full_slot_restores_into_an_identical_one() {
    let dir = tempfile::tempdir().unwrap();
    let slots = dir.path().join("slots");
    std::fs::create_dir(&slots).unwrap();
    let d = Daemon::start(&[
        "-c",
        "256",
        "-np",
        "1",
        "--slot-save-path",
        slots.to_str().unwrap(),
    ]);
    let reply = d
        .ok(
            "/completion",
            json!({"prompt": "Once upon a time", "n_predict": -1, "ignore_eos": true,
                                  "temperature": 0, "id_slot": 0}),
        )
        .await;
    assert_eq!(reply["stop_type"], json!("limit"), "{reply}");
    let saved = d
        .ok("/slots/0?action=save", json!({"filename": "full.bin"}))
        .await;
    assert_eq!(saved["n_saved"], json!(256), "{saved}");
    d.ok("/slots/0?action=erase", json!({})).await;
    let restored = d
        .ok("/slots/0?action=restore", json!({"filename": "full.bin"}))
        .await;
    assert_eq!(restored["n_restored"], json!(256), "{restored}");
}
