//! `POST /v1/chat/completions` and `POST /v1/completions`, as OpenAI's API has them.
//!
//! Extensions: `session_id` (or the `X-Session-Id` header) names the conversation, and the
//! llama-server sampling fields (`top_k`, `min_p`, `repeat_penalty`, …) are accepted.
//!
//! `tools` reach the model through a `--jinja` template that renders them; when that template
//! teaches the Hermes form, a reply's calls come back as `tool_calls` (`tool_calls.rs`).

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiJson, session_id};
use super::generate::{
    Collected, OutputFields, SamplingFields, StopField, collect, json_event, openai_logprobs,
    prompt_progress, sse_response, stop_strings, submit,
};
use super::native::timings_json;
use super::tool_calls;
use crate::completion::{Step, TextStream};
use crate::engine::{Chat, ChatMessage, GenerateRequest, ProbsRequest, Prompt};

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<StopField>,
    n: Option<u32>,
    session_id: Option<String>,
    /// llama-server's extension: `false` evaluates the whole prompt afresh.
    cache_prompt: Option<bool>,
    /// Report each token's log-probability, and this many likeliest alternatives.
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<usize>,
    /// `false` with `continue_final_message` continues the last assistant message.
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    output: OutputFields,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    content: Option<MessageContent>,
    /// An earlier reply's thinking, as llama-server takes it back (`--jinja` renders it).
    reasoning_content: Option<String>,
    /// An earlier reply's calls, OpenAI's shape (SDKs send `null` for none).
    tool_calls: Option<Vec<Value>>,
    /// A `tool` message's call.
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: PromptField,
    max_tokens: Option<i64>,
    /// llama-server's name for `max_tokens`.
    n_predict: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<StopField>,
    n: Option<u32>,
    session_id: Option<String>,
    cache_prompt: Option<bool>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    output: OutputFields,
}

/// A prompt as llama-server takes it: a text, token ids, texts and ids mixed in one list (one
/// prompt), `{"prompt_string": …}`, or a list of those (several prompts, one reply each).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct PromptField(Value);

impl PromptField {
    /// The prompts this field holds, in order.
    pub async fn into_prompts(self, state: &AppState) -> Result<Vec<Prompt>, ApiError> {
        match self.0 {
            Value::Array(items) if !is_one_mixed_prompt(&items) => {
                if items.len() > MAX_PROMPTS {
                    return Err(ApiError::bad_request(format!(
                        "prompt lists {} prompts; one request takes at most {MAX_PROMPTS} (they \
                         are answered one after another: send more requests instead)",
                        items.len()
                    )));
                }
                let mut prompts = Vec::with_capacity(items.len());
                for item in items {
                    prompts.push(one_prompt(state, item).await?);
                }
                if prompts.is_empty() {
                    return Err(ApiError::bad_request("prompt is an empty list"));
                }
                Ok(prompts)
            }
            value => Ok(vec![one_prompt(state, value).await?]),
        }
    }

    /// The one prompt this field holds; several are refused.
    pub async fn into_prompt(self, state: &AppState) -> Result<Prompt, ApiError> {
        let mut prompts = self.into_prompts(state).await?;
        if prompts.len() != 1 {
            return Err(ApiError::bad_request(
                "send exactly one prompt per request on this route",
            ));
        }
        Ok(prompts.remove(0))
    }
}

/// The most prompts one request lists: each is a whole generation, run one after another, so a
/// request may not hold the server for an unbounded number of them.
const MAX_PROMPTS: usize = 64;

/// A flat list of token ids and texts is one prompt (llama-server's mixed prompt); a list of
/// lists, objects or only texts is several.
fn is_one_mixed_prompt(items: &[Value]) -> bool {
    items.iter().all(|v| v.is_number() || v.is_string()) && items.iter().any(Value::is_number)
}

async fn one_prompt(state: &AppState, value: Value) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "prompt must be a text, a list of token ids, a list mixing ids and texts, or \
             {\"prompt_string\": text}",
        )
    };
    match value {
        Value::String(text) => Ok(Prompt::Text(text)),
        Value::Object(map) => {
            if map.contains_key("multimodal_data") {
                return Err(ApiError::bad_request(
                    "multimodal_data is not supported: kvsnap serves text-only models",
                ));
            }
            match map.get("prompt_string") {
                Some(Value::String(text)) => Ok(Prompt::Text(text.clone())),
                _ => Err(bad()),
            }
        }
        Value::Array(items) => {
            let mut tokens = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::Number(n) => {
                        let id = n.as_i64().and_then(|id| i32::try_from(id).ok());
                        tokens.push(id.ok_or_else(bad)?);
                    }
                    // The first text gets the model's start token, as a text prompt would.
                    Value::String(text) => {
                        tokens.extend(state.engine.tokenize(text, i == 0, true).await?)
                    }
                    _ => return Err(bad()),
                }
            }
            Ok(Prompt::Tokens(tokens))
        }
        _ => Err(bad()),
    }
}

/// The body of `/apply-template` and `/chat/completions/input_tokens`: a chat request, of which
/// only the messages count.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    messages: Vec<ChatMessageIn>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
}

impl MessagesRequest {
    fn chat(self) -> Result<Chat, ApiError> {
        Ok(Chat {
            tools: tool_calls::openai_tools(self.tools, self.tool_choice.as_ref())?,
            messages: chat_messages(self.messages)?,
        })
    }
}

/// llama-server's `POST /apply-template`: the prompt a chat request's messages render to.
pub async fn apply_template(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<MessagesRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = state.engine.render_chat(body.chat()?).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// llama-server's `POST /chat/completions/input_tokens`: how many tokens a chat request's
/// prompt holds, counted as the request itself would tokenize it.
pub async fn input_tokens(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<MessagesRequest>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.engine.chat_tokens(body.chat()?).await?;
    Ok(Json(json!({ "input_tokens": tokens.len() })))
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must hold at least one message",
        ));
    }
    let ends_with_two_replies = messages.len() >= 2
        && messages[messages.len() - 2..]
            .iter()
            .all(|m| m.role == "assistant");
    if ends_with_two_replies {
        return Err(ApiError::bad_request(
            "the messages end with two assistant messages in a row; merge them into one",
        ));
    }
    messages
        .into_iter()
        .map(|m| {
            if !ROLES.contains(&m.role.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "unknown message role {:?}; use one of {}",
                    m.role,
                    ROLES.join(", ")
                )));
            }
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                // Text parts are joined by a blank line, as llama.cpp renders them.
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        if part.kind != "text" {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type {:?} are not supported; send text",
                                part.kind
                            )));
                        }
                        if !text.is_empty() {
                            text.push_str("\n\n");
                        }
                        text.push_str(part.text.as_deref().unwrap_or_default());
                    }
                    text
                }
            };
            // Developer messages are the newer name for system messages.
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role
            };
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .iter()
                .enumerate()
                .map(|(index, call)| tool_calls::from_openai(index, call))
                .collect::<Result<_, _>>()?;
            Ok(ChatMessage {
                role,
                content,
                reasoning: m.reasoning_content.unwrap_or_default(),
                tool_calls,
                tool_call_id: m.tool_call_id.unwrap_or_default(),
            })
        })
        .collect()
}

fn max_tokens(value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        // llama-server's -1: no limit but the context.
        None | Some(-1) => Ok(None),
        Some(n) if n < 1 => Err(ApiError::bad_request(
            "max_tokens must be at least 1 (or -1 for no limit)",
        )),
        Some(n) => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
    }
}

fn single_choice(n: Option<u32>) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(_) => Err(ApiError::bad_request(
            "n must be 1: kvsnap returns one choice",
        )),
    }
}

fn usage(collected_prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": collected_prompt,
        "completion_tokens": completion,
        "total_tokens": collected_prompt + completion,
        "prompt_tokens_details": { "cached_tokens": cached },
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Echoes the conversation id back, so a client that did not name one learns nothing new but a
/// client that did can check it.
pub fn with_session_header(mut response: Response, session: Option<Uuid>) -> Response {
    if let Some(id) = session
        && let Ok(value) = HeaderValue::from_str(&id.to_string())
    {
        response.headers_mut().insert("x-session-id", value);
    }
    response
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let session = session_id(&headers, body.session_id.as_deref())?;
    if body.continue_final_message == Some(true) && body.add_generation_prompt == Some(true) {
        return Err(ApiError::bad_request(
            "continue_final_message and add_generation_prompt cannot both be true: the first \
             continues the last assistant message, the second starts a new one",
        ));
    }
    let choices = body.n.unwrap_or(1);
    if choices == 0 || choices > MAX_CHOICES {
        return Err(ApiError::bad_request(format!(
            "n must be between 1 and {MAX_CHOICES}"
        )));
    }
    if choices > 1 && (body.stream || session.is_some()) {
        return Err(ApiError::bad_request(
            "n above 1 takes neither stream nor a conversation (session_id)",
        ));
    }
    let (sampling, seed) = body.sampling.resolve(&state, session).await?;
    let chat = Chat {
        tools: tool_calls::openai_tools(body.tools, body.tool_choice.as_ref())?,
        messages: chat_messages(body.messages)?,
    };
    // Calls are read out of the reply only where the template taught the model their form.
    let read_calls = !chat.tools.is_empty() && state.engine.info().hermes_tool_calls;
    let verbose = body.output.verbose.unwrap_or(state.options.verbose);
    let rendered = if verbose {
        Some(state.engine.render_chat(chat.clone()).await?)
    } else {
        None
    };
    let probs = body.logprobs.then(|| ProbsRequest {
        n: body.top_logprobs.unwrap_or(0).min(MAX_TOP_LOGPROBS),
        after_sampling: false,
    });
    let request = GenerateRequest {
        session,
        prompt: Prompt::Chat(chat),
        max_tokens: state
            .options
            .token_limit(max_tokens(body.max_completion_tokens.or(body.max_tokens))?),
        sampling,
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: false,
        requester: caller.requester(),
        constraint: body.output.constraint()?,
        probs,
        stops: Vec::new(),
    };
    let stops = stop_strings(body.stop)?;
    let id = format!("chatcmpl-{}", Uuid::new_v4().simple());
    let model = super::info::model_id(&state);

    if body.stream {
        let stream = submit(&state, request, stops).await?;
        let shape = ChatStream {
            id,
            model,
            include_usage: body.stream_options.unwrap_or_default().include_usage,
            timings_per_token: body.output.timings_per_token,
            return_progress: body.output.return_progress,
            session,
            read_calls,
        };
        let response = stream_chat(stream, shape).into_response();
        return Ok(with_session_header(response, session));
    }
    // Several choices are generated one after another from the same request.
    let mut answers = Vec::new();
    for _ in 0..choices {
        let stream = submit(&state, request.clone(), stops.clone()).await?;
        answers.push(collect(stream).await?);
    }
    let choices_json: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let mut choice = json!({
                "index": index,
                "message": { "role": "assistant", "content": c.text },
                "finish_reason": c.finish.openai_reason(),
            });
            let reply = tool_calls::read_if(read_calls, c.text.clone());
            if !reply.calls.is_empty() {
                let calls: Vec<Value> = reply.calls.iter().map(tool_calls::openai_call).collect();
                let text = (!reply.text.is_empty()).then_some(reply.text);
                choice["message"] =
                    json!({ "role": "assistant", "content": text, "tool_calls": calls });
                choice["finish_reason"] = json!("tool_calls");
            }
            if body.logprobs {
                choice["logprobs"] =
                    json!({ "content": c.probs.iter().map(openai_logprobs).collect::<Vec<_>>() });
            }
            choice
        })
        .collect();
    let first = &answers[0];
    let completion_tokens: usize = answers.iter().map(|c| c.timings.predicted_n).sum();
    let mut reply = json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "system_fingerprint": system_fingerprint(),
        "choices": choices_json,
        "usage": usage(first.started.prompt_tokens, first.started.cached_tokens, completion_tokens),
        "timings": timings_json(&first.timings),
    });
    if let Some(prompt) = rendered {
        reply["__verbose"] = json!({ "prompt": prompt, "content": first.text });
    }
    if let Some(id) = session {
        reply["session_id"] = json!(id);
    }
    Ok(with_session_header(Json(reply).into_response(), session))
}

/// Most choices one chat request may ask for (`n`).
const MAX_CHOICES: u32 = 8;
/// Most alternatives a token's log-probabilities list (OpenAI allows 20).
const MAX_TOP_LOGPROBS: usize = 20;

/// Names the build that answered, as OpenAI's `system_fingerprint` does; it starts with `b` like
/// llama-server's build numbers, which clients parse.
pub fn system_fingerprint() -> String {
    format!(
        "b{}-kvsnap-{}",
        env!("CARGO_PKG_VERSION"),
        crate::compute::THIS_BUILD
    )
}

/// What shapes a streamed chat answer beside its text.
struct ChatStream {
    id: String,
    model: String,
    include_usage: bool,
    timings_per_token: bool,
    return_progress: bool,
    session: Option<Uuid>,
    /// Text from a `<tool_call>` on is held back and read as calls at the end.
    read_calls: bool,
}

fn stream_chat(mut stream: TextStream, shape: ChatStream) -> impl IntoResponse {
    sse_response(move |events| async move {
        let created = now();
        let fingerprint = system_fingerprint();
        let chunk = |delta: Value, finish: Value| {
            let mut value = json!({
                "id": shape.id, "object": "chat.completion.chunk", "created": created,
                "model": shape.model, "system_fingerprint": fingerprint,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
            });
            if let Some(s) = shape.session {
                value["session_id"] = json!(s);
            }
            value
        };
        // OpenAI's first chunk names the role and holds no text yet.
        let first = chunk(json!({"role": "assistant", "content": null}), Value::Null);
        if events.send(json_event(&first)).await.is_err() {
            return;
        }
        let mut calls = tool_calls::StreamedReply::default();
        while let Some(step) = stream.next().await {
            let event = match step {
                Step::Text { text, probs, .. } if text.is_empty() && probs.is_empty() => continue,
                Step::Text { text, probs, .. } => {
                    let text = if shape.read_calls {
                        calls.push(&text)
                    } else {
                        text
                    };
                    if text.is_empty() && probs.is_empty() {
                        continue;
                    }
                    let mut value = chunk(json!({ "content": text }), Value::Null);
                    if !probs.is_empty() {
                        value["choices"][0]["logprobs"] = json!({
                            "content": probs.iter().map(openai_logprobs).collect::<Vec<_>>()
                        });
                    }
                    if shape.timings_per_token {
                        value["timings"] = timings_json(&stream.timings_so_far());
                    }
                    value
                }
                Step::Done { finish, timings } => {
                    let mut reason = json!(finish.openai_reason());
                    let end = std::mem::take(&mut calls).finish();
                    let mut closing = Vec::new();
                    if !end.text.is_empty() {
                        closing.push(chunk(json!({ "content": end.text }), Value::Null));
                    }
                    for (index, call) in end.calls.iter().enumerate() {
                        let mut delta = tool_calls::openai_call(call);
                        delta["index"] = json!(index);
                        closing.push(chunk(json!({ "tool_calls": [delta] }), Value::Null));
                        reason = json!("tool_calls");
                    }
                    for value in closing {
                        if events.send(json_event(&value)).await.is_err() {
                            return;
                        }
                    }
                    let last = chunk(json!({}), reason);
                    if events.send(json_event(&last)).await.is_err() {
                        return;
                    }
                    if shape.include_usage {
                        let started = stream.started();
                        let mut usage_chunk = chunk(json!({}), Value::Null);
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] = usage(
                            started.prompt_tokens,
                            started.cached_tokens,
                            timings.predicted_n,
                        );
                        usage_chunk["timings"] = timings_json(&timings);
                        if events.send(json_event(&usage_chunk)).await.is_err() {
                            return;
                        }
                    }
                    break;
                }
                Step::Progress { .. } if !shape.return_progress => continue,
                Step::Progress { timings } => {
                    let mut value = chunk(json!({}), Value::Null);
                    value["choices"] = json!([]);
                    value["prompt_progress"] = prompt_progress(stream.started(), &timings);
                    value["timings"] = timings_json(&timings);
                    value
                }
                Step::Failed(error) => ApiError::from(error).body(),
            };
            if events.send(json_event(&event)).await.is_err() {
                return;
            }
        }
        let _ = events
            .send(axum::response::sse::Event::default().data("[DONE]"))
            .await;
    })
}

pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let session = session_id(&headers, body.session_id.as_deref())?;
    single_choice(body.n)?;
    let (sampling, seed) = body.sampling.resolve(&state, session).await?;
    let request = GenerateRequest {
        session,
        prompt: body.prompt.into_prompt(&state).await?,
        max_tokens: state
            .options
            .token_limit(max_tokens(body.max_tokens.or(body.n_predict))?),
        sampling,
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: false,
        requester: caller.requester(),
        constraint: body.output.constraint()?,
        probs: None,
        stops: Vec::new(),
    };
    let stops = stop_strings(body.stop)?;
    let stream = submit(&state, request, stops).await?;
    let id = format!("cmpl-{}", Uuid::new_v4().simple());
    let model = super::info::model_id(&state);
    if body.stream {
        let include_usage = body.stream_options.unwrap_or_default().include_usage;
        let response = stream_completion(stream, id, model, include_usage).into_response();
        return Ok(with_session_header(response, session));
    }
    let Collected {
        started,
        text,
        finish,
        timings,
        ..
    } = collect(stream).await?;
    let mut reply = json!({
        "id": id,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "system_fingerprint": system_fingerprint(),
        "choices": [{
            "index": 0, "text": text, "logprobs": null,
            "finish_reason": finish.openai_reason(),
        }],
        "usage": usage(started.prompt_tokens, started.cached_tokens, timings.predicted_n),
    });
    if let Some(id) = session {
        reply["session_id"] = json!(id);
    }
    Ok(with_session_header(Json(reply).into_response(), session))
}

fn stream_completion(
    mut stream: TextStream,
    id: String,
    model: String,
    include_usage: bool,
) -> impl IntoResponse {
    sse_response(move |events| async move {
        let created = now();
        let chunk = |text: &str, finish: Value| {
            json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }],
            })
        };
        while let Some(step) = stream.next().await {
            let event = match step {
                Step::Text { text, .. } if text.is_empty() => continue,
                Step::Progress { .. } => continue,
                Step::Text { text, .. } => chunk(&text, Value::Null),
                Step::Done { finish, timings } => {
                    let mut last = chunk("", json!(finish.openai_reason()));
                    if include_usage {
                        let started = stream.started();
                        last["usage"] = usage(
                            started.prompt_tokens,
                            started.cached_tokens,
                            timings.predicted_n,
                        );
                    }
                    last
                }
                Step::Failed(error) => ApiError::from(error).body(),
            };
            if events.send(json_event(&event)).await.is_err() {
                return;
            }
        }
        let _ = events
            .send(axum::response::sse::Event::default().data("[DONE]"))
            .await;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(value: Value) -> Result<Vec<ChatMessage>, ApiError> {
        chat_messages(serde_json::from_value(value).expect("messages"))
    }

    #[test]
    fn a_historys_tool_calls_are_read_and_null_means_none() {
        // SDKs that send a reply back as they got it write "tool_calls": null.
        let plain = messages(json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "tool_calls": null},
        ]))
        .unwrap();
        assert!(plain[1].tool_calls.is_empty());
        let called = messages(json!([
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "2"},
        ]))
        .unwrap();
        assert_eq!(called[0].tool_calls[0].arguments, json!({"x": 1}));
        assert_eq!(called[1].tool_call_id, "c1");
        let not_an_object = messages(json!([{"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "[1]"}}]}]));
        assert_eq!(not_an_object.unwrap_err().status.as_u16(), 400);
    }
}
