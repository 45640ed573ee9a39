//! Request extraction that answers bad input in the API's own error shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::error::ApiError;

/// Like `axum::Json`, but malformed JSON, invalid UTF-8 and oversized bodies get a sentence.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::too_large(
                        "the request body is larger than the server accepts (max_body_bytes)",
                    )
                } else {
                    ApiError::bad_request(format!(
                        "the request body could not be read: {rejection}"
                    ))
                }
            })?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(ApiError::bad_request("the request body is not valid UTF-8"));
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::bad_request(format!(
                "the request body is not valid JSON for this route: {e}"
            ))
        })
    }
}

/// The conversation a request names, by its `session_id` field or `X-Session-Id` header.
pub fn session_id(headers: &HeaderMap, body: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    let header = match headers.get("x-session-id") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::bad_request("X-Session-Id must be a UUID"))?,
        ),
        None => None,
    };
    let parse = |text: &str, source: &str| {
        Uuid::parse_str(text.trim()).map_err(|_| {
            ApiError::bad_request(format!(
                "{source} must be a UUID such as 0b6e1c52-8f3a-4c1e-9d55-2f6b8e7a4c10, got {text:?}"
            ))
        })
    };
    let from_header = header.map(|h| parse(h, "X-Session-Id")).transpose()?;
    let from_body = body.map(|b| parse(b, "session_id")).transpose()?;
    match (from_header, from_body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::bad_request(
            "the X-Session-Id header and the session_id field name different conversations",
        )),
        (h, b) => Ok(h.or(b)),
    }
}

/// A session id from a path or a list: a UUID, else 400 with a sentence.
pub fn parse_session_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text)
        .map_err(|_| ApiError::bad_request(format!("the session id must be a UUID, got {text:?}")))
}

/// A file upload read into memory: refused as soon as its first bytes show it is not a file of
/// the kind `is_kind` recognises (so a stranger's gigabyte is not buffered to find that out),
/// and as soon as it passes `limit` bytes. Read straight into one buffer, never copied.
pub async fn read_upload(
    headers: &HeaderMap,
    body: axum::body::Body,
    limit: usize,
    is_kind: fn(&[u8]) -> bool,
    kind: &str,
) -> Result<Vec<u8>, ApiError> {
    use futures::StreamExt;
    /// Enough for every magic the uploads start with.
    const MAGIC_BYTES: usize = 8;
    // A declared length says it at once.
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large(kind, limit));
    }
    let mut stream = body.into_data_stream();
    let mut file = Vec::new();
    let mut checked = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("the upload could not be read: {e}")))?;
        if file.len() + chunk.len() > limit {
            return Err(too_large(kind, limit));
        }
        file.extend_from_slice(&chunk);
        if !checked && file.len() >= MAGIC_BYTES {
            if !is_kind(&file) {
                return Err(not_a(kind));
            }
            checked = true;
        }
    }
    if !checked && !is_kind(&file) {
        return Err(not_a(kind));
    }
    Ok(file)
}

fn too_large(kind: &str, limit: usize) -> ApiError {
    ApiError::too_large(format!(
        "the upload is larger than any {kind} this server can hold ({limit} bytes)"
    ))
}

/// 422, as a damaged file of the right kind gets: the bytes cannot be used.
fn not_a(kind: &str) -> ApiError {
    ApiError::unusable(format!(
        "the upload is not a {kind} (its first bytes say otherwise)"
    ))
}
