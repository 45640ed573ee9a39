//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API, as
//! llama-server serves it, on the same conversations as every other route (a request that
//! names no conversation finds its history's kept state by its tokens; `session_id` or
//! `X-Session-Id` names one).
//!
//! What a text model with llama.cpp's built-in chat templates can do is done: system prompts,
//! text blocks, stop sequences, sampling, streaming with content-block indices, errors in
//! Anthropic's shape. Tool definitions are accepted and not shown to the model (kvsnap does not
//! parse tool calls out of a reply); `tool_use` blocks in the history are rendered as their JSON
//! and `tool_result` blocks as `tool` messages, so a conversation that used tools elsewhere
//! still reads whole. Thinking blocks are dropped from the prompt, as llama.cpp's built-in
//! templates render no reasoning. Images and documents are refused with a sentence.

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
use crate::completion::{Finish, Step, TextStream};
use crate::engine::{ChatMessage, GenerateRequest, Prompt, Started};

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
    /// kvsnap's extension, as on every generation route. (`tools`, `tool_choice`, `thinking`
    /// and `metadata` are accepted and have no effect: see the module's note.)
    session_id: Option<String>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// `count_tokens` takes a request's prompt fields only.
#[derive(Debug, Deserialize)]
pub struct CountRequest {
    messages: Vec<MessageIn>,
    system: Option<SystemField>,
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
            }),
            Some(Content::Blocks(blocks)) => {
                let (content, tool_results) = read_blocks(blocks)?;
                if !content.is_empty() || tool_results.is_empty() {
                    chat.push(ChatMessage {
                        role: message.role,
                        content,
                    });
                }
                chat.extend(tool_results);
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

/// A message's blocks: its text (text blocks joined by a blank line, as OpenAI content parts
/// are; tool calls as their JSON) and the tool results it carries, as `tool` messages.
fn read_blocks(blocks: Vec<Block>) -> Result<(String, Vec<ChatMessage>), ApiError> {
    let mut parts: Vec<String> = Vec::new();
    let mut tool_results = Vec::new();
    for block in blocks {
        match block.kind.as_str() {
            "text" => parts.push(block.text.unwrap_or_default()),
            // llama.cpp's built-in templates render no reasoning.
            "thinking" | "redacted_thinking" => {}
            "tool_use" => parts.push(
                json!({
                    "type": "tool_use",
                    "name": block.name.unwrap_or_default(),
                    "input": block.input.unwrap_or_else(|| json!({})),
                })
                .to_string(),
            ),
            "tool_result" => tool_results.push(ChatMessage {
                role: "tool".into(),
                content: tool_result_text(block.content)?,
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
    Ok((parts.join("\n\n"), tool_results))
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
    let request = GenerateRequest {
        session,
        prompt: Prompt::Chat(chat_messages(body.system, body.messages)?),
        max_tokens: state.options.token_limit(max_tokens(body.max_tokens)?),
        sampling,
        seed,
        cache_prompt: true,
        ignore_eos: false,
        requester: caller.requester(),
        constraint: None,
        probs: None,
        stops: Vec::new(),
    };
    let stops = stop_strings(body.stop_sequences.map(super::generate::StopField::Many))?;
    let stream = submit(&state, request, stops).await?;
    let id = format!("msg_{}", Uuid::new_v4().simple());
    let model = super::info::model_id(&state);
    if body.stream {
        let response = stream_message(stream, id, model).into_response();
        return Ok(with_session_header(response, session));
    }
    let Collected {
        started,
        text,
        finish,
        timings,
        ..
    } = collect(stream).await?;
    let (reason, sequence) = stop_reason(&finish);
    let reply = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(&started, timings.predicted_n),
    });
    Ok(with_session_header(Json(reply).into_response(), session))
}

/// The event stream Anthropic's SDKs parse: `message_start`, one text block (start, deltas,
/// stop), `message_delta` with the stop reason and usage, `message_stop`.
fn stream_message(mut stream: TextStream, id: String, model: String) -> impl IntoResponse {
    sse_response(move |events| async move {
        let event = |value: Value| {
            let name = value["type"].as_str().unwrap_or("error").to_string();
            SseEvent::default().event(name).data(value.to_string())
        };
        let started = stream.started().clone();
        let opening = [
            json!({
                "type": "message_start",
                "message": {
                    "id": id, "type": "message", "role": "assistant", "model": model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": usage(&started, 0),
                },
            }),
            json!({
                "type": "content_block_start",
                "index": 0,
                "content_block": { "type": "text", "text": "" },
            }),
        ];
        for value in opening {
            if events.send(event(value)).await.is_err() {
                return;
            }
        }
        while let Some(step) = stream.next().await {
            let values = match step {
                Step::Text { text, .. } if text.is_empty() => continue,
                Step::Progress { .. } => continue,
                Step::Text { text, .. } => vec![json!({
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": { "type": "text_delta", "text": text },
                })],
                Step::Done { finish, timings } => {
                    let (reason, sequence) = stop_reason(&finish);
                    vec![
                        json!({ "type": "content_block_stop", "index": 0 }),
                        json!({
                            "type": "message_delta",
                            "delta": { "stop_reason": reason, "stop_sequence": sequence },
                            "usage": usage(&started, timings.predicted_n),
                        }),
                        json!({ "type": "message_stop" }),
                    ]
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

pub async fn count_tokens(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<CountRequest>,
) -> Result<Json<Value>, ApiError> {
    let messages = chat_messages(body.system, body.messages)?;
    let tokens = state.engine.chat_tokens(messages).await?;
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
                (
                    "assistant",
                    r#"{"input":{"city":"Paris"},"name":"weather","type":"tool_use"}"#
                ),
                ("user", "Here:"),
                ("tool", "sunny, 25"),
            ]
        );
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
