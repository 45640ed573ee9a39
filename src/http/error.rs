//! The one place where failures become HTTP statuses.
//!
//! Bodies follow the shape OpenAI and llama-server answer with:
//! `{"error": {"code": 400, "message": "a sentence", "type": "invalid_request_error"}}`.
//! Internal details go to the log, never to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// Seconds to suggest in `Retry-After`, for overload answers.
    pub retry_after: Option<u32>,
    /// The instance a moved conversation now lives on; `moved.rs` turns the answer into a
    /// redirect there (or 410 Gone), as configured.
    pub moved_to: Option<String>,
    /// More fields for the body's `error` object, such as llama-server's `n_ctx`.
    pub details: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The sentence an error answer carries, beside its body, for the audit trail.
#[derive(Debug, Clone)]
pub struct ErrorSentence(pub String);

/// Marks a response about a conversation that moved to another instance.
#[derive(Debug, Clone)]
pub struct MovedTo {
    pub target: String,
    pub message: String,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "a valid API key is required: send Authorization: Bearer KEY",
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }

    /// 501, as llama-server answers a route its command line turned off.
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "not_supported_error", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after: u32) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                message,
            )
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
            moved_to: None,
            details: None,
        }
    }

    /// The JSON body, also used inside event streams when a request fails mid-way.
    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({
            "code": self.status.as_u16(),
            "message": self.message,
            "type": self.kind,
        });
        if let Some(details) = &self.details {
            for (key, value) in details {
                error[key] = value.clone();
            }
        }
        json!({ "error": error })
    }
}

impl ApiError {
    /// 409 without a retry hint: what is asked can never be.
    fn incompatible(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "incompatible_error", message)
    }

    /// 409 with `Retry-After`: fine, but not now.
    fn conflict(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::CONFLICT, "conflict_error", message)
        }
    }

    pub fn damaged(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "damaged_snapshot_error",
            message,
        )
    }

    /// 307 to where the conversation lives now (`moved.rs` finishes the answer).
    fn moved(target: String, message: String) -> Self {
        Self {
            moved_to: Some(target),
            ..Self::new(StatusCode::TEMPORARY_REDIRECT, "moved_error", message)
        }
    }

    /// 500 for a fault of the server's own: the details go to the log, named by `part`.
    fn server_fault(part: &str, error: &dyn std::fmt::Display, message: &str) -> Self {
        tracing::error!(%error, "{part} failure");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 413 for a body larger than the server takes.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            message,
        )
    }

    /// 422 for bytes of the wrong kind: they cannot be used.
    pub fn unusable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
    }

    /// 410 for a conversation that moved away, where redirects are turned off.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GONE, "moved_error", message)
    }

    /// 403 for a key that may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", message)
    }
}

const STORAGE_FAILED: &str =
    "the server could not read or write its conversation store; see the server log";

/// The engine: bad input, a busy or held sequence, llama.cpp, and what its keeper reported.
impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match &error {
            EngineError::InvalidInput(_) => Self::bad_request(error.to_string()),
            EngineError::PromptTooLong { tokens, limit } => {
                // llama-server's fields: the prompt's size and the context of one slot.
                let mut details = serde_json::Map::new();
                details.insert("n_prompt_tokens".into(), json!(tokens));
                details.insert("n_ctx".into(), json!(limit + 1));
                Self {
                    details: Some(details),
                    ..Self::new(
                        StatusCode::BAD_REQUEST,
                        "exceed_context_size_error",
                        error.to_string(),
                    )
                }
            }
            EngineError::Overloaded(_) => Self::unavailable(error.to_string(), 1),
            EngineError::NotFound(_) => Self::not_found(error.to_string()),
            EngineError::Conflict(_) => Self::conflict(error.to_string()),
            EngineError::Incompatible(_) => Self::incompatible(error.to_string()),
            EngineError::Damaged(_) => Self::damaged(error.to_string()),
            EngineError::Moved { target, .. } => Self::moved(target.clone(), error.to_string()),
            EngineError::ShuttingDown | EngineError::Unsaved(_) => {
                Self::unavailable(error.to_string(), 5)
            }
            EngineError::Keeping(_) => Self::server_fault("storage", &error, STORAGE_FAILED),
            EngineError::Load(_) | EngineError::Internal(_) => Self::server_fault(
                "engine",
                &error,
                "the model failed to process this request; see the server log",
            ),
        }
    }
}

/// The local store.
impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        match &error {
            crate::store::StoreError::Damaged(..) => Self::damaged(error.to_string()),
            _ => Self::server_fault("storage", &error, STORAGE_FAILED),
        }
    }
}

/// The fleet's bucket and leases.
impl From<crate::sessions::FleetError> for ApiError {
    fn from(error: crate::sessions::FleetError) -> Self {
        use crate::sessions::FleetError;
        match error {
            FleetError::Moved { ref target, .. } => Self::moved(target.clone(), error.to_string()),
            FleetError::Unavailable(message) => Self::unavailable(message, 5),
            FleetError::Conflict(message) => Self::conflict(message),
            FleetError::NotFound(message) => Self::not_found(message),
            FleetError::Damaged(message) => Self::damaged(message),
            FleetError::Store(error) => error.into(),
            FleetError::Internal(_) => Self::server_fault(
                "fleet",
                &error,
                "the server failed to reach its fleet's bucket; see the server log",
            ),
        }
    }
}

/// What is asked of a conversation (`sessions::Conversations`).
impl From<crate::sessions::ConversationError> for ApiError {
    fn from(error: crate::sessions::ConversationError) -> Self {
        use crate::sessions::ConversationError;
        match error {
            ConversationError::Engine(error) => error.into(),
            ConversationError::Store(error) => error.into(),
            ConversationError::Fleet(error) => error.into(),
            ConversationError::Snapshot(ref snapshot) => {
                if snapshot.is_damage() {
                    Self::damaged(error.to_string())
                } else {
                    Self::incompatible(error.to_string())
                }
            }
            ConversationError::NotFound(message) => Self::not_found(message),
            ConversationError::Invalid(message) => Self::bad_request(message),
            ConversationError::Conflict(message) => Self::conflict(message),
            ConversationError::Incompatible(message) => Self::incompatible(message),
            ConversationError::Damaged(message) => Self::damaged(message),
            ConversationError::Quota { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_error",
                error.to_string(),
            ),
            ConversationError::Internal(_) => Self::server_fault(
                "conversation",
                &error,
                "the server failed to handle this conversation; see the server log",
            ),
        }
    }
}

/// A move to another instance.
impl From<crate::migrate::MigrateError> for ApiError {
    fn from(error: crate::migrate::MigrateError) -> Self {
        use crate::migrate::MigrateError;
        match error {
            MigrateError::UnknownPeer(_) => Self::bad_request(error.to_string()),
            MigrateError::Refused(message) => {
                Self::new(StatusCode::CONFLICT, "refused_error", message)
            }
            MigrateError::Peer(error) => Self::new(
                StatusCode::BAD_GATEWAY,
                "peer_error",
                format!("{error}; the conversation stays here"),
            ),
            MigrateError::Conversation(error) => error.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        response
            .extensions_mut()
            .insert(ErrorSentence(self.message.clone()));
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(target) = self.moved_to {
            response.extensions_mut().insert(MovedTo {
                target,
                message: self.message,
            });
        }
        response
    }
}
