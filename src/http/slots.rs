//! llama-server's `/slots`: `GET /slots`, `POST /slots/{id}?action=save|restore|erase`.
//!
//! File names are checked as names, not paths: no separators, no `..`, no NUL or control
//! characters, at most 255 bytes. The file is then opened inside `--slot-save-path` with
//! `O_NOFOLLOW` (engine), so a symbolic link placed in the folder is refused, never followed.

use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::engine::{Requester, SessionInfo};

/// Every slot; a slot's conversation is named only to those who may use it.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    if !state.options.slots {
        return Err(ApiError::not_supported(
            "this server was started with --no-slots: GET /slots is off",
        ));
    }
    let requester = caller.requester();
    let mut slots = state.engine.slots().await?;
    for slot in &mut slots {
        let theirs = match &requester {
            Requester::User(_) => requester.may_use(&slot.owner),
            _ => true,
        };
        if !theirs {
            slot.session_id = None;
        }
    }
    Ok(Json(json!(slots)))
}

#[derive(Debug, Deserialize)]
pub struct ActionQuery {
    action: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ActionBody {
    filename: Option<String>,
}

/// A file name that cannot leave the folder, or why not.
fn checked_name(name: Option<&str>) -> Result<&str, ApiError> {
    let name = name.ok_or_else(|| ApiError::bad_request("filename is required"))?;
    let bad = |why: &str| {
        Err(ApiError::bad_request(format!(
            "invalid filename {name:?}: {why}"
        )))
    };
    if name.is_empty() || name == "." || name == ".." {
        return bad("it names no file");
    }
    if name.len() > 255 {
        return bad("it is longer than 255 bytes");
    }
    if name.contains(['/', '\\']) {
        return bad("it contains a path separator");
    }
    if name.contains("..") {
        return bad("it contains \"..\"");
    }
    if name.chars().any(char::is_control) {
        return bad("it contains a control character");
    }
    Ok(name)
}

/// Save, restore and erase act on whatever a slot holds, whoever's it is, and slot files are
/// one folder for the whole server: with keys configured, they need an admin key.
pub async fn action(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<ActionQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let slot: usize = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("slot id must be a number, got {id:?}")))?;
    // Erase needs no body; save and restore send `{"filename": …}`.
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON for this route: {e}"
            ))
        })?
    };
    if let Caller::User(_) = caller {
        return Err(ApiError::forbidden(
            "slot save, restore and erase act on every key's prompts: they need an admin key \
             (--admin-api-key)",
        ));
    }
    let action = query.action.as_deref().unwrap_or("");
    if action == "erase" {
        let n_erased = state.engine.slot_erase(slot).await?;
        return Ok(Json(json!({ "id_slot": slot, "n_erased": n_erased })));
    }
    if action != "save" && action != "restore" {
        return Err(ApiError::bad_request(format!(
            "action must be save, restore or erase, got {action:?}"
        )));
    }
    let dir = state.slot_dir.as_ref().ok_or_else(|| {
        ApiError::bad_request("slot files are off: start kvsnap with --slot-save-path DIR")
    })?;
    let name = checked_name(body.filename.as_deref())?;
    let path = dir.join(name);
    if action == "save" {
        if state.store.is_sealed() {
            return Err(ApiError::bad_request(
                "slot files are llama.cpp's plain format, and this server keeps conversations \
                 encrypted (--encryption-key-file): a slot file would hold them in the clear; \
                 keep the conversation with a session_id, or export it sealed with \
                 GET /v1/sessions/{id}/export",
            ));
        }
        let saved = state.engine.slot_save(slot, path).await?;
        Ok(Json(json!({
            "id_slot": slot, "filename": name, "n_saved": saved.tokens,
            "n_written": saved.bytes, "timings": { "save_ms": saved.millis },
        })))
    } else {
        let restored = state
            .engine
            .slot_restore(slot, path, caller.requester())
            .await?;
        // A llama.cpp file does not say which build computed it.
        let exactness = SessionInfo::exactness_here(None, state.engine.info());
        Ok(Json(json!({
            "id_slot": slot, "filename": name, "n_restored": restored.tokens,
            "n_read": restored.bytes, "timings": { "restore_ms": restored.millis },
            "bit_exact": exactness.bit_exact, "exactness": exactness.exactness,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::checked_name;

    #[test]
    fn names_that_could_leave_the_folder_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a\\b",
            "/etc/passwd",
            "a\0b",
            "x..y",
            "a\nb",
        ] {
            assert!(checked_name(Some(bad)).is_err(), "{bad:?}");
        }
        assert!(checked_name(Some(&"x".repeat(256))).is_err());
        assert!(checked_name(None).is_err());
        assert_eq!(checked_name(Some("slot-0.bin")).unwrap(), "slot-0.bin");
    }
}
