//! Encryption at rest over HTTP: `POST /admin/v1/rekey` (reload the key file, seal everything
//! again with its current key, in the background) and `GET /admin/v1/rekey` (how far it got);
//! and the sealing of exported snapshot files (`?sealed=true`) and opening of uploaded ones.

use axum::Json;
use axum::extract::State;

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::engine::Requester;
use crate::keys;
use crate::sessions::RekeyStatus;

pub async fn start(State(state): State<AppState>) -> Result<Json<RekeyStatus>, ApiError> {
    Ok(Json(state.rekeys.start()?))
}

pub async fn status(State(state): State<AppState>) -> Json<RekeyStatus> {
    Json(state.rekeys.status())
}

/// A snapshot file sealed with this instance's current key, for an export that asked for it:
/// bound to `owner`, the conversation's.
pub fn seal_export(
    state: &AppState,
    file: Vec<u8>,
    owner: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let Some(keys) = state.store.keys() else {
        return Err(ApiError::bad_request(
            "sealed=true needs encryption at rest: this instance has no key file \
             (--encryption-key-file)",
        ));
    };
    Ok(keys::sealed_file(&keys.ring(), &file, owner))
}

/// An uploaded file as a snapshot file: opened with this instance's keys when it is sealed. A
/// sealed file names its conversation's owner: a user key may upload only its own (or one of
/// nobody's), and a file sealed before files named owners only an admin may.
pub fn open_upload(state: &AppState, body: Vec<u8>, caller: &Caller) -> Result<Vec<u8>, ApiError> {
    if !keys::is_sealed_file(&body) {
        return Ok(body);
    }
    let Some(keys) = state.store.keys() else {
        return Err(ApiError::bad_request(
            "the file is a sealed snapshot, and this instance has no key file to open it \
             (--encryption-key-file)",
        ));
    };
    let (file, owner) = keys::open_sealed_file(&keys.ring(), &body)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let requester = caller.requester();
    let allowed = match (&requester, owner) {
        (Requester::User(_), None) => false,
        (requester, Some(owner)) => requester.may_use(&owner),
        (_, None) => true,
    };
    if !allowed {
        return Err(ApiError::forbidden(
            "this sealed snapshot belongs to another key (or predates sealed files naming \
             their owner): only its owner or an admin may upload it",
        ));
    }
    Ok(file)
}
