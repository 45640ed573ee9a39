//! llama-server's `/slots`: `GET /slots`, `POST /slots/{id}?action=save|restore|erase`.
//!
//! File names are checked as names, not paths: no separators, no `..`, no NUL or control
//! characters, at most 255 bytes. The file is then opened inside `--slot-save-path` with
//! `O_NOFOLLOW` (engine), so a symbolic link placed in the folder is refused, never followed.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use crate::engine::SessionInfo;

pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if !state.options.slots {
        return Err(ApiError::not_supported(
            "this server was started with --no-slots: GET /slots is off",
        ));
    }
    Ok(Json(json!(state.engine.slots().await?)))
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

pub async fn action(
    State(state): State<AppState>,
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
        let saved = state.engine.slot_save(slot, path).await?;
        Ok(Json(json!({
            "id_slot": slot, "filename": name, "n_saved": saved.tokens,
            "n_written": saved.bytes, "timings": { "save_ms": saved.millis },
        })))
    } else {
        let restored = state.engine.slot_restore(slot, path).await?;
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
