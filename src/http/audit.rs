//! The audit trail's HTTP side: which requests are admin actions, the layer that appends one
//! entry for each when it has been answered, and `GET /admin/v1/audit`, which reads the trail.
//!
//! Entries name the acting key by its hash (`Caller::actor`), the conversation the path names,
//! and the outcome: `ok`, or the status and the error's sentence. Refused attempts on admin
//! routes by a known key are entries too: a trail that only lists what succeeded hides who
//! tried. Requests with no valid key are counted (`kvsnap_audit_unauthenticated_total`), never
//! stored: anyone can send them, and storing each let anyone fill the disk.

use axum::Json;
use axum::extract::{MatchedPath, Query, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorSentence};
use crate::store::audit::AUDIT_PAGE_MAX;
use crate::store::records::AuditRecord;

/// Who a route's requests are audited for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Whom {
    /// Every caller, refused ones too: the route is an admin route.
    Everyone,
    /// Only callers with an admin key: a user acting on their own conversations is not an
    /// admin action, an admin acting on anyone's is.
    Admins,
}

/// The audited routes: method, route template, the action's name in the trail, and for whom.
const AUDITED: &[(Method, &str, &str, Whom)] = &[
    (
        Method::POST,
        "/admin/v1/import/llama",
        "import",
        Whom::Everyone,
    ),
    (
        Method::PUT,
        "/admin/v1/sessions/{id}/import",
        "import",
        Whom::Everyone,
    ),
    (
        Method::POST,
        "/admin/v1/sessions/{id}/incoming/commit",
        "import",
        Whom::Everyone,
    ),
    (
        Method::POST,
        "/admin/v1/sessions/{id}/migrate",
        "migrate",
        Whom::Everyone,
    ),
    (Method::POST, "/admin/v1/migrate", "migrate", Whom::Everyone),
    (Method::POST, "/admin/v1/rekey", "rekey", Whom::Everyone),
    (Method::DELETE, "/v1/sessions/{id}", "delete", Whom::Admins),
    (
        Method::PUT,
        "/v1/sessions/{id}/snapshot",
        "upload",
        Whom::Admins,
    ),
    (
        Method::GET,
        "/v1/sessions/{id}/snapshot",
        "download",
        Whom::Admins,
    ),
    (
        Method::GET,
        "/v1/sessions/{id}/export",
        "export",
        Whom::Admins,
    ),
    (Method::POST, "/v1/sessions/{id}/fork", "fork", Whom::Admins),
];

/// Appends an entry for each answered request to an audited route (see `AUDITED`).
pub async fn record(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Every request passes here: only an audited one pays for copying its path.
    let template = request.extensions().get::<MatchedPath>();
    let Some((action, whom, template)) =
        template.and_then(|t| audited(request.method(), t.as_str()))
    else {
        return next.run(request).await;
    };
    let target = target(template, request.uri().path());
    let response = next.run(request).await;
    let Some(caller) = response.extensions().get::<Caller>() else {
        metrics::counter!("kvsnap_audit_unauthenticated_total", "action" => action).increment(1);
        return response;
    };
    if whom == Whom::Admins && !caller.is_admin() {
        return response;
    }
    let actor = caller.actor();
    let outcome = if response.status().is_success() {
        "ok".to_string()
    } else {
        let sentence = response
            .extensions()
            .get::<ErrorSentence>()
            .map_or("", |s| s.0.as_str());
        format!("{}: {sentence}", response.status().as_u16())
    };
    let entry = AuditRecord::now(actor, action, target, outcome);
    crate::sessions::audit::append(&state.store, entry).await;
    response
}

/// The action and audience of an audited route, and its template.
fn audited(method: &Method, template: &str) -> Option<(&'static str, Whom, &'static str)> {
    AUDITED
        .iter()
        .find(|(m, t, _, _)| m == method && *t == template)
        .map(|(_, t, action, whom)| (*action, *whom, *t))
}

/// The conversation the path names (the segment where the template has `{id}`), or the path.
/// Clipped to `TARGET_MAX` bytes: a conversation id is 36, and a path of any length is the
/// caller's choice.
fn target(template: &str, path: &str) -> String {
    let position = template.split('/').position(|segment| segment == "{id}");
    let whole = position
        .and_then(|i| path.split('/').nth(i))
        .unwrap_or(path);
    let mut end = whole.len().min(TARGET_MAX);
    while !whole.is_char_boundary(end) {
        end -= 1;
    }
    whole[..end].to_string()
}

/// The most of a request's path an entry keeps.
const TARGET_MAX: usize = 128;

#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    /// Entries after this sequence number (0: from the first).
    #[serde(default)]
    after: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    100
}

#[derive(Debug, Serialize)]
pub struct AuditEntry {
    pub sequence: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `after` for the next page; equal to the request's `after` when there is none.
    pub next_after: u64,
}

/// `GET /admin/v1/audit?after=N&limit=M`: the trail, oldest first.
pub async fn read(
    State(state): State<AppState>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    if query.limit == 0 || query.limit > AUDIT_PAGE_MAX {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {AUDIT_PAGE_MAX}"
        )));
    }
    let store = state.store.clone();
    let rows = tokio::task::spawn_blocking(move || store.audit(query.after, query.limit))
        .await
        .map_err(|e| ApiError::from(crate::store::StoreError::Io(e.to_string())))??;
    let next_after = rows.last().map_or(query.after, |(sequence, _)| *sequence);
    let entries = rows
        .into_iter()
        .map(|(sequence, record)| AuditEntry {
            sequence,
            at_ms: record.at_ms,
            actor: record.actor,
            action: record.action,
            target: record.target,
            outcome: record.outcome,
            detail: record.detail,
        })
        .collect();
    Ok(Json(AuditPage {
        entries,
        next_after,
    }))
}
