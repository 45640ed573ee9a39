//! llama-server's native routes: `POST /completion`, `POST /tokenize`, `POST /detokenize`.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use super::extract::{ApiJson, session_id};
use super::generate::{
    SamplingFields, StopField, collect, json_event, sse_response, stop_strings, submit,
};
use super::openai::{PromptField, with_session_header};
use crate::completion::{Finish, Step, Timings};
use crate::engine::{GenerateRequest, Started};

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: PromptField,
    n_predict: Option<i64>,
    #[serde(default)]
    stream: bool,
    cache_prompt: Option<bool>,
    #[serde(default)]
    return_tokens: bool,
    #[serde(default)]
    ignore_eos: bool,
    stop: Option<StopField>,
    session_id: Option<String>,
    #[serde(flatten)]
    sampling: SamplingFields,
}

/// llama-server's `n_predict`: -1 (or -2) means "until the end", 0 only evaluates the prompt.
fn n_predict(value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None | Some(-1) | Some(-2) => Ok(None),
        Some(n) if n < 0 => Err(ApiError::bad_request(
            "n_predict must be -1 (no limit) or a number of tokens",
        )),
        Some(n) => Ok(Some(n.min(i64::from(u32::MAX)) as u32)),
    }
}

fn timings_json(t: &Timings) -> Value {
    let per_second = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let per_token = |n: usize, ms: f64| if n > 0 { ms / n as f64 } else { 0.0 };
    json!({
        "cache_n": t.cache_n,
        "prompt_n": t.prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": per_token(t.prompt_n, t.prompt_ms),
        "prompt_per_second": per_second(t.prompt_n, t.prompt_ms),
        "predicted_n": t.predicted_n,
        "predicted_ms": t.predicted_ms,
        "predicted_per_token_ms": per_token(t.predicted_n, t.predicted_ms),
        "predicted_per_second": per_second(t.predicted_n, t.predicted_ms),
    })
}

fn stop_type(finish: &Finish) -> (&'static str, String) {
    match finish {
        Finish::Eog => ("eos", String::new()),
        Finish::Length | Finish::ContextFull => ("limit", String::new()),
        Finish::Stop(word) => ("word", word.clone()),
        Finish::Cancelled => ("none", String::new()),
    }
}

/// The final object of a `/completion` answer.
fn final_fields(
    model: &str,
    started: &Started,
    finish: &Finish,
    timings: &Timings,
    session: Option<uuid::Uuid>,
) -> Value {
    let (stop_type, stopping_word) = stop_type(finish);
    let mut value = json!({
        "stop": true,
        "model": model,
        "id_slot": started.slot,
        "tokens_predicted": timings.predicted_n,
        "tokens_evaluated": started.prompt_tokens,
        "tokens_cached": started.prompt_tokens + timings.predicted_n,
        "stop_type": stop_type,
        "stopping_word": stopping_word,
        "truncated": false,
        "timings": timings_json(timings),
    });
    if let Some(id) = session {
        value["session_id"] = json!(id);
    }
    value
}

pub async fn completion(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let session = session_id(&headers, body.session_id.as_deref())?;
    let (sampling, seed) = body.sampling.resolve()?;
    let request = GenerateRequest {
        session,
        prompt: body.prompt.into_prompt()?,
        max_tokens: n_predict(body.n_predict)?,
        sampling,
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: body.ignore_eos,
        requester: caller.requester(),
    };
    let stops = stop_strings(body.stop)?;
    let mut stream = submit(&state, request, stops).await?;
    let model = state.engine.info().id.clone();
    let return_tokens = body.return_tokens;

    if body.stream {
        let response = sse_response(move |events| async move {
            while let Some(step) = stream.next().await {
                let event = match step {
                    Step::Text { text, tokens } => {
                        let tokens = if return_tokens { tokens } else { Vec::new() };
                        json!({
                            "content": text, "tokens": tokens, "stop": false,
                            "id_slot": stream.started().slot,
                        })
                    }
                    Step::Done { finish, timings } => {
                        let mut last =
                            final_fields(&model, stream.started(), &finish, &timings, session);
                        last["content"] = json!("");
                        last["tokens"] = json!([]);
                        last
                    }
                    Step::Failed(error) => ApiError::from(error).body(),
                };
                if events.send(json_event(&event)).await.is_err() {
                    return;
                }
            }
        });
        return Ok(with_session_header(response.into_response(), session));
    }

    let c = collect(stream).await?;
    let mut reply = final_fields(&model, &c.started, &c.finish, &c.timings, session);
    reply["content"] = json!(c.text);
    reply["tokens"] = json!(if return_tokens { c.tokens } else { Vec::new() });
    Ok(with_session_header(Json(reply).into_response(), session))
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
}

fn yes() -> bool {
    true
}

pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<TokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state
        .engine
        .tokenize(body.content, body.add_special, body.parse_special)
        .await?;
    Ok(Json(json!({ "tokens": tokens })))
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    tokens: Vec<i32>,
}

pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<DetokenizeRequest>,
) -> Result<Json<Value>, ApiError> {
    let content = state.engine.detokenize(body.tokens).await?;
    Ok(Json(json!({ "content": content })))
}
