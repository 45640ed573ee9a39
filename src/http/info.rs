//! `/health`, `/v1/models` and `/metrics`.

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

/// Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> String {
    metrics::gauge!("kvsnap_queue_depth").set(state.engine.queue_depth() as f64);
    metrics::gauge!("kvsnap_active_requests").set(state.engine.active() as f64);
    state.metrics.render()
}
