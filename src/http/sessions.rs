//! `/v1/sessions`: list, describe, delete, save, fork, download and upload conversations.

use axum::Extension;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::ApiError;
use crate::engine::SessionInfo;

use super::extract::parse_session_id as parse_id;
use super::extract::read_upload;
use crate::snapshot::llama_file::SEQ_MAGIC;

#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

/// Newest use first; resident conversations show their live token count.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    let limit = page.limit.unwrap_or(50);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad_request("limit must be between 1 and 1000"));
    }
    let all = state
        .conversations
        .list(page.offset.saturating_add(limit), caller.requester())
        .await?;
    let data: Vec<SessionInfo> = all.into_iter().skip(page.offset).take(limit).collect();
    Ok(Json(
        json!({ "object": "list", "offset": page.offset, "data": data }),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        state.conversations.describe(id, caller.requester()).await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    state.conversations.delete(id, caller.requester()).await?;
    Ok(Json(json!({ "session_id": id, "deleted": true })))
}

/// Returns after the snapshot is committed to disk.
pub async fn save(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_id(&id)?;
    Ok(Json(
        state.conversations.save(id, caller.requester()).await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkBody {
    /// The new conversation's id; a new one when absent.
    session_id: Option<String>,
}

/// `POST /v1/sessions/{id}/fork`: a new conversation (same owner) that continues exactly as
/// this one would, sharing its stored pages. The body is optional: `{"session_id": "…"}`.
pub async fn fork(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_id(&id)?;
    let body: ForkBody = if body.iter().all(u8::is_ascii_whitespace) {
        ForkBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body must be empty or {{\"session_id\": \"UUID\"}}: {e}"
            ))
        })?
    };
    let into = id_or_new(body.session_id)?;
    Ok(Json(
        state
            .conversations
            .fork(id, into, caller.requester())
            .await?,
    ))
}

#[derive(Debug, Default, Deserialize)]
pub struct DownloadQuery {
    /// Seal the file with this instance's current key (`keys::sealed_file`).
    #[serde(default)]
    sealed: bool,
}

pub async fn download(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<DownloadQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let bytes = state.conversations.export(id, caller.requester()).await?;
    if query.sealed {
        let owner = state
            .conversations
            .describe(id, caller.requester())
            .await?
            .owner;
        let sealed = super::keys::seal_export(&state, bytes, owner.as_deref())?;
        return Ok(file_response(
            sealed,
            &format!("{id}.kvsnap.sealed"),
            "application/octet-stream",
        ));
    }
    Ok(file_response(
        bytes,
        &format!("{id}.kvsnap"),
        "application/vnd.kvsnap.snapshot",
    ))
}

#[derive(Debug, Deserialize)]
pub struct ExportQuery {
    format: Option<String>,
    #[serde(default)]
    sealed: bool,
}

/// `?format=llama` gives llama.cpp's `ggsq` v4; `kvsnap` (the default) the snapshot file.
pub async fn export(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match query.format.as_deref().unwrap_or("kvsnap") {
        "kvsnap" => {
            let sealed = DownloadQuery {
                sealed: query.sealed,
            };
            download(
                State(state),
                Extension(caller),
                Path(id.to_string()),
                Query(sealed),
            )
            .await
        }
        "llama" if query.sealed => Err(ApiError::bad_request(
            "sealed=true seals kvsnap snapshot files only; llama.cpp cannot read a sealed file",
        )),
        "llama" => {
            let bytes = state
                .conversations
                .export_llama(id, caller.requester())
                .await?;
            Ok(file_response(
                bytes,
                &format!("{id}.ggsq"),
                "application/octet-stream",
            ))
        }
        other => Err(ApiError::bad_request(format!(
            "format must be kvsnap or llama, got {other:?}"
        ))),
    }
}

#[derive(Debug, Deserialize)]
pub struct ImportQuery {
    session_id: Option<String>,
}

/// `POST /admin/v1/import/llama`: a llama.cpp `ggsq` file as a new (or named) conversation.
pub async fn import_llama(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<ImportQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = id_or_new(query.session_id)?;
    let _place = state.upload_place()?;
    let is_file = |b: &[u8]| b.starts_with(&SEQ_MAGIC.to_le_bytes());
    let file = read_upload(
        &headers,
        body,
        state.upload_limit(),
        is_file,
        "llama.cpp sequence file (ggsq)",
    )
    .await?;
    Ok(Json(
        state
            .conversations
            .import_llama(id, caller.requester(), file)
            .await?,
    ))
}

/// The conversation id a request names, or a new one when it names none.
fn id_or_new(text: Option<String>) -> Result<Uuid, ApiError> {
    text.map_or_else(|| Ok(Uuid::new_v4()), |text| parse_id(&text))
}

fn file_response(bytes: Vec<u8>, name: &str, content_type: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// Verified completely (checksum, model, layout, tokens, llama.cpp state) before it is stored.
pub async fn upload(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_id(&id)?;
    // A conversation that moved away answers with where it went, before its body is read.
    state
        .conversations
        .before_upload(id, &caller.requester())
        .await?;
    let _place = state.upload_place()?;
    let is_file = |b: &[u8]| crate::snapshot::is_snapshot(b) || crate::keys::is_sealed_file(b);
    let body = read_upload(
        &headers,
        body,
        state.upload_limit(),
        is_file,
        "kvsnap snapshot file",
    )
    .await?;
    let file = super::keys::open_upload(&state, body, &caller)?;
    Ok(Json(
        state
            .conversations
            .import(id, caller.requester(), file)
            .await?,
    ))
}
