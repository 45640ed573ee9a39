//! `/health`, `/v1/models`, `/props` and `/metrics`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

/// 200 once the model is loaded (the port only opens then); 503 while shutting down. With a
/// fleet bucket that keeps failing, still 200 (serving goes on from the local store) but
/// "degraded", with the reason and the uploads waiting.
pub async fn health(State(state): State<AppState>) -> Response {
    if state.shutting_down.load(Ordering::Relaxed) {
        return ApiError::unavailable("the server is shutting down", 5).into_response();
    }
    let Some(fleet) = &state.fleet else {
        return Json(json!({ "status": "ok" })).into_response();
    };
    let remote = fleet.health();
    let status = if remote.last_error.is_some() {
        "degraded"
    } else {
        "ok"
    };
    Json(json!({ "status": status, "remote": remote })).into_response()
}

/// The model's id in answers: its first alias, else its file name.
pub fn model_id(state: &AppState) -> String {
    match state.options.aliases.first() {
        Some(alias) => alias.clone(),
        None => state.engine.info().id.clone(),
    }
}

pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": model_id(&state),
            "aliases": state.options.aliases,
            "tags": state.options.tags,
            "object": "model",
            "created": 0,
            "owned_by": "kvsnap",
            "meta": {
                "architecture": info.architecture,
                "file_hash": info.file_hash,
                "size": info.file_bytes,
                "n_vocab": info.n_vocab,
                "n_ctx_train": info.n_ctx_train,
                "n_ctx": info.n_ctx,
                "n_ctx_per_sequence": info.n_ctx_per_sequence,
                "n_embd": info.n_embd,
                "n_layer": info.n_layer,
                "n_swa": info.n_swa,
                "window": info.window_kind,
                "parallel": info.parallel,
            },
        }],
    }))
}

/// llama-server's `/props`, which its web UI and other frontends read at start: the defaults a
/// request gets, the slots, the model and its chat template. The model is named by its file
/// name, not its path on this server.
pub async fn props(State(state): State<AppState>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    let defaults = crate::sampling::SamplingParams::default();
    let options = &state.options;
    Json(json!({
        "default_generation_settings": {
            "n_ctx": info.n_ctx_per_sequence,
            "params": {
                "n_predict": options.n_predict.map_or(-1, i64::from),
                // u32::MAX is llama-server's "no seed": each request draws one (kvsnap: or
                // continues the conversation's own random stream).
                "seed": options.seed.unwrap_or(u64::from(u32::MAX)),
                "temperature": options.temperature,
                "top_k": defaults.top_k,
                "top_p": defaults.top_p,
                "min_p": defaults.min_p,
                "repeat_penalty": defaults.repeat_penalty,
                "repeat_last_n": defaults.penalty_last_n,
                "frequency_penalty": defaults.frequency_penalty,
                "presence_penalty": defaults.presence_penalty,
            },
        },
        "total_slots": info.parallel,
        "model_alias": model_id(&state),
        "model_path": info.id,
        "modalities": {"vision": false, "video": false, "audio": false},
        "endpoint_slots": options.slots,
        "endpoint_props": false,
        "endpoint_metrics": options.metrics,
        "chat_template": info.chat_template,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "build_info": format!(
            "kvsnap {} (compute profile {})",
            env!("CARGO_PKG_VERSION"),
            crate::compute::THIS_BUILD
        ),
        "is_sleeping": state.engine.is_sleeping(),
    }))
}

/// Prometheus text format: llama-server's `llamacpp:*` figures, then kvsnap's own.
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.options.metrics {
        return Err(ApiError::not_supported(
            "this server was started with --no-metrics: GET /metrics is off",
        ));
    }
    metrics::gauge!("kvsnap_queue_depth").set(state.engine.queue_depth() as f64);
    metrics::gauge!("kvsnap_active_requests").set(state.engine.active() as f64);
    metrics::gauge!("kvsnap_asleep").set(if state.engine.is_sleeping() { 1.0 } else { 0.0 });
    let usage = state.conversations.store_usage().await?;
    metrics::gauge!("kvsnap_unnamed_entries").set(usage.entries as f64);
    metrics::gauge!("kvsnap_store_page_bytes").set(usage.page_bytes as f64);
    metrics::gauge!("kvsnap_store_budget_bytes").set(usage.budget_bytes as f64);
    let mut text = llama_server_metrics(&state);
    text.push_str(&state.metrics.render());
    let mut response = text.into_response();
    response.headers_mut().insert(
        "process-start-time-unix",
        axum::http::HeaderValue::from(state.started_unix),
    );
    Ok(response)
}

/// `GET /admin/v1/store`: what the store holds, and how much of it unnamed entries (states of
/// requests that named no conversation, dropped first past the budget).
pub async fn store_usage(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let usage = state.conversations.store_usage().await?;
    Ok(Json(json!({
        "unnamed_entries": usage.entries,
        "page_bytes": usage.page_bytes,
        "budget_bytes": usage.budget_bytes,
    })))
}

/// llama-server's metric names and meanings, for dashboards built on them.
fn llama_server_metrics(state: &AppState) -> String {
    let (totals, window) = state.totals.scrape();
    let decode = state.engine.decode_stats();
    let rate = |n: u64, seconds: f64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    let busy_per_decode = if decode.calls > 0 {
        decode.sequences as f64 / decode.calls as f64
    } else {
        0.0
    };
    // kvsnap never drafts tokens: the speculative decoding counters stay 0.
    let figures: [(&str, &str, &str, f64); 15] = [
        (
            "prompt_tokens_total",
            "counter",
            "Number of prompt tokens processed.",
            totals.prompt_tokens as f64,
        ),
        (
            "prompt_tokens_cached_total",
            "counter",
            "Number of prompt tokens reused from the cache.",
            totals.cached_tokens as f64,
        ),
        (
            "prompt_seconds_total",
            "counter",
            "Prompt process time",
            totals.prompt_seconds,
        ),
        (
            "tokens_predicted_total",
            "counter",
            "Number of generation tokens processed.",
            totals.predicted_tokens as f64,
        ),
        (
            "tokens_predicted_seconds_total",
            "counter",
            "Predict process time",
            totals.predicted_seconds,
        ),
        (
            "n_decode_total",
            "counter",
            "Total number of llama_decode() calls",
            decode.calls as f64,
        ),
        (
            "n_tokens_max",
            "counter",
            "Largest observed n_tokens.",
            totals.max_tokens as f64,
        ),
        (
            "spec_decode_num_draft_tokens_total",
            "counter",
            "Number of speculative draft tokens.",
            0.0,
        ),
        (
            "spec_decode_num_accepted_tokens_total",
            "counter",
            "Number of accepted speculative tokens.",
            0.0,
        ),
        (
            "spec_decode_num_drafts_total",
            "counter",
            "Number of speculative drafts.",
            0.0,
        ),
        (
            "prompt_tokens_seconds",
            "gauge",
            "Average prompt throughput in tokens/s since the previous scrape.",
            rate(window.prompt_tokens, window.prompt_seconds),
        ),
        (
            "predicted_tokens_seconds",
            "gauge",
            "Average generation throughput in tokens/s since the previous scrape.",
            rate(window.predicted_tokens, window.predicted_seconds),
        ),
        (
            "requests_processing",
            "gauge",
            "Number of requests processing.",
            state.engine.active() as f64,
        ),
        (
            "requests_deferred",
            "gauge",
            "Number of requests deferred.",
            state.engine.queue_depth() as f64,
        ),
        (
            "n_busy_slots_per_decode",
            "gauge",
            "Average number of busy slots per llama_decode() call",
            busy_per_decode,
        ),
    ];
    let mut text = String::new();
    for (name, kind, help, value) in figures {
        text.push_str(&format!(
            "# HELP llamacpp:{name} {help}\n# TYPE llamacpp:{name} {kind}\nllamacpp:{name} {value}\n"
        ));
    }
    text
}
