//! Answers for conversations that moved to another instance.
//!
//! The error mapping marks such an answer with `MovedTo`; this middleware, which knows the
//! request's path and the configured policy, finishes it: a 307 to the same path and query on
//! the new instance (method and body kept, so a retried POST of a turn just works there), or a
//! 410 Gone naming it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, MovedTo};
use crate::config::MovedSessions;

pub async fn answer_moved(
    State(policy): State<Arc<MovedSessions>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let mut response = next.run(request).await;
    let Some(moved) = response.extensions_mut().remove::<MovedTo>() else {
        return response;
    };
    match *policy {
        MovedSessions::Redirect => {
            let location = format!("{}{path}", moved.target.trim_end_matches('/'));
            match HeaderValue::from_str(&location) {
                Ok(value) => {
                    response.headers_mut().insert(header::LOCATION, value);
                    response
                }
                Err(_) => gone(moved),
            }
        }
        MovedSessions::Gone => gone(moved),
    }
}

fn gone(moved: MovedTo) -> Response {
    ApiError::gone(moved.message).into_response()
}
