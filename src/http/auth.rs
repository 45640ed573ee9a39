//! Bearer-key authentication.
//!
//! With no keys configured the API is open. Otherwise every route but `/health` needs a user or
//! admin key; admin routes need an admin key. Keys are compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Who a request's key says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Auth is off.
    Anyone,
    /// A user key: conversations it creates are its own.
    User(String),
    /// An admin key.
    Admin(String),
}

#[derive(Debug, Default)]
pub struct Keys {
    pub user: Vec<String>,
    pub admin: Vec<String>,
}

impl Keys {
    pub fn enabled(&self) -> bool {
        !self.user.is_empty() || !self.admin.is_empty()
    }

    fn identify(&self, presented: &str) -> Option<Caller> {
        if let Some(key) = self.admin.iter().find(|k| constant_time_eq(k, presented)) {
            return Some(Caller::Admin(key.clone()));
        }
        self.user
            .iter()
            .find(|k| constant_time_eq(k, presented))
            .map(|k| Caller::User(k.clone()))
    }
}

impl Caller {
    /// The engine's view: user keys become a hash so no key is ever stored.
    pub fn requester(&self) -> crate::engine::Requester {
        use crate::engine::Requester;
        match self {
            Caller::Anyone => Requester::Anyone,
            Caller::Admin(key) => Requester::Admin(key_hash(key)),
            Caller::User(key) => Requester::User(key_hash(key)),
        }
    }

    /// Who acted, as the audit trail names it: the key's hash, never the key.
    pub fn actor(&self) -> String {
        match self {
            Caller::Anyone => "open".to_string(),
            Caller::User(key) | Caller::Admin(key) => format!("key:{}", key_hash(key)),
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Caller::Admin(_))
    }
}

/// A key as stored (owners) and logged (the audit trail): its blake3, so no key is kept.
fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key in `Authorization: Bearer KEY`, else in `X-Api-Key: KEY` (llama-server accepts
/// both, and clients written for it send either), if any.
fn presented_key(request: &Request) -> Option<&str> {
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = || headers.get("x-api-key").and_then(|v| v.to_str().ok());
    bearer.or_else(x_api_key).map(str::trim)
}

/// Middleware for user routes: any valid key.
pub async fn require_key(
    State(keys): State<Arc<Keys>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = if keys.enabled() {
        match presented_key(&request).and_then(|key| keys.identify(key)) {
            Some(caller) => caller,
            None => return ApiError::unauthorized().into_response(),
        }
    } else {
        Caller::Anyone
    };
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    // The audit layer, outside the router's routes, learns from it who acted.
    response.extensions_mut().insert(caller);
    response
}

/// Middleware for admin routes: with keys configured, only an admin key passes (a user key
/// gets 403 with a sentence); with none configured the API is open, as for user routes.
pub async fn require_admin(
    State(keys): State<Arc<Keys>>,
    request: Request,
    next: Next,
) -> Response {
    if keys.enabled() {
        match presented_key(&request).and_then(|key| keys.identify(key)) {
            Some(Caller::Admin(_)) => {}
            Some(caller) => {
                let mut refused =
                    ApiError::forbidden("this route needs an admin key (--admin-api-key)")
                        .into_response();
                // The audit trail names who tried.
                refused.extensions_mut().insert(caller);
                return refused;
            }
            None => return ApiError::unauthorized().into_response(),
        }
    }
    require_key(State(keys), request, next).await
}

/// Middleware for the routes that move conversations between instances: these are never open.
/// Without an admin key configured they answer 403, whatever the rest of the API does, so a
/// conversation is sent or received only between instances that each hold an admin key.
pub async fn require_admin_configured(
    State(keys): State<Arc<Keys>>,
    request: Request,
    next: Next,
) -> Response {
    if keys.admin.is_empty() {
        return ApiError::forbidden(
            "moving conversations between instances needs an admin key on both: start kvsnap \
             with --admin-api-key KEY",
        )
        .into_response();
    }
    require_admin(State(keys), request, next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_keys_are_recognised_before_user_keys() {
        let keys = Keys {
            user: vec!["u".into()],
            admin: vec!["a".into()],
        };
        assert_eq!(keys.identify("a"), Some(Caller::Admin("a".into())));
        assert_eq!(keys.identify("u"), Some(Caller::User("u".into())));
        assert_eq!(keys.identify("x"), None);
    }
}
