//! Encryption at rest over HTTP: `POST /admin/v1/rekey` (reload the key file, seal everything
//! again with its current key, in the background) and `GET /admin/v1/rekey` (how far it got);
//! and the sealing of exported snapshot files (`?sealed=true`) and opening of uploaded ones.

use axum::Json;
use axum::extract::State;

use super::{ApiError, AppState};
use crate::keys;
use crate::sessions::RekeyStatus;

pub async fn start(State(state): State<AppState>) -> Result<Json<RekeyStatus>, ApiError> {
    Ok(Json(state.rekeys.start()?))
}

pub async fn status(State(state): State<AppState>) -> Json<RekeyStatus> {
    Json(state.rekeys.status())
}

/// A snapshot file sealed with this instance's current key, for an export that asked for it.
pub fn seal_export(state: &AppState, file: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let Some(keys) = state.store.keys() else {
        return Err(ApiError::bad_request(
            "sealed=true needs encryption at rest: this instance has no key file \
             (--encryption-key-file)",
        ));
    };
    Ok(keys::sealed_file(&keys.ring(), &file))
}

/// An uploaded file as a snapshot file: opened with this instance's keys when it is sealed.
pub fn open_upload(state: &AppState, body: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    if !keys::is_sealed_file(&body) {
        return Ok(body);
    }
    let Some(keys) = state.store.keys() else {
        return Err(ApiError::bad_request(
            "the file is a sealed snapshot, and this instance has no key file to open it \
             (--encryption-key-file)",
        ));
    };
    keys::open_sealed_file(&keys.ring(), &body).map_err(|e| ApiError::bad_request(e.to_string()))
}
