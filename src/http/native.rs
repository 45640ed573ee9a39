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
    Collected, OutputFields, SamplingFields, StopField, collect, json_event, native_probs,
    prompt_progress, sse_response, stop_strings, submit,
};
use super::openai::{PromptField, with_session_header};
use crate::completion::{Finish, Step, TextStream, Timings};
use crate::engine::{GenerateRequest, ProbsRequest, Started};

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: PromptField,
    n_predict: Option<i64>,
    /// OpenAI's name, also accepted here.
    max_tokens: Option<i64>,
    #[serde(default)]
    stream: bool,
    cache_prompt: Option<bool>,
    #[serde(default)]
    return_tokens: bool,
    #[serde(default)]
    ignore_eos: bool,
    stop: Option<StopField>,
    session_id: Option<String>,
    /// Report each token's probability and this many likeliest alternatives.
    #[serde(default)]
    n_probs: usize,
    #[serde(default)]
    post_sampling_probs: bool,
    #[serde(flatten)]
    sampling: SamplingFields,
    #[serde(flatten)]
    output: OutputFields,
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

/// llama-server's `timings`. The generation rate leaves out the first token: it comes from the
/// prompt's last logits, so the time measured covers the steps after it.
pub fn timings_json(t: &Timings) -> Value {
    let per_second = |n: usize, ms: f64| if ms > 0.0 { n as f64 * 1e3 / ms } else { 0.0 };
    let per_token = |n: usize, ms: f64| if n > 0 { ms / n as f64 } else { 0.0 };
    let steps = t.predicted_n.saturating_sub(1);
    json!({
        "cache_n": t.cache_n,
        "prompt_n": t.prompt_n,
        "prompt_ms": t.prompt_ms,
        "prompt_per_token_ms": per_token(t.prompt_n, t.prompt_ms),
        "prompt_per_second": per_second(t.prompt_n, t.prompt_ms),
        "predicted_n": t.predicted_n,
        "predicted_ms": t.predicted_ms,
        "predicted_per_token_ms": per_token(steps, t.predicted_ms),
        "predicted_per_second": per_second(steps, t.predicted_ms),
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
    let (mut sampling, seed) = body.sampling.resolve(&state, session).await?;
    if body.ignore_eos {
        // As llama-server does: the tokens that would end the turn can never be drawn.
        let eog = &state.engine.info().eog_tokens;
        sampling
            .logit_bias
            .extend(eog.iter().map(|&token| (token, f32::NEG_INFINITY)));
    }
    let limit = n_predict(body.n_predict.or(body.max_tokens))?;
    let probs = (body.n_probs > 0).then_some(ProbsRequest {
        n: body.n_probs.min(MAX_N_PROBS),
        after_sampling: body.post_sampling_probs,
    });
    let prompts = body.prompt.into_prompts(&state).await?;
    if session.is_some() && prompts.len() > 1 {
        return Err(ApiError::bad_request(
            "a conversation (session_id) continues from one prompt; send one",
        ));
    }
    if body.stream && prompts.len() > 1 {
        return Err(ApiError::bad_request(
            "streaming takes one prompt; send several without stream",
        ));
    }
    let reply = Reply {
        model: super::info::model_id(&state),
        return_tokens: body.return_tokens,
        after_sampling: body.post_sampling_probs,
        timings_per_token: body.output.timings_per_token,
        return_progress: body.output.return_progress,
        verbose: body.output.verbose.unwrap_or(state.options.verbose),
        session,
    };
    let constraint = body.output.constraint()?;
    let stops = stop_strings(body.stop)?;
    let mut requests = prompts.into_iter().map(|prompt| GenerateRequest {
        session,
        prompt,
        max_tokens: state.options.token_limit(limit),
        sampling: sampling.clone(),
        seed,
        cache_prompt: body.cache_prompt.unwrap_or(true),
        ignore_eos: body.ignore_eos,
        requester: caller.requester(),
        constraint: constraint.clone(),
        probs,
        stops: Vec::new(),
    });

    if body.stream {
        let request = requests.next().expect("one prompt");
        let settings = generation_settings(&request, &state);
        let stream = submit(&state, request, stops).await?;
        let response = stream_completion(stream, reply, settings);
        return Ok(with_session_header(response.into_response(), session));
    }
    // Several prompts are answered one after another, in order.
    let mut replies = Vec::new();
    for request in requests {
        let settings = generation_settings(&request, &state);
        let stream = submit(&state, request, stops.clone()).await?;
        replies.push(reply.whole(collect(stream).await?, settings));
    }
    let body = if replies.len() == 1 {
        replies.remove(0)
    } else {
        Value::Array(replies)
    };
    Ok(with_session_header(Json(body).into_response(), session))
}

/// The most alternatives a token's probabilities list.
const MAX_N_PROBS: usize = 100;

/// What shapes a `/completion` answer beside the generated text.
#[derive(Clone)]
struct Reply {
    model: String,
    return_tokens: bool,
    after_sampling: bool,
    timings_per_token: bool,
    return_progress: bool,
    verbose: bool,
    session: Option<uuid::Uuid>,
}

impl Reply {
    /// The non-streamed answer.
    fn whole(&self, c: Collected, settings: Value) -> Value {
        let mut reply = final_fields(&self.model, &c.started, &c.finish, &c.timings, self.session);
        reply["content"] = json!(c.text);
        reply["tokens"] = json!(if self.return_tokens {
            c.tokens
        } else {
            Vec::new()
        });
        reply["generation_settings"] = settings;
        if !c.probs.is_empty() {
            reply["completion_probabilities"] = json!(
                c.probs
                    .iter()
                    .map(|p| native_probs(p, self.after_sampling))
                    .collect::<Vec<_>>()
            );
        }
        if self.verbose {
            reply["__verbose"] =
                json!({ "content": c.text, "tokens_evaluated": c.started.prompt_tokens });
        }
        reply
    }
}

/// The settings a request ran with, as llama-server reports them in `generation_settings`.
fn generation_settings(request: &GenerateRequest, state: &AppState) -> Value {
    let s = &request.sampling;
    json!({
        "n_predict": request.max_tokens.map_or(-1, i64::from),
        "seed": request.seed.unwrap_or(u64::from(u32::MAX)),
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty,
        "repeat_last_n": s.penalty_last_n,
        "frequency_penalty": s.frequency_penalty,
        "presence_penalty": s.presence_penalty,
        "n_probs": request.probs.map_or(0, |p| p.n),
        "ignore_eos": request.ignore_eos,
        // llama-server's form: a bias of -inf (a banned token) is null in JSON.
        "logit_bias": s.logit_bias.iter().map(|&(token, bias)| json!({
            "token": token,
            "bias": if bias.is_finite() { json!(bias) } else { Value::Null },
        })).collect::<Vec<_>>(),
        "model": super::info::model_id(state),
    })
}

fn stream_completion(mut stream: TextStream, reply: Reply, settings: Value) -> impl IntoResponse {
    sse_response(move |events| async move {
        while let Some(step) = stream.next().await {
            let event = match step {
                Step::Text {
                    text,
                    tokens,
                    probs,
                } => {
                    let tokens = if reply.return_tokens {
                        tokens
                    } else {
                        Vec::new()
                    };
                    let mut chunk = json!({
                        "content": text, "tokens": tokens, "stop": false,
                        "id_slot": stream.started().slot,
                    });
                    if !probs.is_empty() {
                        chunk["completion_probabilities"] = json!(
                            probs
                                .iter()
                                .map(|p| native_probs(p, reply.after_sampling))
                                .collect::<Vec<_>>()
                        );
                    }
                    if reply.timings_per_token {
                        chunk["timings"] = timings_json(&stream.timings_so_far());
                    }
                    chunk
                }
                Step::Done { finish, timings } => {
                    let mut last = final_fields(
                        &reply.model,
                        stream.started(),
                        &finish,
                        &timings,
                        reply.session,
                    );
                    last["content"] = json!("");
                    last["tokens"] = json!([]);
                    last["generation_settings"] = settings.clone();
                    last
                }
                Step::Progress { .. } if !reply.return_progress => continue,
                Step::Progress { timings } => json!({
                    "content": "", "tokens": [], "stop": false,
                    "id_slot": stream.started().slot,
                    "prompt_progress": prompt_progress(stream.started(), &timings),
                    "timings": timings_json(&timings),
                }),
                Step::Failed(error) => ApiError::from(error).body(),
            };
            if events.send(json_event(&event)).await.is_err() {
                return;
            }
        }
    })
}

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default = "yes")]
    parse_special: bool,
    /// Answer `{id, piece}` objects instead of bare ids.
    #[serde(default)]
    with_pieces: bool,
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
    if !body.with_pieces {
        return Ok(Json(json!({ "tokens": tokens })));
    }
    let pieces = state.engine.pieces(tokens.clone()).await?;
    // A piece that is not whole UTF-8 (part of a character) is shown as its bytes.
    let with_pieces: Vec<Value> = tokens
        .iter()
        .zip(pieces)
        .map(|(id, piece)| match String::from_utf8(piece) {
            Ok(text) => json!({ "id": id, "piece": text }),
            Err(bytes) => json!({ "id": id, "piece": bytes.into_bytes() }),
        })
        .collect();
    Ok(Json(json!({ "tokens": with_pieces })))
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
