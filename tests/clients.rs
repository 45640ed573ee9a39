//! The official client SDKs of the APIs kvsnap serves, against the real daemon on the test
//! model (installed by `make sdk` under .cache/sdk): Anthropic's Python SDK drives
//! `/v1/messages` through `tests/clients/anthropic_sdk.py`, OpenAI's drives `/v1/responses`
//! through `tests/clients/openai_sdk.py`; each prints what it saw.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Daemon;
use serde_json::{Value, json};

/// Runs one of tests/clients/*.py with the SDKs on its path and reads the JSON it prints.
fn sdk(script: &str, args: &[&str]) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg(root.join("tests/clients").join(script))
        .args(args)
        .env("PYTHONPATH", root.join(".cache/sdk"))
        .output()
        .expect("run python3");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} {args:?} failed (run `make sdk` first if the SDK is missing):\n{stderr}"
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}

fn text(message: &Value) -> &str {
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["role"], "assistant", "{message}");
    assert_eq!(message["content"][0]["type"], "text", "{message}");
    message["content"][0]["text"].as_str().expect("text")
}

/// The event types a streamed answer's SDK saw (`ignored` left out) are `opening`, one or more
/// `delta`, then `closing`.
fn assert_in_order(
    seen: &Value,
    opening: &[&str],
    delta: &str,
    closing: &[&str],
    ignored: &[&str],
) {
    let events: Vec<&str> = seen
        .as_array()
        .expect("events")
        .iter()
        .filter_map(Value::as_str)
        .filter(|e| !ignored.contains(e))
        .collect();
    let deltas = events.iter().filter(|e| **e == delta).count();
    assert!(deltas > 0, "no {delta}: {events:?}");
    let mut expected = opening.to_vec();
    expected.extend(std::iter::repeat_n(delta, deltas));
    expected.extend(closing);
    assert_eq!(events, expected);
}

/// Prompt tokens as Anthropic counts them: those read now plus those read from a cache.
fn prompt_tokens(message: &Value) -> u64 {
    let usage = &message["usage"];
    usage["input_tokens"].as_u64().expect("input_tokens")
        + usage["cache_read_input_tokens"]
            .as_u64()
            .expect("cache read")
}

#[test]
fn anthropic_sdk_reads_every_answer_of_the_messages_api() {
    let daemon = Daemon::start(&["--api-key", "user-key"]);
    let seen = sdk("anthropic_sdk.py", &["tour", &daemon.base, "user-key"]);

    let made = &seen["made"];
    let answer = text(made);
    assert!(answer.len() >= 3, "a short answer: {made}");
    assert!(made["usage"]["output_tokens"].as_u64() > Some(0), "{made}");
    assert!(
        ["end_turn", "max_tokens"].contains(&made["stop_reason"].as_str().unwrap_or("")),
        "{made}"
    );
    // count_tokens counts the prompt exactly as the turn read it.
    assert_eq!(
        Some(prompt_tokens(made)),
        seen["counted"].as_u64(),
        "{seen}"
    );

    // The same greedy request streamed: the SDK assembles the same message from the events,
    // in Anthropic's order, having read its prompt's beginning from the cache this time.
    let streamed = &seen["streamed"];
    assert_eq!(text(streamed), answer, "{seen}");
    assert_eq!(prompt_tokens(streamed), prompt_tokens(made), "{seen}");
    assert!(
        streamed["usage"]["cache_read_input_tokens"].as_u64() > Some(0),
        "the second identical request read nothing from the cache: {streamed}"
    );
    // The SDK's own "text" events repeat the deltas.
    assert_in_order(
        &seen["events"],
        &["message_start", "content_block_start"],
        "content_block_delta",
        &["content_block_stop", "message_delta", "message_stop"],
        &["text"],
    );

    // A stop sequence ends the turn where it starts, and is named.
    let stopped = &seen["stopped"];
    assert_eq!(stopped["stop_reason"], "stop_sequence", "{stopped}");
    assert_eq!(stopped["stop_sequence"], json!(&answer[..3]), "{stopped}");
    assert_eq!(text(stopped), "", "{stopped}");

    // Refusals arrive as the SDK's own exceptions, with kvsnap's sentence.
    let image = &seen["image_error"];
    assert_eq!(image["class"], "BadRequestError", "{image}");
    assert_eq!(image["type"], "invalid_request_error", "{image}");
    let sentence = image["message"].as_str().unwrap_or("");
    assert!(sentence.contains("image input is not supported"), "{image}");
    let bad_key = &seen["bad_key_error"];
    assert_eq!(bad_key["class"], "AuthenticationError", "{bad_key}");
    assert_eq!(bad_key["status"], 401, "{bad_key}");
    assert_eq!(bad_key["type"], "authentication_error", "{bad_key}");
}

/// Three questions asked one after another through `turn` (which keeps whatever names the
/// conversation); `restart` runs between the second and third.
fn three_turns(
    mut daemon: Daemon,
    restart: impl Fn(Daemon) -> Daemon,
    mut turn: impl FnMut(&Daemon, &str) -> Value,
) -> Vec<Value> {
    let questions = [
        "Tell me about the sea.",
        "And about the sky?",
        "And about the mountains?",
    ];
    let mut replies = Vec::new();
    for (index, question) in questions.into_iter().enumerate() {
        if index == 2 {
            daemon = restart(daemon);
        }
        replies.push(turn(&daemon, question));
    }
    replies
}

/// The same three turns on a daemon left alone and on one `kill -9`'d and restarted on its
/// store before the third: what each reply says and reads from the cache.
fn uninterrupted_and_killed<T: FnMut(&Daemon, &str) -> Value>(
    new_turn: impl Fn() -> T,
) -> (Vec<Value>, Vec<Value>) {
    let uninterrupted = three_turns(Daemon::start(&[]), |daemon| daemon, new_turn());
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("kvsnap.redb");
    let workdir = dir.path().to_path_buf();
    let restart = |daemon: Daemon| {
        daemon.kill_9();
        Daemon::start_on(&workdir, &data, &[])
    };
    let killed = three_turns(Daemon::start_on(&workdir, &data, &[]), restart, new_turn());
    (uninterrupted, killed)
}

/// A turn of a conversation named by `X-Session-Id`, sent as Anthropic's clients send it: the
/// whole history every time.
fn anthropic_turn() -> impl FnMut(&Daemon, &str) -> Value {
    let session = uuid::Uuid::new_v4().to_string();
    let mut history: Vec<Value> = Vec::new();
    move |daemon, question| {
        history.push(json!({ "role": "user", "content": question }));
        let messages = serde_json::to_string(&history).expect("json");
        let reply = sdk(
            "anthropic_sdk.py",
            &["turn", &daemon.base, "none", &session, &messages],
        );
        history.push(json!({ "role": "assistant", "content": text(&reply) }));
        reply
    }
}

#[test]
fn a_conversation_through_the_anthropic_sdk_survives_kill_9_exactly() {
    let (uninterrupted, killed) = uninterrupted_and_killed(anthropic_turn);
    for (turn, (a, b)) in uninterrupted.iter().zip(&killed).enumerate() {
        assert_eq!(text(a), text(b), "turn {}: {a} / {b}", turn + 1);
        assert_eq!(a["usage"], b["usage"], "turn {}", turn + 1);
    }
    // The third turn read its history from the store, not again: everything the second turn's
    // prompt held came from the cache.
    let third = &killed[2]["usage"];
    assert!(
        third["cache_read_input_tokens"].as_u64() >= Some(prompt_tokens(&killed[1])),
        "{third} after {}",
        killed[1]["usage"]
    );
}

#[test]
fn openai_sdk_reads_every_answer_of_the_responses_api() {
    let daemon = Daemon::start(&["--api-key", "key-a,key-b"]);
    let seen = sdk("openai_sdk.py", &["tour", &daemon.base, "key-a"]);
    let first = &seen["first"];
    let first_id = first["id"].as_str().expect("id");
    assert!(first_id.starts_with("resp_"), "{first}");
    assert!(
        first["output"][0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    let first_text = seen["first_text"].as_str().expect("text");
    assert!(!first_text.is_empty(), "{first}");
    assert!(
        first["usage"]["output_tokens"].as_u64() > Some(0),
        "{first}"
    );

    // The same greedy request streamed: OpenAI's events in OpenAI's order, the deltas adding
    // up to the completed response's text, which is the first response's.
    let last = if first["status"] == "incomplete" {
        "response.incomplete"
    } else {
        "response.completed"
    };
    assert_in_order(
        &seen["events"],
        &[
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ],
        "response.output_text.delta",
        &[
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            last,
        ],
        &[],
    );
    assert_eq!(seen["gathered"], seen["completed_text"], "{seen}");
    assert_eq!(seen["completed_text"], first_text, "{seen}");

    // A response continuing the first reads the first's conversation from its state, and is
    // read back as it was answered.
    let second = &seen["second"];
    assert_eq!(second["previous_response_id"], first_id, "{second}");
    let cached = &second["usage"]["input_tokens_details"]["cached_tokens"];
    assert!(
        cached.as_u64() >= first["usage"]["input_tokens"].as_u64(),
        "the continuation read its history again: {second}"
    );
    assert_eq!(seen["read_back"]["id"], second["id"]);
    assert_eq!(seen["read_back_text"], seen["second_text"]);
    assert_eq!(seen["read_back"]["usage"], second["usage"]);

    // store: false keeps no response; a deleted one is gone and its source stays; an unknown
    // one cannot be continued.
    assert_eq!(seen["transient"]["store"], false);
    for refused in ["transient_error", "deleted_error", "unknown_previous_error"] {
        let error = &seen[refused];
        assert_eq!(error["class"], "NotFoundError", "{refused}: {error}");
        assert_eq!(error["status"], 404, "{refused}: {error}");
    }
    assert_eq!(seen["first_still"], first_text);

    // To another key the first response does not exist.
    let other = sdk("openai_sdk.py", &["other", &daemon.base, "key-b", first_id]);
    for attempt in ["read", "continued", "deleted"] {
        assert_eq!(other[attempt]["status"], 404, "{attempt}: {other}");
    }
}

/// A response continuing the one before it, by `previous_response_id`.
fn openai_turn() -> impl FnMut(&Daemon, &str) -> Value {
    let mut previous = "-".to_string();
    move |daemon, question| {
        let reply = sdk(
            "openai_sdk.py",
            &["turn", &daemon.base, "none", &previous, question],
        );
        previous = reply["id"].as_str().expect("id").to_string();
        reply
    }
}

#[test]
fn a_response_chain_survives_kill_9_exactly() {
    let (uninterrupted, killed) = uninterrupted_and_killed(openai_turn);
    for (turn, (a, b)) in uninterrupted.iter().zip(&killed).enumerate() {
        assert_eq!(a["text"], b["text"], "turn {}: {a} / {b}", turn + 1);
        assert_eq!(a["usage"], b["usage"], "turn {}", turn + 1);
    }
    // After the restart, the third response read everything the second's prompt held from
    // the second's stored state.
    let third = &killed[2]["usage"];
    assert!(
        third["input_tokens_details"]["cached_tokens"].as_u64()
            >= killed[1]["usage"]["input_tokens"].as_u64(),
        "{third} after {}",
        killed[1]["usage"]
    );
}

/// One call to get_weather, the reply held to it by a grammar: the test model does not call
/// tools on its own, and what is tested is what the SDKs make of kvsnap's answer.
const ONE_CALL: &str = r#"root ::= "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" ("Oslo" | "Paris") "\"}}\n</tool_call>""#;

/// SmolLM2 with a Hermes-form tool template under `--jinja`.
fn tools_daemon() -> Daemon {
    let template = format!(
        "{}/tests/fixtures/templates/hermes-tools-chatml.jinja",
        env!("CARGO_MANIFEST_DIR")
    );
    Daemon::start_jinja(&template, &["--api-key", "user-key"])
}

#[test]
fn anthropic_sdk_reads_a_tool_call_and_sends_its_result_back() {
    let daemon = tools_daemon();
    let seen = sdk(
        "anthropic_sdk.py",
        &["tools", &daemon.base, "user-key", ONE_CALL],
    );
    for shape in ["made", "streamed"] {
        let message = &seen[shape];
        assert_eq!(message["stop_reason"], "tool_use", "{shape}: {message}");
        let call = &message["content"][0];
        assert_eq!(call["type"], "tool_use", "{shape}: {message}");
        assert_eq!(call["name"], "get_weather");
        // The SDK parsed the input (streamed: from its JSON delta) into an object.
        let city = call["input"]["city"].as_str().unwrap_or_default();
        assert!(["Oslo", "Paris"].contains(&city), "{shape}: {message}");
    }
    // The same call both ways (each call has an id of its own).
    let call = |shape: &str| {
        let blocks = seen[shape]["content"].as_array().expect("blocks").clone();
        assert_eq!(blocks.len(), 1, "{shape}: {blocks:?}");
        (blocks[0]["name"].clone(), blocks[0]["input"].clone())
    };
    assert_eq!(call("made"), call("streamed"));
    // The tool's result went back as a tool_result block and the model answered it.
    let answered = &seen["answered"];
    assert_eq!(answered["content"][0]["type"], "text", "{answered}");
    assert!(
        answered["usage"]["output_tokens"].as_u64() > Some(0),
        "{answered}"
    );
}

#[test]
fn openai_sdk_reads_a_tool_call_and_sends_its_result_back() {
    let daemon = tools_daemon();
    let seen = sdk(
        "openai_sdk.py",
        &["tools", &daemon.base, "user-key", ONE_CALL],
    );
    let mut arguments = Vec::new();
    for shape in ["made", "streamed"] {
        let choice = &seen[shape]["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{shape}: {choice}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function", "{shape}: {choice}");
        assert_eq!(call["function"]["name"], "get_weather");
        let parsed: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or_default())
                .expect("arguments as JSON");
        arguments.push(parsed);
    }
    assert_eq!(arguments[0], arguments[1]);
    assert!(arguments[0]["city"].is_string(), "{arguments:?}");
    let answered = &seen["answered"]["choices"][0];
    assert!(
        answered["message"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{answered}"
    );
}
