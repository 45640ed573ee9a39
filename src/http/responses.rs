//! `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: OpenAI's Responses API, where
//! a response id names a stored conversation state.
//!
//! A stored response (`store`, on by default) is a named conversation of the same id, forked
//! from the response it continues (`previous_response_id`), so a response can be continued
//! any number of times, each continuation reading only its new input; the conversation's
//! text is kept beside it (`sessions::responses`). With `store: false` nothing is named or
//! kept for the response: the turn is served like any request that names no conversation.
//! Input is text and messages; function calls, images and files are refused with a sentence.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::ApiJson;
use super::generate::{
    Collected, OutputFields, SamplingFields, collect, prompt_progress, sse_response, submit,
};
use super::native::timings_json;
use crate::clock::now_ms;
use crate::completion::{Finish, Step, TextStream};
use crate::engine::{Chat, ChatMessage, GenerateRequest, Prompt, Requester, Started};
use crate::sessions::ConversationError;
use crate::store::records::{RECORD_VERSION, ResponseRecord};

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    input: Input,
    instructions: Option<String>,
    previous_response_id: Option<String>,
    /// Keep the response so it can be read and continued (OpenAI's default: true).
    store: Option<bool>,
    #[serde(default)]
    stream: bool,
    max_output_tokens: Option<i64>,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    output: OutputFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Item>),
}

#[derive(Debug, Deserialize)]
struct Item {
    /// `message`, or absent (a message all the same).
    #[serde(rename = "type")]
    kind: Option<String>,
    role: Option<String>,
    content: Option<ItemContent>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ItemContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

/// The messages a request's `input` holds, as (role, text).
fn input_messages(input: Input) -> Result<Vec<(String, String)>, ApiError> {
    let items = match input {
        Input::Text(text) => return Ok(vec![("user".into(), text)]),
        Input::Items(items) => items,
    };
    items
        .into_iter()
        .map(|item| {
            if let Some(kind) = item.kind.as_deref().filter(|k| *k != "message") {
                return Err(ApiError::bad_request(format!(
                    "input items of type {kind:?} are not supported; send messages (kvsnap does \
                     not run tools)"
                )));
            }
            let role = match item.role.as_deref() {
                Some("developer") | Some("system") => "system",
                Some("user") => "user",
                Some("assistant") => "assistant",
                other => {
                    return Err(ApiError::bad_request(format!(
                        "an input message's role must be user, assistant, system or developer, \
                         not {other:?}"
                    )));
                }
            };
            let text = match item.content {
                None => String::new(),
                Some(ItemContent::Text(text)) => text,
                Some(ItemContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for part in parts {
                        match part.kind.as_str() {
                            "input_text" | "output_text" | "text" => {
                                texts.push(part.text.unwrap_or_default())
                            }
                            other => {
                                return Err(ApiError::bad_request(format!(
                                    "content of type {other:?} is not supported: kvsnap serves \
                                     text-only models; send input_text"
                                )));
                            }
                        }
                    }
                    // Text parts are joined by a blank line, as chat content parts are.
                    texts.join("\n\n")
                }
            };
            Ok((role.to_string(), text))
        })
        .collect()
}

/// `resp_` and 32 hex digits, as this server names responses.
fn response_id(text: &str) -> Result<Uuid, ApiError> {
    text.strip_prefix("resp_")
        .and_then(|hex| Uuid::try_parse(hex).ok())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "there is no response {text}: this server's response ids are resp_ and 32 hex \
                 digits"
            ))
        })
}

fn max_output_tokens(value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n < 1 => Err(ApiError::bad_request(
            "max_output_tokens must be at least 1",
        )),
        Some(n) => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
    }
}

/// The status a finished turn gives its response, and why it is incomplete when it is.
fn status(finish: &Finish) -> (&'static str, Option<String>) {
    match finish {
        Finish::Eog | Finish::Stop(_) => ("completed", None),
        Finish::Length | Finish::ContextFull => {
            ("incomplete", Some("max_output_tokens".to_string()))
        }
        Finish::Cancelled => ("cancelled", None),
    }
}

/// The response object OpenAI's SDKs read; `output` is `None` while it is in progress.
fn response_json(id: Uuid, record: &ResponseRecord, store: bool, output: Option<&str>) -> Value {
    let message = output.map(|text| {
        json!({
            "id": message_id(id),
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{ "type": "output_text", "text": text, "annotations": [] }],
        })
    });
    json!({
        "id": format!("resp_{}", id.simple()),
        "object": "response",
        "created_at": record.created_ms / 1000,
        "status": if output.is_some() { record.status.as_str() } else { "in_progress" },
        "error": null,
        "incomplete_details": record.incomplete_reason.as_ref().map(|r| json!({ "reason": r })),
        "instructions": record.instructions,
        "max_output_tokens": record.max_output_tokens,
        "model": record.model,
        "output": message.into_iter().collect::<Vec<_>>(),
        "parallel_tool_calls": false,
        "previous_response_id": record.previous,
        "store": store,
        "temperature": record.temperature,
        "top_p": record.top_p,
        "text": { "format": { "type": "text" } },
        "tool_choice": "none",
        "tools": [],
        "truncation": "disabled",
        "metadata": {},
        "usage": output.map(|_| json!({
            "input_tokens": record.input_tokens,
            "input_tokens_details": { "cached_tokens": record.cached_tokens },
            "output_tokens": record.output_tokens,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": record.input_tokens + record.output_tokens,
        })),
    })
}

/// A response holds one message; its id follows from the response's.
fn message_id(id: Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// What a request is about to become: its record before the turn's figures are known.
struct Turn {
    id: Uuid,
    store: bool,
    record: ResponseRecord,
}

impl Turn {
    /// The record once the turn ended with `text`.
    fn finished(
        &self,
        started: &Started,
        text: &str,
        finish: &Finish,
        output_tokens: usize,
    ) -> ResponseRecord {
        let (status, reason) = status(finish);
        let mut record = self.record.clone();
        record.history.push(("assistant".into(), text.to_string()));
        record.status = status.into();
        record.incomplete_reason = reason;
        record.input_tokens = started.prompt_tokens as u64;
        record.cached_tokens = started.cached_tokens as u64;
        record.output_tokens = output_tokens as u64;
        record
    }
}

pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<ResponsesRequest>,
) -> Result<Response, ApiError> {
    let requester = caller.requester();
    let store = body.store.unwrap_or(true);
    let Conversation {
        previous,
        history,
        input_count,
        messages,
    } = conversation(
        &state,
        &requester,
        body.input,
        body.instructions.as_deref(),
        body.previous_response_id.as_deref(),
    )
    .await?;

    let id = Uuid::new_v4();
    let session = store.then_some(id);
    // Everything that can refuse the request is checked before a fork creates anything.
    let (sampling, seed) = body.sampling.resolve(&state, session).await?;
    let max_tokens = max_output_tokens(body.max_output_tokens)?;
    let constraint = body.output.constraint()?;
    if store && let Some(previous) = previous {
        continue_from(&state, previous, id, &requester).await?;
    }
    let turn = Turn {
        id,
        store,
        record: ResponseRecord {
            record_version: RECORD_VERSION,
            owner: requester.owner(),
            created_ms: now_ms(),
            model: super::info::model_id(&state),
            instructions: body.instructions.clone(),
            previous: body.previous_response_id.clone(),
            history,
            input_messages: input_count,
            status: "in_progress".into(),
            incomplete_reason: None,
            input_tokens: 0,
            cached_tokens: 0,
            output_tokens: 0,
            max_output_tokens: max_tokens,
            temperature: body.sampling.temperature,
            top_p: body.sampling.top_p,
        },
    };
    let request = GenerateRequest {
        session,
        prompt: Prompt::Chat(Chat {
            messages,
            tools: Vec::new(),
        }),
        max_tokens: state.options.token_limit(max_tokens),
        sampling,
        seed,
        cache_prompt: true,
        ignore_eos: false,
        requester: requester.clone(),
        constraint,
        probs: None,
        stops: Vec::new(),
    };
    let stream = match submit(&state, request, Vec::new()).await {
        Ok(stream) => stream,
        Err(error) => {
            forget(&state, &turn, requester).await;
            return Err(error);
        }
    };
    if body.stream {
        let shape = StreamShape {
            timings_per_token: body.output.timings_per_token,
            return_progress: body.output.return_progress,
        };
        return Ok(stream_response(state, stream, turn, requester, shape).into_response());
    }
    // On a task of its own: a client that hangs up does not leave a forked conversation
    // without its response; the turn ends and the response is kept all the same.
    let finished = tokio::spawn(finish(state, stream, turn, requester));
    let record = finished.await.map_err(|e| {
        ApiError::from(ConversationError::Internal(format!(
            "a response task failed: {e}"
        )))
    })??;
    Ok(Json(response_json(id, &record, store, Some(record.output()))).into_response())
}

/// A non-streamed response's turn read to its end and the response kept (or, failed, forgotten).
async fn finish(
    state: AppState,
    stream: TextStream,
    turn: Turn,
    requester: Requester,
) -> Result<ResponseRecord, ApiError> {
    let Collected {
        started,
        text,
        finish,
        timings,
        ..
    } = match collect(stream).await {
        Ok(collected) => collected,
        Err(error) => {
            forget(&state, &turn, requester).await;
            return Err(error);
        }
    };
    let record = turn.finished(&started, &text, &finish, timings.predicted_n);
    if turn.store {
        state
            .conversations
            .keep_response(turn.id, record.clone())
            .await?;
    }
    Ok(record)
}

/// What a request's prompt is made of.
struct Conversation {
    /// The response it continues.
    previous: Option<Uuid>,
    /// The messages before it, then its input: (role, text).
    history: Vec<(String, String)>,
    /// How many of `history`'s messages are its input.
    input_count: u32,
    /// The instructions as a system message, then `history`.
    messages: Vec<ChatMessage>,
}

async fn conversation(
    state: &AppState,
    requester: &Requester,
    input: Input,
    instructions: Option<&str>,
    previous_response_id: Option<&str>,
) -> Result<Conversation, ApiError> {
    let (previous, mut history) = match previous_response_id {
        Some(text) => {
            let id = response_id(text)?;
            let record = state.conversations.response(id, requester).await?;
            (Some(id), record.history)
        }
        None => (None, Vec::new()),
    };
    let input = input_messages(input)?;
    let input_count = input.len() as u32;
    history.extend(input);
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(history.len() + 1);
    if let Some(instructions) = instructions {
        messages.push(ChatMessage {
            role: "system".into(),
            content: instructions.to_string(),
            ..ChatMessage::default()
        });
    }
    messages.extend(history.iter().map(|(role, content)| ChatMessage {
        role: role.clone(),
        content: content.clone(),
        ..ChatMessage::default()
    }));
    Ok(Conversation {
        previous,
        history,
        input_count,
        messages,
    })
}

/// The body of `POST /v1/responses/input_tokens`: a request's prompt fields.
#[derive(Debug, Deserialize)]
pub struct InputTokensRequest {
    input: Input,
    instructions: Option<String>,
    previous_response_id: Option<String>,
}

/// How many tokens a response request's prompt holds, counted as the request would read it.
pub async fn input_tokens(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<InputTokensRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = conversation(
        &state,
        &caller.requester(),
        body.input,
        body.instructions.as_deref(),
        body.previous_response_id.as_deref(),
    )
    .await?;
    let tokens = state
        .engine
        .chat_tokens(Chat {
            messages: prompt.messages,
            tools: Vec::new(),
        })
        .await?;
    Ok(Json(
        json!({ "object": "response.input_tokens", "input_tokens": tokens.len() }),
    ))
}

/// A stored response continuing `previous` starts as a fork of its conversation, so both go
/// on independently. A conversation that is gone (deleted by its session id, damaged) is no
/// loss but time: the turn reads the history from its text instead.
async fn continue_from(
    state: &AppState,
    previous: Uuid,
    id: Uuid,
    requester: &Requester,
) -> Result<(), ApiError> {
    match state
        .conversations
        .fork(previous, id, requester.clone())
        .await
    {
        Ok(_) => Ok(()),
        Err(ConversationError::NotFound(_) | ConversationError::Damaged(_)) => {
            tracing::info!(
                response = %previous.simple(),
                "the response's conversation state is gone; its history is read again"
            );
            Ok(())
        }
        Err(other) => Err(other.into()),
    }
}

/// A stored response whose turn failed leaves nothing: its conversation goes too.
async fn forget(state: &AppState, turn: &Turn, requester: Requester) {
    if !turn.store {
        return;
    }
    match state.conversations.delete(turn.id, requester).await {
        Ok(()) | Err(ConversationError::NotFound(_)) => {}
        Err(error) => tracing::warn!(
            response = %turn.id.simple(),
            %error,
            "a failed response's conversation could not be deleted"
        ),
    }
}

/// llama-server's telemetry fields a streamed response may carry.
struct StreamShape {
    timings_per_token: bool,
    return_progress: bool,
}

/// The events OpenAI's SDKs parse, each with its `sequence_number`: created, in progress, the
/// message and its text part added, text deltas, each of them done, then `response.completed`
/// (or `response.incomplete`), sent once a stored response is committed.
fn stream_response(
    state: AppState,
    stream: TextStream,
    turn: Turn,
    requester: Requester,
    shape: StreamShape,
) -> impl IntoResponse {
    sse_response(move |events| async move {
        // A response that was not kept (a failed turn, a client gone) leaves nothing.
        if !send_events(&state, stream, &turn, shape, events).await {
            forget(&state, &turn, requester).await;
        }
    })
}

/// Sends a streamed response's events; whether its turn ended and the response was kept.
async fn send_events(
    state: &AppState,
    mut stream: TextStream,
    turn: &Turn,
    shape: StreamShape,
    events: tokio::sync::mpsc::Sender<SseEvent>,
) -> bool {
    let id = turn.id;
    let item_id = message_id(id);
    let mut sequence = 0u64;
    let mut event = |mut value: Value| {
        value["sequence_number"] = json!(sequence);
        sequence += 1;
        let name = value["type"].as_str().unwrap_or("error").to_string();
        SseEvent::default().event(name).data(value.to_string())
    };
    let in_progress = response_json(id, &turn.record, turn.store, None);
    let item = |status: &str, content: Value| {
        json!({
            "id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content,
        })
    };
    let part = |text: &str| json!({ "type": "output_text", "text": text, "annotations": [] });
    let opening = [
        json!({ "type": "response.created", "response": in_progress }),
        json!({ "type": "response.in_progress", "response": in_progress }),
        json!({
            "type": "response.output_item.added", "output_index": 0,
            "item": item("in_progress", json!([])),
        }),
        json!({
            "type": "response.content_part.added", "item_id": item_id,
            "output_index": 0, "content_index": 0, "part": part(""),
        }),
    ];
    for value in opening {
        if events.send(event(value)).await.is_err() {
            return false;
        }
    }
    let mut text = String::new();
    while let Some(step) = stream.next().await {
        let values = match step {
            Step::Text { text: piece, .. } if piece.is_empty() => continue,
            Step::Text { text: piece, .. } => {
                text.push_str(&piece);
                let mut value = json!({
                    "type": "response.output_text.delta", "item_id": item_id,
                    "output_index": 0, "content_index": 0, "delta": piece, "logprobs": [],
                });
                if shape.timings_per_token {
                    value["timings"] = timings_json(&stream.timings_so_far());
                }
                vec![value]
            }
            Step::Progress { .. } if !shape.return_progress => continue,
            Step::Progress { timings } => vec![json!({
                "type": "response.in_progress",
                "response": in_progress,
                "prompt_progress": prompt_progress(stream.started(), &timings),
                "timings": timings_json(&timings),
            })],
            Step::Done { finish, timings } => {
                let record = turn.finished(stream.started(), &text, &finish, timings.predicted_n);
                if turn.store
                    && let Err(error) = state.conversations.keep_response(id, record.clone()).await
                {
                    let error = ApiError::from(error);
                    let _ = events.send(event(error_event(&error))).await;
                    return false;
                }
                let done_name = if record.status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                let last = vec![
                    json!({
                        "type": "response.output_text.done", "item_id": item_id,
                        "output_index": 0, "content_index": 0, "text": text, "logprobs": [],
                    }),
                    json!({
                        "type": "response.content_part.done", "item_id": item_id,
                        "output_index": 0, "content_index": 0, "part": part(&text),
                    }),
                    json!({
                        "type": "response.output_item.done", "output_index": 0,
                        "item": item("completed", json!([part(&text)])),
                    }),
                    json!({
                        "type": done_name,
                        "response": response_json(id, &record, turn.store, Some(&text)),
                        "timings": timings_json(&timings),
                    }),
                ];
                for value in last {
                    let _ = events.send(event(value)).await;
                }
                // Kept: the client may go now, the response stays.
                return true;
            }
            Step::Failed(error) => {
                let _ = events
                    .send(event(error_event(&ApiError::from(error))))
                    .await;
                return false;
            }
        };
        for value in values {
            if events.send(event(value)).await.is_err() {
                return false;
            }
        }
    }
    // The stream ended without its turn's end: the server is shutting down.
    false
}

/// OpenAI's streamed `error` event.
fn error_event(error: &ApiError) -> Value {
    json!({ "type": "error", "code": error.kind, "message": error.message, "param": null })
}

pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = response_id(&id)?;
    let record = state
        .conversations
        .response(id, &caller.requester())
        .await?;
    Ok(Json(response_json(
        id,
        &record,
        true,
        Some(record.output()),
    )))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(text): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = response_id(&text)?;
    state
        .conversations
        .delete_response(id, caller.requester())
        .await?;
    Ok(Json(json!({
        "id": format!("resp_{}", id.simple()),
        "object": "response",
        "deleted": true,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_text_or_messages_and_nothing_else() {
        let items: Input = serde_json::from_value(json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}
        ]))
        .unwrap();
        assert_eq!(
            input_messages(items).unwrap(),
            [
                ("system".to_string(), "Be brief.".to_string()),
                ("user".to_string(), "a\n\nb".to_string())
            ]
        );
        let call: Input = serde_json::from_value(json!([
            {"type": "function_call_output", "call_id": "c", "output": "1"}
        ]))
        .unwrap();
        assert!(
            input_messages(call)
                .unwrap_err()
                .message
                .contains("function_call_output")
        );
        let image: Input = serde_json::from_value(json!([
            {"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}
        ]))
        .unwrap();
        assert!(
            input_messages(image)
                .unwrap_err()
                .message
                .contains("text-only")
        );
    }

    #[test]
    fn response_ids_round_trip_and_others_are_not_found() {
        let id = Uuid::new_v4();
        assert_eq!(response_id(&format!("resp_{}", id.simple())).unwrap(), id);
        for bad in ["resp_", "msg_00", "resp_xyz", ""] {
            assert_eq!(response_id(bad).unwrap_err().status, 404, "{bad}");
        }
    }
}
