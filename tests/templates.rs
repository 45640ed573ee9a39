//! `--jinja` on the real SmolLM2 and HTTP server: a chat rendered by the template's own Jinja
//! text (minijinja) is what llama.cpp's built-in rendering gives where both implement the same
//! template; where they differ (SmolLM2's template adds a system prompt of its own), `--jinja`
//! renders what the template says, as llama-server's `--jinja` does; and an earlier reply's
//! thinking reaches a template that shows it, from OpenAI's `reasoning_content` and from
//! Anthropic's thinking blocks.

mod common;

use common::{Daemon, long_prose, smollm2_path};
use serde_json::{Value, json};

fn thinking_template() -> String {
    format!(
        "{}/tests/fixtures/templates/thinking-chatml.jinja",
        env!("CARGO_MANIFEST_DIR")
    )
}

async fn prompt(daemon: &Daemon, messages: Value) -> String {
    let reply = daemon
        .ok("/apply-template", json!({ "messages": messages }))
        .await;
    reply["prompt"].as_str().expect("a prompt").to_string()
}

#[tokio::test]
async fn jinja_renders_the_models_own_template_as_llama_cpp_does() {
    let with_system = json!([
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ]);
    let without_system = json!([{"role": "user", "content": "Name a colour."}]);

    let built_in = Daemon::start_with_model(&smollm2_path(), &["-c", "2048", "-np", "1"]);
    let built_in_prompts = (
        prompt(&built_in, with_system.clone()).await,
        prompt(&built_in, without_system.clone()).await,
    );
    drop(built_in);

    let jinja = Daemon::start_with_model(&smollm2_path(), &["-c", "2048", "-np", "1", "--jinja"]);
    // The same ChatML, from llama.cpp's built-in and from the model's Jinja text.
    assert_eq!(prompt(&jinja, with_system).await, built_in_prompts.0);
    // SmolLM2's template gives a conversation without one a system prompt of its own; the
    // built-in ChatML does not.
    let own = prompt(&jinja, without_system).await;
    assert!(
        own.starts_with("<|im_start|>system\n") && !built_in_prompts.1.contains("system"),
        "{own:?} against {:?}",
        built_in_prompts.1
    );
    assert!(own.ends_with("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"));
    // A turn reads the prompt the template rendered.
    let reply = jinja
        .ok(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Name a colour."}],
                   "max_tokens": 4, "temperature": 0}),
        )
        .await;
    let counted = jinja
        .ok(
            "/chat/completions/input_tokens",
            json!({"messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .await;
    assert_eq!(reply["usage"]["prompt_tokens"], counted["input_tokens"]);
}

#[tokio::test]
async fn an_earlier_replys_thinking_reaches_a_template_that_shows_it() {
    let template = thinking_template();
    let daemon = Daemon::start_jinja(&template, &[]);
    let rendered = prompt(
        &daemon,
        json!([
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "Yes.", "reasoning_content": " Only 1 and 7 divide it. "},
            {"role": "user", "content": "And 9?"},
        ]),
    )
    .await;
    assert_eq!(
        rendered,
        "<|im_start|>user\nIs 7 prime?<|im_end|>\n<|im_start|>assistant\n<think>\nOnly 1 and 7 \
         divide it.\n</think>\n\nYes.<|im_end|>\n<|im_start|>user\nAnd 9?<|im_end|>\n\
         <|im_start|>assistant\n"
    );

    // Anthropic's thinking blocks are the same reasoning.
    let history = |thinking: bool| {
        let mut blocks = vec![json!({"type": "text", "text": "Yes."})];
        if thinking {
            blocks.insert(
                0,
                json!({"type": "thinking", "thinking": "Only 1 and 7 divide it.", "signature": ""}),
            );
        }
        json!({"model": "m", "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": blocks},
            {"role": "user", "content": "And 9?"},
        ]})
    };
    let count = |body: Value| {
        let daemon = &daemon;
        async move {
            daemon.ok("/v1/messages/count_tokens", body).await["input_tokens"]
                .as_u64()
                .expect("a count")
        }
    };
    let with_thinking = count(history(true)).await;
    let without = count(history(false)).await;
    assert!(
        with_thinking > without + 5,
        "{with_thinking} tokens with the thinking, {without} without"
    );

    // A template that refuses the messages is a 400 with its sentence, not a failure.
    let dir = tempfile::tempdir().expect("temp dir");
    let strict = dir.path().join("strict.jinja");
    std::fs::write(
        &strict,
        "{% if messages[0].role != 'user' %}{{ raise_exception('Start with a user message') }}\
         {% endif %}x",
    )
    .expect("write a template");
    let strict = strict.to_string_lossy().into_owned();
    let strict_daemon = Daemon::start_jinja(&strict, &[]);
    let (status, body) = strict_daemon
        .post(
            "/apply-template",
            json!({"messages": [{"role": "assistant", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("Start with a user message"),
        "{body}"
    );
}

fn tools_template() -> String {
    format!(
        "{}/tests/fixtures/templates/hermes-tools-chatml.jinja",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The model is held to one call by a grammar: a 135M model does not call tools reliably on
/// its own, and what is tested here is what kvsnap makes of a call.
const ONE_CALL: &str = r#"root ::= "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"" ("Oslo" | "Paris") "\"}}\n</tool_call>""#;

/// A tool with a long description, as real tool lists have: the prompt then spans grid
/// boundaries where kvsnap keeps exact checkpoints (`PREFIX_GRID`).
fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": format!("The weather in a city. {}", long_prose(220)),
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }})
}

fn tools_daemon() -> Daemon {
    let template = tools_template();
    Daemon::start_jinja(&template, &[])
}

#[tokio::test]
async fn a_replys_tool_call_comes_back_as_openai_tool_calls_and_the_next_turn_restores_an_exact_checkpoint()
 {
    let daemon = tools_daemon();
    let question = json!([{"role": "user", "content": "What is the weather in Oslo?"}]);
    let request = json!({
        "messages": question, "tools": [weather_tool()], "grammar": ONE_CALL,
        "max_tokens": 64, "temperature": 0,
    });
    // The tools are in the prompt the template rendered.
    let rendered = prompt_with_tools(&daemon, question.clone()).await;
    assert!(
        rendered.contains("<tools>\n{\"function\": {\"description\": \"The weather in a city."),
        "{rendered}"
    );

    let reply = daemon.ok("/v1/chat/completions", request.clone()).await;
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{reply}");
    assert_eq!(choice["message"]["content"], Value::Null, "{reply}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(
        call["function"]["arguments"]
            .as_str()
            .expect("arguments text"),
    )
    .expect("arguments as JSON");
    let city = arguments["city"].as_str().expect("a city").to_string();
    assert!(["Oslo", "Paris"].contains(&city.as_str()), "{arguments}");
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_"))
    );

    // Streamed, the same call arrives as a tool_calls delta and no text shows the markup.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let chunks = daemon.sse("/v1/chat/completions", streamed).await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "", "{chunks:?}");
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(deltas.len(), 1, "{chunks:?}");
    assert_eq!(deltas[0]["function"]["name"], "get_weather");
    assert_eq!(
        deltas[0]["function"]["arguments"],
        call["function"]["arguments"]
    );
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .next_back();
    assert_eq!(finish, Some("tool_calls"));

    // A history that ends with the call is a whole reply, not a beginning to continue.
    let ending_with_the_call = prompt_with_tools(
        &daemon,
        json!([
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
        ]),
    )
    .await;
    assert!(
        ending_with_the_call.ends_with("</tool_call><|im_end|>\n<|im_start|>assistant\n"),
        "{ending_with_the_call}"
    );

    // The client runs the tool and sends the call back with its result. The template renders
    // the call's text as the model wrote it, but not its tokens: under the grammar the model
    // wrote ` {` `"` where the tokenizer writes ` {"`. A prompt that names no conversation
    // reuses a state only where that is exact, so the turn restores the first prompt's last
    // exact checkpoint (a grid boundary) and reads the rest.
    let first_prompt = reply["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(first_prompt >= 256, "{first_prompt} prompt tokens");
    let next = json!({
        "messages": [
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": format!("{city}: 4 C, rain")},
        ],
        "tools": [weather_tool()], "max_tokens": 8, "temperature": 0,
    });
    let answer = daemon.ok("/v1/chat/completions", next).await;
    let cached = answer["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        cached >= first_prompt / 128 * 128 && cached <= first_prompt,
        "the turn after the call: {cached} cached of {answer}"
    );
}

async fn prompt_with_tools(daemon: &Daemon, messages: Value) -> String {
    let reply = daemon
        .ok(
            "/apply-template",
            json!({ "messages": messages, "tools": [weather_tool()] }),
        )
        .await;
    reply["prompt"].as_str().expect("a prompt").to_string()
}

#[tokio::test]
async fn a_replys_tool_call_comes_back_as_an_anthropic_tool_use_block() {
    let daemon = tools_daemon();
    let request = json!({
        "model": "m", "max_tokens": 64, "temperature": 0, "grammar": ONE_CALL,
        "tools": [{"name": "get_weather", "description": "The weather in a city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
    });
    let reply = daemon.ok("/v1/messages", request.clone()).await;
    assert_eq!(reply["stop_reason"], "tool_use", "{reply}");
    let blocks = reply["content"].as_array().expect("content blocks");
    assert_eq!(blocks.len(), 1, "{reply}");
    assert_eq!(blocks[0]["type"], "tool_use");
    assert_eq!(blocks[0]["name"], "get_weather");
    assert!(blocks[0]["input"]["city"].is_string(), "{reply}");
    assert!(
        blocks[0]["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("toolu_"))
    );

    // Streamed: the tool_use block, its input as one JSON delta.
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let events = daemon.sse("/v1/messages", streamed).await;
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "content_block_start")
        .collect();
    // A reply that is a call alone has no text block: the call is block 0.
    assert_eq!(starts.len(), 1, "{events:?}");
    assert_eq!(starts[0]["index"], 0);
    assert_eq!(starts[0]["content_block"]["type"], "tool_use");
    let input: String = events
        .iter()
        .filter(|e| e["delta"]["type"] == "input_json_delta")
        .filter_map(|e| e["delta"]["partial_json"].as_str())
        .collect();
    let input: Value = serde_json::from_str(&input).expect("the input as JSON");
    assert_eq!(input, blocks[0]["input"]);
    let delta = events
        .iter()
        .find(|e| e["type"] == "message_delta")
        .expect("message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
}
