//! `POST /v1/chat/completions` and `POST /v1/completions`, as OpenAI's API has them.
//!
//! Extensions: `session_id` (or the `X-Session-Id` header) names the conversation, and the
//! llama-server sampling fields (`top_k`, `min_p`, `repeat_penalty`, …) are accepted.

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
    Collected, SamplingFields, StopField, collect, json_event, sse_response, stop_strings, submit,
};
use crate::completion::{Step, TextStream};
use crate::engine::{ChatMessage, GenerateRequest, Prompt};

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
    #[serde(flatten)]
    sampling: SamplingFields,
}

#[derive(Debug, Deserialize)]
struct ChatMessageIn {
    role: String,
    content: Option<MessageContent>,
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
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    stop: Option<StopField>,
    n: Option<u32>,
    session_id: Option<String>,
    cache_prompt: Option<bool>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// A prompt as text, a one-element list of text, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<i32>),
    Texts(Vec<String>),
}

impl PromptField {
    pub fn into_prompt(self) -> Result<Prompt, ApiError> {
        match self {
            PromptField::Text(text) => Ok(Prompt::Text(text)),
            PromptField::Tokens(tokens) => Ok(Prompt::Tokens(tokens)),
            PromptField::Texts(mut texts) if texts.len() == 1 => Ok(Prompt::Text(texts.remove(0))),
            PromptField::Texts(_) => {
                Err(ApiError::bad_request("send exactly one prompt per request"))
            }
        }
    }
}

/// The body of `/apply-template` and `/chat/completions/input_tokens`: a chat request, of which
/// only the messages count.
#[derive(Debug, Deserialize)]
pub struct MessagesRequest {
    messages: Vec<ChatMessageIn>,
}

/// llama-server's `POST /apply-template`: the prompt a chat request's messages render to.
pub async fn apply_template(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<MessagesRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = render(&state, body).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// llama-server's `POST /chat/completions/input_tokens`: how many tokens a chat request's
/// prompt holds, counted as the request itself would tokenize it.
pub async fn input_tokens(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<MessagesRequest>,
) -> Result<Json<Value>, ApiError> {
    let prompt = render(&state, body).await?;
    let tokens = state.engine.tokenize(prompt, true, true).await?;
    Ok(Json(json!({ "input_tokens": tokens.len() })))
}

/// The prompt the request's messages render to with the model's chat template.
async fn render(state: &AppState, body: MessagesRequest) -> Result<String, ApiError> {
    Ok(state
        .engine
        .render_chat(chat_messages(body.messages)?)
        .await?)
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

fn chat_messages(messages: Vec<ChatMessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must hold at least one message",
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
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        if part.kind != "text" {
                            return Err(ApiError::bad_request(format!(
                                "content parts of type {:?} are not supported; send text",
                                part.kind
                            )));
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
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn max_tokens(value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(n) if n < 1 => Err(ApiError::bad_request("max_tokens must be at least 1")),
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
    single_choice(body.n)?;
    let (sampling, seed) = body.sampling.resolve()?;
    let request = GenerateRequest {
        session,
        prompt: Prompt::Chat(chat_messages(body.messages)?),
        max_tokens: max_tokens(body.max_completion_tokens.or(body.max_tokens))?,
        sampling,
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: false,
        requester: caller.requester(),
    };
    let stops = stop_strings(body.stop)?;
    let stream = submit(&state, request, stops).await?;
    let id = format!("chatcmpl-{}", Uuid::new_v4().simple());
    let model = state.engine.info().id.clone();

    if body.stream {
        let include_usage = body.stream_options.unwrap_or_default().include_usage;
        let response = stream_chat(stream, id, model, include_usage, session).into_response();
        return Ok(with_session_header(response, session));
    }
    let c = collect(stream).await?;
    let mut reply = json!({
        "id": id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": c.text },
            "finish_reason": c.finish.openai_reason(),
        }],
        "usage": usage(c.started.prompt_tokens, c.started.cached_tokens, c.timings.predicted_n),
    });
    if let Some(id) = session {
        reply["session_id"] = json!(id);
    }
    Ok(with_session_header(Json(reply).into_response(), session))
}

fn stream_chat(
    mut stream: TextStream,
    id: String,
    model: String,
    include_usage: bool,
    session: Option<Uuid>,
) -> impl IntoResponse {
    sse_response(move |events| async move {
        let created = now();
        let chunk = |delta: Value, finish: Value| {
            let mut value = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
            });
            if let Some(s) = session {
                value["session_id"] = json!(s);
            }
            value
        };
        let first = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
        if events.send(json_event(&first)).await.is_err() {
            return;
        }
        while let Some(step) = stream.next().await {
            let event = match step {
                Step::Text { text, .. } if text.is_empty() => continue,
                Step::Text { text, .. } => chunk(json!({ "content": text }), Value::Null),
                Step::Done { finish, timings } => {
                    let last = chunk(json!({}), json!(finish.openai_reason()));
                    if events.send(json_event(&last)).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let started = stream.started();
                        let mut usage_chunk = chunk(json!({}), Value::Null);
                        usage_chunk["choices"] = json!([]);
                        usage_chunk["usage"] = usage(
                            started.prompt_tokens,
                            started.cached_tokens,
                            timings.predicted_n,
                        );
                        if events.send(json_event(&usage_chunk)).await.is_err() {
                            return;
                        }
                    }
                    break;
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
    let (sampling, seed) = body.sampling.resolve()?;
    let request = GenerateRequest {
        session,
        prompt: body.prompt.into_prompt()?,
        max_tokens: max_tokens(body.max_tokens)?,
        sampling,
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: false,
        requester: caller.requester(),
    };
    let stops = stop_strings(body.stop)?;
    let stream = submit(&state, request, stops).await?;
    let id = format!("cmpl-{}", Uuid::new_v4().simple());
    let model = state.engine.info().id.clone();
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
