//! What the generation endpoints share: sampling fields, stop strings, running a request to
//! completion, and streaming it as server-sent events.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::{AppState, ServerOptions};
use crate::completion::{Finish, Step, TextStream, Timings};
use crate::engine::{Constraint, GenerateRequest, Started, TokenProbs};
use crate::sampling::SamplingParams;

/// Sampling fields every generation route accepts (llama-server's names; OpenAI's are a subset).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    /// Negative means "no seed" (llama-server's -1).
    pub seed: Option<i64>,
    /// `{token: bias}` or `[[token, bias], …]`; a token is an id or a text (each of its tokens
    /// biased); a bias of `false` bans the token.
    pub logit_bias: Option<Value>,
}

impl SamplingFields {
    /// The validated parameters and the seed, if one was given. What the request leaves out
    /// comes from the server's defaults (`--temp`, `--seed`); the server's seed never re-seeds a
    /// conversation (`session`), whose own random stream continues instead.
    pub async fn resolve(
        &self,
        state: &AppState,
        session: Option<uuid::Uuid>,
    ) -> Result<(SamplingParams, Option<u64>), ApiError> {
        let server: &ServerOptions = &state.options;
        let defaults = SamplingParams::default();
        let last_n = match self.repeat_last_n {
            None => defaults.penalty_last_n,
            Some(n) if n < 0 => usize::MAX, // llama-server's -1: the whole context
            Some(n) => n as usize,
        };
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(server.temperature),
            top_k: self.top_k.map_or(defaults.top_k, |k| k.max(0) as usize),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            penalty_last_n: last_n,
            logit_bias: match &self.logit_bias {
                Some(bias) => logit_bias(state, bias).await?,
                None => Vec::new(),
            },
        };
        params.validate().map_err(ApiError::bad_request)?;
        let seed = match self.seed {
            Some(seed) => u64::try_from(seed).ok(),
            None if session.is_none() => server.seed,
            None => None,
        };
        Ok((params, seed))
    }
}

/// llama-server's and OpenAI's `logit_bias` forms, as (token id, bias) pairs.
async fn logit_bias(state: &AppState, value: &Value) -> Result<Vec<(i32, f32)>, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "logit_bias must be an object {\"token\": bias} or a list [[token, bias], …], where a \
             token is an id or a text and a bias is a number or false",
        )
    };
    let entries: Vec<(Value, &Value)> = match value {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (Value::String(k.clone()), v))
            .collect(),
        Value::Array(list) => list
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([token, bias]) => Ok((token.clone(), bias)),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    let n_vocab = state.engine.info().n_vocab as i64;
    let mut pairs = Vec::new();
    for (token, bias) in entries {
        let bias = match bias {
            Value::Bool(false) => f32::NEG_INFINITY,
            Value::Number(n) => n.as_f64().ok_or_else(bad)? as f32,
            _ => return Err(bad()),
        };
        let ids = match &token {
            Value::Number(n) => vec![n.as_i64().ok_or_else(bad)?],
            Value::String(text) => match text.parse::<i64>() {
                Ok(id) => vec![id],
                Err(_) => state
                    .engine
                    .tokenize(text.clone(), false, false)
                    .await?
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            },
            _ => return Err(bad()),
        };
        for id in ids {
            if !(0..n_vocab).contains(&id) {
                return Err(ApiError::bad_request(format!(
                    "logit_bias names token {id}, which is not in the vocabulary (0 to {})",
                    n_vocab - 1
                )));
            }
            pairs.push((id as i32, bias));
        }
    }
    Ok(pairs)
}

/// The request fields beyond sampling that shape the output or what is reported about it.
#[derive(Debug, Default, Deserialize)]
pub struct OutputFields {
    /// llama.cpp GBNF the reply must match.
    pub grammar: Option<String>,
    /// A JSON schema the reply must match (llama-server's field).
    pub json_schema: Option<Value>,
    /// OpenAI's `{"type": "json_object" | "json_schema" | "text", …}`.
    pub response_format: Option<Value>,
    /// Add `__verbose` (the prompt as rendered) to the reply; default: the server's --verbose.
    pub verbose: Option<bool>,
    /// Add `timings` to every streamed chunk.
    #[serde(default)]
    pub timings_per_token: bool,
    /// Stream `prompt_progress` chunks while the prompt is evaluated.
    #[serde(default)]
    pub return_progress: bool,
}

impl OutputFields {
    /// The grammar the reply is held to, if any; a malformed format is a 400.
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let schema = |value: &Value| -> Result<Constraint, ApiError> {
            if !value.is_object() && !value.is_boolean() {
                return Err(ApiError::bad_request(
                    "a JSON schema must be a JSON object such as {\"type\": \"object\"}",
                ));
            }
            Ok(Constraint::JsonSchema(value.to_string()))
        };
        let given = [
            self.grammar.is_some(),
            self.json_schema.is_some(),
            self.response_format.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ApiError::bad_request(
                "send one of grammar, json_schema and response_format",
            ));
        }
        if let Some(grammar) = &self.grammar {
            return Ok(Some(Constraint::Grammar(grammar.clone())));
        }
        if let Some(value) = &self.json_schema {
            return schema(value).map(Some);
        }
        let Some(format) = &self.response_format else {
            return Ok(None);
        };
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => match format.get("schema") {
                Some(value) => schema(value).map(Some),
                // OpenAI's JSON mode: an object, whatever its keys.
                None => Ok(Some(Constraint::JsonSchema(r#"{"type": "object"}"#.into()))),
            },
            Some("json_schema") => {
                let value = format
                    .get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "response_format of type json_schema needs json_schema.schema",
                        )
                    })?;
                schema(value).map(Some)
            }
            _ => Err(ApiError::bad_request(
                "response_format.type must be text, json_object or json_schema",
            )),
        }
    }
}

/// `stop` as one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

pub fn stop_strings(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    if stops.len() > 16 || stops.iter().any(|s| s.len() > 1024) {
        return Err(ApiError::bad_request(
            "stop takes at most 16 strings of at most 1024 bytes each",
        ));
    }
    Ok(stops)
}

/// A whole, non-streamed result.
pub struct Collected {
    pub started: Started,
    pub text: String,
    pub tokens: Vec<i32>,
    pub probs: Vec<TokenProbs>,
    pub finish: Finish,
    pub timings: Timings,
}

/// Submits a request and waits until the engine admits it; a fleet member first fetches the
/// request's conversation from the shared bucket when it lacks it, and, once the prompt is
/// tokenized, a kept prefix of it the bucket holds more of than the local store.
pub async fn submit(
    state: &AppState,
    mut request: GenerateRequest,
    stops: Vec<String>,
) -> Result<TextStream, ApiError> {
    // The engine ends the turn at a stop string itself, so the turn saved is the turn shown.
    request.stops = stops.clone();
    if let Some(session) = request.session {
        state
            .conversations
            .before_turn(session, &request.requester)
            .await?;
    }
    let prepared = state.engine.prepare(request).await?;
    state.conversations.before_admit(&prepared).await;
    let events = state.engine.admit(prepared)?;
    Ok(TextStream::start(events, stops, state.totals.clone()).await?)
}

/// Reads a stream to its end.
pub async fn collect(mut stream: TextStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut all_probs = Vec::new();
    while let Some(step) = stream.next().await {
        match step {
            Step::Text {
                text: t,
                tokens: ids,
                probs,
            } => {
                text.push_str(&t);
                tokens.extend(ids);
                all_probs.extend(probs);
            }
            Step::Done { finish, timings } => {
                return Ok(Collected {
                    started: stream.started().clone(),
                    text,
                    tokens,
                    probs: all_probs,
                    finish,
                    timings,
                });
            }
            Step::Progress { .. } => {}
            Step::Failed(error) => return Err(error.into()),
        }
    }
    Err(ApiError::unavailable("the server is shutting down", 5))
}

/// An SSE response fed by `produce`, which runs as its own task. When the client goes away the
/// channel closes, `produce` drops its `TextStream`, and the engine stops generating.
pub fn sse_response<F, Fut>(produce: F) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    F: FnOnce(mpsc::Sender<SseEvent>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(produce(sender));
    Sse::new(ReceiverStream::new(receiver).map(Ok)).keep_alive(KeepAlive::default())
}

/// One SSE `data:` line holding JSON.
pub fn json_event(value: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// llama-server's `prompt_progress`: of `total` prompt tokens, `cache` were reused and
/// `processed` (those included) are in the sequence.
pub fn prompt_progress(started: &Started, timings: &Timings) -> Value {
    json!({
        "total": started.prompt_tokens,
        "cache": started.cached_tokens,
        "processed": started.cached_tokens + timings.prompt_n,
        "time_ms": timings.prompt_ms,
    })
}

/// A token's text as llama-server and OpenAI show it (invalid UTF-8 replaced), and its bytes.
fn token_text(piece: &[u8]) -> (String, Vec<u8>) {
    (String::from_utf8_lossy(piece).into_owned(), piece.to_vec())
}

/// llama-server's `completion_probabilities` entry: `logprob`/`top_logprobs` for the model's
/// own distribution, `prob`/`top_probs` after sampling.
pub fn native_probs(probs: &TokenProbs, after_sampling: bool) -> Value {
    let entry = |id: i32, piece: &[u8], prob: f32| {
        let (token, bytes) = token_text(piece);
        if after_sampling {
            json!({ "id": id, "token": token, "bytes": bytes, "prob": prob })
        } else {
            json!({ "id": id, "token": token, "bytes": bytes, "logprob": logprob(prob) })
        }
    };
    let mut value = entry(probs.id, &probs.piece, probs.prob);
    let top: Vec<Value> = probs
        .top
        .iter()
        .map(|c| entry(c.id, &c.piece, c.prob))
        .collect();
    let key = if after_sampling {
        "top_probs"
    } else {
        "top_logprobs"
    };
    value[key] = json!(top);
    value
}

/// OpenAI's `logprobs.content` entry.
pub fn openai_logprobs(probs: &TokenProbs) -> Value {
    let entry = |piece: &[u8], prob: f32| {
        let (token, bytes) = token_text(piece);
        json!({ "token": token, "logprob": logprob(prob), "bytes": bytes })
    };
    let mut value = entry(&probs.piece, probs.prob);
    value["top_logprobs"] = json!(
        probs
            .top
            .iter()
            .map(|c| entry(&c.piece, c.prob))
            .collect::<Vec<_>>()
    );
    value
}

/// ln(p), with JSON's lack of -inf turned into a very unlikely finite value, as llama-server
/// does.
fn logprob(prob: f32) -> f32 {
    if prob > 0.0 { prob.ln() } else { -1e6 }
}
