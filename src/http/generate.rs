//! What the generation endpoints share: sampling fields, stop strings, running a request to
//! completion, and streaming it as server-sent events.

use std::convert::Infallible;
use std::future::Future;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::error::ApiError;
use crate::completion::{Finish, Step, TextStream, Timings};
use crate::engine::{GenerateRequest, Started};
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
}

impl SamplingFields {
    /// The validated parameters and the seed, if one was given.
    pub fn resolve(&self) -> Result<(SamplingParams, Option<u64>), ApiError> {
        let defaults = SamplingParams::default();
        let last_n = match self.repeat_last_n {
            None => defaults.penalty_last_n,
            Some(n) if n < 0 => usize::MAX, // llama-server's -1: the whole context
            Some(n) => n as usize,
        };
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.map_or(defaults.top_k, |k| k.max(0) as usize),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repeat_penalty: self.repeat_penalty.unwrap_or(defaults.repeat_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(defaults.frequency_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            penalty_last_n: last_n,
        };
        params.validate().map_err(ApiError::bad_request)?;
        let seed = self.seed.and_then(|s| u64::try_from(s).ok());
        Ok((params, seed))
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
    pub finish: Finish,
    pub timings: Timings,
}

/// Submits a request and waits until the engine admits it; a fleet member first fetches the
/// request's conversation from the shared bucket when it lacks it.
pub async fn submit(
    state: &AppState,
    request: GenerateRequest,
    stops: Vec<String>,
) -> Result<TextStream, ApiError> {
    if let Some(session) = request.session {
        state.fetch(session).await?;
    }
    let events = state.engine.generate(request)?;
    Ok(TextStream::start(events, stops).await?)
}

/// Reads a stream to its end.
pub async fn collect(mut stream: TextStream) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    while let Some(step) = stream.next().await {
        match step {
            Step::Text {
                text: t,
                tokens: ids,
            } => {
                text.push_str(&t);
                tokens.extend(ids);
            }
            Step::Done { finish, timings } => {
                return Ok(Collected {
                    started: stream.started().clone(),
                    text,
                    tokens,
                    finish,
                    timings,
                });
            }
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
