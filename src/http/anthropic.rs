//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API, as
//! llama-server serves it, on the same conversations as every other route (a request that
//! names no conversation finds its history's kept state by its tokens; `session_id` or
//! `X-Session-Id` names one).
//!
//! System prompts, text blocks, stop sequences, sampling, streaming with content-block indices,
//! errors in Anthropic's shape. Tools reach the model through a `--jinja` template that renders
//! them, and when that template teaches the Hermes form, a reply's calls come back as `tool_use`
//! blocks (`tool_calls.rs`). In the history, `tool_use` blocks are a reply's tool calls,
//! `tool_result` blocks `tool` messages and thinking blocks its reasoning, each rendered as the
//! template renders them (llama.cpp's built-in templates show calls as JSON text and no
//! reasoning). Images and documents are refused with a sentence.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorSentence};
use super::extract::{ApiJson, session_id};
use super::generate::{Collected, SamplingFields, collect, sse_response, stop_strings, submit};
use super::openai::with_session_header;
use super::tool_calls::{self, StreamedReply};
use crate::completion::{Finish, Step, TextStream};
use crate::engine::{Chat, ChatMessage, Constraint, GenerateRequest, Prompt, Started, ToolCall};

#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    messages: Vec<MessageIn>,
    system: Option<SystemField>,
    /// Anthropic requires it; llama-server does not: without it the server's `--n-predict` (or
    /// the context) limits the reply.
    max_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    stop_sequences: Option<Vec<String>>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    /// llama.cpp GBNF the reply must match, as on the other generation routes.
    grammar: Option<String>,
    /// kvsnap's extension, as on every generation route. (`thinking` and `metadata` are
    /// accepted and have no effect.)
    session_id: Option<String>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// `count_tokens` takes a request's prompt fields only.
#[derive(Debug, Deserialize)]
pub struct CountRequest {
    messages: Vec<MessageIn>,
    system: Option<SystemField>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SystemField {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct MessageIn {
    role: String,
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

/// One content block; which fields matter depends on its type.
#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    /// A `thinking` block's text.
    thinking: Option<String>,
    /// A `tool_use` block's id, which its `tool_result` names as `tool_use_id`.
    id: Option<String>,
    tool_use_id: Option<String>,
    name: Option<String>,
    input: Option<Value>,
    /// A `tool_result`'s content: a text or blocks.
    content: Option<Content>,
}

/// The chat messages an Anthropic request's `system` and `messages` stand for.
fn chat_messages(
    system: Option<SystemField>,
    messages: Vec<MessageIn>,
) -> Result<Vec<ChatMessage>, ApiError> {
    let mut chat = Vec::new();
    match system {
        None => {}
        Some(SystemField::Text(text)) => chat.push(system_message(text)),
        Some(SystemField::Blocks(blocks)) => {
            let mut text = String::new();
            for block in blocks {
                if block.kind != "text" {
                    return Err(ApiError::bad_request(format!(
                        "system blocks must be of type \"text\", not {:?}",
                        block.kind
                    )));
                }
                text.push_str(block.text.as_deref().unwrap_or_default());
            }
            chat.push(system_message(text));
        }
    }
    for message in messages {
        if message.role != "user" && message.role != "assistant" {
            return Err(ApiError::bad_request(format!(
                "unknown message role {:?}; messages are from \"user\" or \"assistant\" (the \
                 system prompt goes in the top-level system field)",
                message.role
            )));
        }
        match message.content {
            None => {}
            Some(Content::Text(text)) => chat.push(ChatMessage {
                role: message.role,
                content: text,
                ..ChatMessage::default()
            }),
            Some(Content::Blocks(blocks)) => {
                let read = read_blocks(blocks)?;
                let said_something = !read.content.is_empty()
                    || !read.reasoning.is_empty()
                    || !read.tool_calls.is_empty();
                if said_something || read.tool_results.is_empty() {
                    chat.push(ChatMessage {
                        role: message.role,
                        content: read.content,
                        reasoning: read.reasoning,
                        tool_calls: read.tool_calls,
                        tool_call_id: String::new(),
                    });
                }
                chat.extend(read.tool_results);
            }
        }
    }
    Ok(chat)
}

/// A system prompt, with Claude Code's per-request billing stamp made constant: it changes
/// with every request and would otherwise keep any two requests from sharing a prefix.
fn system_message(mut text: String) -> ChatMessage {
    steady_billing_header(&mut text);
    ChatMessage {
        role: "system".into(),
        content: text,
        ..ChatMessage::default()
    }
}

/// Claude Code starts its system prompt with `x-anthropic-billing-header: …; cch=XXXXX;`, a
/// five-character stamp that differs per request and means nothing to a local model. It is
/// written as `fffff` (as llama-server does), so the prompt's prefix is the same every time.
fn steady_billing_header(text: &mut String) {
    const HEADER: &str = "x-anthropic-billing-header:";
    const STAMP: usize = 5;
    if !text.starts_with(HEADER) {
        return;
    }
    let Some(found) = text[HEADER.len()..].find("cch=") else {
        return;
    };
    let start = HEADER.len() + found + "cch=".len();
    let stamp_ends_with_semicolon = text.as_bytes().get(start + STAMP) == Some(&b';');
    if stamp_ends_with_semicolon && text.is_char_boundary(start + STAMP) {
        text.replace_range(start..start + STAMP, "fffff");
    }
}

/// What a message's blocks say.
struct ReadBlocks {
    /// Text blocks joined by a blank line, as OpenAI content parts are.
    content: String,
    /// Its thinking blocks' text, joined as llama-server joins them (a `--jinja` template that
    /// renders reasoning shows it; llama.cpp's built-in templates do not).
    reasoning: String,
    /// Its `tool_use` blocks.
    tool_calls: Vec<ToolCall>,
    /// The tool results it carries, as `tool` messages.
    tool_results: Vec<ChatMessage>,
}

fn read_blocks(blocks: Vec<Block>) -> Result<ReadBlocks, ApiError> {
    let mut parts: Vec<String> = Vec::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    let mut tool_results = Vec::new();
    for block in blocks {
        match block.kind.as_str() {
            "text" => parts.push(block.text.unwrap_or_default()),
            "thinking" => reasoning.push_str(block.thinking.as_deref().unwrap_or_default()),
            // Encrypted thinking means nothing to a local model.
            "redacted_thinking" => {}
            "tool_use" => tool_calls.push(ToolCall {
                id: block.id.unwrap_or_default(),
                name: block.name.unwrap_or_default(),
                arguments: block.input.unwrap_or_else(|| json!({})),
            }),
            "tool_result" => tool_results.push(ChatMessage {
                role: "tool".into(),
                content: tool_result_text(block.content)?,
                tool_call_id: block.tool_use_id.unwrap_or_default(),
                ..ChatMessage::default()
            }),
            "image" | "document" => return Err(no_media(&block.kind)),
            other => {
                return Err(ApiError::bad_request(format!(
                    "content blocks of type {other:?} are not supported; send text, tool_use, \
                     tool_result or thinking blocks"
                )));
            }
        }
    }
    Ok(ReadBlocks {
        content: parts.join("\n\n"),
        reasoning,
        tool_calls,
        tool_results,
    })
}

fn tool_result_text(content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(text)) => Ok(text),
        Some(Content::Blocks(blocks)) => {
            let mut text = String::new();
            for block in blocks {
                match block.kind.as_str() {
                    "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
                    "image" | "document" => return Err(no_media(&block.kind)),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "a tool_result holds text blocks, not {other:?}"
                        )));
                    }
                }
            }
            Ok(text)
        }
    }
}

fn no_media(kind: &str) -> ApiError {
    ApiError::bad_request(format!(
        "{kind} input is not supported: kvsnap serves text-only models; send text blocks"
    ))
}

fn max_tokens(value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n < 1 => Err(ApiError::bad_request("max_tokens must be at least 1")),
        Some(n) => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
    }
}

/// Anthropic's `stop_reason` and `stop_sequence` for how a turn ended.
fn stop_reason(finish: &Finish) -> (&'static str, Value) {
    match finish {
        Finish::Eog => ("end_turn", Value::Null),
        Finish::Stop(sequence) => ("stop_sequence", json!(sequence)),
        Finish::Length | Finish::ContextFull => ("max_tokens", Value::Null),
        // Cut short by the server's shutdown: the client may send the reply back to continue.
        Finish::Cancelled => ("pause_turn", Value::Null),
    }
}

/// Anthropic counts the prompt tokens read from a cache apart from those read now.
fn usage(started: &Started, output_tokens: usize) -> Value {
    json!({
        "input_tokens": started.prompt_tokens.saturating_sub(started.cached_tokens),
        "cache_read_input_tokens": started.cached_tokens,
        "output_tokens": output_tokens,
    })
}

pub async fn messages(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<MessagesRequest>,
) -> Result<Response, ApiError> {
    let session = session_id(&headers, body.session_id.as_deref())?;
    let (sampling, seed) = body.sampling.resolve(&state, session).await?;
    let chat = Chat {
        tools: tool_calls::anthropic_tools(body.tools, body.tool_choice.as_ref())?,
        messages: chat_messages(body.system, body.messages)?,
    };
    // Calls are read out of the reply only where the template taught the model their form.
    let read_calls = !chat.tools.is_empty() && state.engine.info().hermes_tool_calls;
    let request = GenerateRequest {
        session,
        prompt: Prompt::Chat(chat),
        max_tokens: state.options.token_limit(max_tokens(body.max_tokens)?),
        sampling,
        seed,
        cache_prompt: true,
        ignore_eos: false,
        requester: caller.requester(),
        constraint: body.grammar.map(Constraint::Grammar),
        probs: None,
        stops: Vec::new(),
    };
    let stops = stop_strings(body.stop_sequences.map(super::generate::StopField::Many))?;
    let stream = submit(&state, request, stops).await?;
    let id = format!("msg_{}", Uuid::new_v4().simple());
    let model = super::info::model_id(&state);
    if body.stream {
        let response = stream_message(stream, id, model, read_calls).into_response();
        return Ok(with_session_header(response, session));
    }
    let Collected {
        started,
        text,
        finish,
        timings,
        ..
    } = collect(stream).await?;
    let (mut reason, sequence) = stop_reason(&finish);
    let reply = tool_calls::read_if(read_calls, text);
    let mut content = Vec::new();
    if !reply.text.is_empty() || reply.calls.is_empty() {
        content.push(json!({ "type": "text", "text": reply.text }));
    }
    for call in &reply.calls {
        content.push(tool_use_block(call));
        reason = "tool_use";
    }
    let reply = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(&started, timings.predicted_n),
    });
    Ok(with_session_header(Json(reply).into_response(), session))
}

/// A call as Anthropic's `tool_use` block.
fn tool_use_block(call: &ToolCall) -> Value {
    json!({
        "type": "tool_use",
        "id": call.id.replacen("call_", "toolu_", 1),
        "name": call.name,
        "input": call.arguments,
    })
}

/// The event stream Anthropic's SDKs parse: `message_start`, the text block (start, deltas,
/// stop) unless the reply is calls alone, then one block per tool call (start, its input as
/// one JSON delta, stop), `message_delta` with the stop reason and usage, `message_stop`.
fn stream_message(
    mut stream: TextStream,
    id: String,
    model: String,
    read_calls: bool,
) -> impl IntoResponse {
    sse_response(move |events| async move {
        let event = |value: Value| {
            let name = value["type"].as_str().unwrap_or("error").to_string();
            SseEvent::default().event(name).data(value.to_string())
        };
        let started = stream.started().clone();
        let opening = json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage(&started, 0),
            },
        });
        if events.send(event(opening)).await.is_err() {
            return;
        }
        let mut calls = StreamedReply::default();
        let mut blocks = Blocks::default();
        while let Some(step) = stream.next().await {
            let values = match step {
                Step::Text { text, .. } if text.is_empty() => continue,
                Step::Progress { .. } => continue,
                Step::Text { text, .. } => {
                    let text = if read_calls { calls.push(&text) } else { text };
                    if text.is_empty() {
                        continue;
                    }
                    blocks.text(text)
                }
                Step::Done { finish, timings } => {
                    let (mut reason, sequence) = stop_reason(&finish);
                    let end = std::mem::take(&mut calls).finish();
                    let mut values = Vec::new();
                    if !end.text.is_empty() || (blocks.next == 0 && end.calls.is_empty()) {
                        // A reply with nothing to say still has its (empty) text block.
                        values.extend(blocks.text(end.text));
                    }
                    values.extend(blocks.close_text());
                    for call in &end.calls {
                        values.extend(blocks.tool_use(call));
                        reason = "tool_use";
                    }
                    values.push(json!({
                        "type": "message_delta",
                        "delta": { "stop_reason": reason, "stop_sequence": sequence },
                        "usage": usage(&started, timings.predicted_n),
                    }));
                    values.push(json!({ "type": "message_stop" }));
                    values
                }
                Step::Failed(error) => {
                    let error = ApiError::from(error);
                    vec![error_body(error.status, &error.message)]
                }
            };
            for value in values {
                if events.send(event(value)).await.is_err() {
                    return;
                }
            }
        }
    })
}

/// A streamed message's content blocks, numbered as they open: the text block when its first
/// text arrives, then one block per tool call at the end.
#[derive(Default)]
struct Blocks {
    /// The index of the text block while it is open.
    open_text: Option<usize>,
    next: usize,
}

impl Blocks {
    fn text(&mut self, text: String) -> Vec<Value> {
        let mut values = Vec::new();
        let index = match self.open_text {
            Some(index) => index,
            None => {
                let index = self.next;
                self.next += 1;
                self.open_text = Some(index);
                values.push(json!({
                    "type": "content_block_start",
                    "index": index,
                    "content_block": { "type": "text", "text": "" },
                }));
                index
            }
        };
        values.push(json!({
            "type": "content_block_delta",
            "index": index,
            "delta": { "type": "text_delta", "text": text },
        }));
        values
    }

    fn close_text(&mut self) -> Option<Value> {
        let index = self.open_text.take()?;
        Some(json!({ "type": "content_block_stop", "index": index }))
    }

    /// A call's block: opened with an empty input, which one JSON delta then fills.
    fn tool_use(&mut self, call: &ToolCall) -> [Value; 3] {
        let index = self.next;
        self.next += 1;
        let mut opening = tool_use_block(call);
        opening["input"] = json!({});
        [
            json!({ "type": "content_block_start", "index": index, "content_block": opening }),
            json!({
                "type": "content_block_delta",
                "index": index,
                "delta": { "type": "input_json_delta", "partial_json": call.arguments.to_string() },
            }),
            json!({ "type": "content_block_stop", "index": index }),
        ]
    }
}

pub async fn count_tokens(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CountRequest>,
) -> Result<Json<Value>, ApiError> {
    let chat = Chat {
        tools: tool_calls::anthropic_tools(body.tools, body.tool_choice.as_ref())?,
        messages: chat_messages(body.system, body.messages)?,
    };
    let tokens = state.engine.chat_tokens(chat).await?;
    Ok(Json(json!({ "input_tokens": tokens.len() })))
}

/// Anthropic's error body: `{"type": "error", "error": {"type": …, "message": …}}`.
fn error_body(status: StatusCode, message: &str) -> Value {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    };
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

/// Middleware for the Anthropic routes: every error answer (a refused key, a malformed body, a
/// failed turn) in Anthropic's shape, which its SDKs read, with the same status and sentence.
pub async fn anthropic_errors(response: Response) -> Response {
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let message = match response.extensions().get::<ErrorSentence>() {
        Some(ErrorSentence(sentence)) => sentence.clone(),
        None => status
            .canonical_reason()
            .unwrap_or("the request failed")
            .to_string(),
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = Json(error_body(status, &message)).into_response();
    let (body_parts, body) = body.into_parts();
    if let Some(kind) = body_parts.headers.get(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, kind.clone());
    }
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(value: Value) -> Vec<MessageIn> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn tool_results_become_tool_messages_after_the_text() {
        let messages = blocks(json!([
            {"role": "user", "content": "What's the weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "check it", "signature": ""},
                {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "text", "text": "Here:"},
                {"type": "tool_result", "tool_use_id": "t1",
                 "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": ", 25"}]}
            ]}
        ]));
        let chat = chat_messages(Some(SystemField::Text("Be brief.".into())), messages).unwrap();
        let pairs: Vec<(&str, &str)> = chat
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("system", "Be brief."),
                ("user", "What's the weather?"),
                ("assistant", ""),
                ("user", "Here:"),
                ("tool", "sunny, 25"),
            ]
        );
        assert_eq!(chat[2].reasoning, "check it");
        assert_eq!(
            chat[2].tool_calls,
            [ToolCall {
                id: "t1".into(),
                name: "weather".into(),
                arguments: json!({"city": "Paris"}),
            }]
        );
        assert_eq!(chat[4].tool_call_id, "t1");
    }

    #[test]
    fn images_and_unknown_roles_are_refused_with_a_sentence() {
        let image = blocks(json!([{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
        ]}]));
        let error = chat_messages(None, image).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("image input is not supported"));
        let system_role = blocks(json!([{"role": "system", "content": "x"}]));
        assert!(
            chat_messages(None, system_role)
                .unwrap_err()
                .message
                .contains("top-level system")
        );
    }

    #[test]
    fn the_billing_stamp_is_made_constant_and_nothing_else_is_touched() {
        let mut text = "x-anthropic-billing-header: cc_version=2.1; cch=a5145;You are".to_string();
        steady_billing_header(&mut text);
        assert_eq!(
            text,
            "x-anthropic-billing-header: cc_version=2.1; cch=fffff;You are"
        );
        for unchanged in ["You are cch=a5145;", "x-anthropic-billing-header: cch=abc;"] {
            let mut text = unchanged.to_string();
            steady_billing_header(&mut text);
            assert_eq!(text, unchanged);
        }
    }
}
