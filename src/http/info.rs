//! `/health`, `/v1/models`, `/props` and `/metrics`.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

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

pub async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.id,
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
    Json(json!({
        "default_generation_settings": {
            "n_ctx": info.n_ctx_per_sequence,
            "params": {
                "n_predict": -1,
                // llama-server's "no seed": each request draws one (kvsnap: or continues the
                // conversation's own random stream).
                "seed": u32::MAX,
                "temperature": defaults.temperature,
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
        "model_alias": info.id,
        "model_path": info.id,
        "modalities": {"vision": false, "video": false, "audio": false},
        "endpoint_slots": true,
        "endpoint_props": false,
        "endpoint_metrics": true,
        "chat_template": info.chat_template,
        "bos_token": info.bos_token,
        "eos_token": info.eos_token,
        "build_info": format!(
            "kvsnap {} (compute profile {})",
            env!("CARGO_PKG_VERSION"),
            crate::compute::THIS_BUILD
        ),
        "is_sleeping": false,
    }))
}

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> String {
    metrics::gauge!("kvsnap_queue_depth").set(state.engine.queue_depth() as f64);
    metrics::gauge!("kvsnap_active_requests").set(state.engine.active() as f64);
    state.metrics.render()
}
