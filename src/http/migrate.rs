//! The admin routes for moving conversations between instances; `crate::migrate` does the work.
//!
//! - `GET /admin/v1/identity`: the model and layout this instance runs (what a source checks).
//! - `PUT /admin/v1/sessions/{id}/import`: receive a conversation from another instance, whole.
//! - `PUT /admin/v1/sessions/{id}/incoming`, `PUT …/incoming/pages/{page}`,
//!   `POST …/incoming/commit`: receive one page by page, only the pages this instance lacks
//!   (`sessions::incoming`).
//! - `POST /admin/v1/sessions/{id}/migrate`: move one conversation now.
//! - `POST /admin/v1/migrate`: plan (`dry_run`) or start a job moving several or all.
//! - `GET /admin/v1/jobs/{id}`: a job's progress.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use uuid::Uuid;

use super::AppState;
use super::error::ApiError;
use super::extract::parse_session_id;
use crate::clock::now_ms;
use crate::engine::SessionInfo;
use crate::migrate::peer::{
    CHECKSUM_HEADER, CREATED_HEADER, IncomingAnswer, OWNER_HEADER, PeerIdentity,
};
use crate::migrate::report::{JobStatus, MoveReport, Plan};
use crate::migrate::{MigrateError, jobs};
use crate::sessions::Origin;
use crate::sessions::incoming;

pub async fn identity(State(state): State<AppState>) -> Result<Json<PeerIdentity>, ApiError> {
    let info = state.engine.info();
    let live = info.live.clone().map_err(|_| {
        ApiError::from(crate::migrate::MigrateError::Refused(
            "this model's state cannot be snapshotted, so no conversation can move here".into(),
        ))
    })?;
    Ok(Json(PeerIdentity {
        model_id: info.id.clone(),
        live,
        fleet: state.fleet.as_ref().map(|fleet| fleet.member()),
    }))
}

/// Receives a conversation: the body is the snapshot file, `x-kvsnap-checksum` its blake3.
/// Answers only after the snapshot is verified and committed with fsync.
pub async fn import(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_session_id(&id)?;
    let (expected, origin) = transfer_headers(&headers)?;

    let mut bytes = Vec::new();
    let mut hasher = blake3::Hasher::new();
    let mut stream = body.into_data_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| {
            ApiError::bad_request(format!("the transfer broke off before its end: {e}"))
        })?;
        if bytes.len() + piece.len() > super::SNAPSHOT_BODY_LIMIT {
            return Err(ApiError::too_large(
                "the snapshot is larger than this instance accepts",
            ));
        }
        hasher.update(&piece);
        bytes.extend_from_slice(&piece);
    }
    if hasher.finalize().to_hex().as_str() != expected.to_ascii_lowercase() {
        return Err(ApiError::damaged(
            "the received snapshot does not match its checksum: it was damaged or cut in transfer",
        ));
    }
    Ok(Json(
        state.conversations.import_moved(id, bytes, origin).await?,
    ))
}

/// What a transfer's headers say: the snapshot's checksum, its owner and creation time.
fn transfer_headers(headers: &HeaderMap) -> Result<(String, Origin), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let checksum = header(CHECKSUM_HEADER)
        .ok_or_else(|| ApiError::bad_request(format!("the {CHECKSUM_HEADER} header is missing")))?
        .to_string();
    let created_ms = match header(CREATED_HEADER) {
        Some(text) => text.parse().map_err(|_| {
            ApiError::bad_request(format!("{CREATED_HEADER} must be milliseconds since 1970"))
        })?,
        None => now_ms(),
    };
    let owner = header(OWNER_HEADER).map(str::to_string);
    Ok((checksum, Origin { owner, created_ms }))
}

/// Starts or resumes receiving a conversation page by page: the body is its manifest, the
/// headers as for `import`. Answers the pages to send (those this instance lacks).
pub async fn offer(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    manifest: Bytes,
) -> Result<Json<IncomingAnswer>, ApiError> {
    let id = parse_session_id(&id)?;
    let (checksum, origin) = transfer_headers(&headers)?;
    let offer = incoming::Offer {
        manifest,
        owner: origin.owner,
        created_ms: origin.created_ms,
        checksum,
    };
    let pages = incoming::offer(state.store.clone(), id, offer).await?;
    Ok(Json(IncomingAnswer {
        missing: pages.missing.iter().map(hex::encode).collect(),
        staged: pages.staged,
        held: pages.held,
    }))
}

/// One page of a conversation being received; checked against its id before it is kept.
pub async fn receive_page(
    State(state): State<AppState>,
    Path((id, page)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = parse_session_id(&id)?;
    let page = hex::decode(&page)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| ApiError::bad_request("a page id is 64 hex digits"))?;
    incoming::receive_page(state.store.clone(), id, page, bytes).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Puts a conversation received page by page back together, checks it against the offered
/// checksum and imports it like `import`: answers only after it is committed with fsync.
pub async fn commit_incoming(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let id = parse_session_id(&id)?;
    let (file, offer) = incoming::assemble(state.store.clone(), id).await?;
    let origin = Origin {
        owner: offer.owner,
        created_ms: offer.created_ms,
    };
    let info = state.conversations.import_moved(id, file, origin).await?;
    incoming::finish(state.store.clone(), id).await?;
    Ok(Json(info))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveOne {
    target: String,
}

pub async fn migrate_one(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(request): Json<MoveOne>,
) -> Result<Json<MoveReport>, ApiError> {
    let id = parse_session_id(&id)?;
    let migrator = state.migrator.clone();
    let peer = migrator.peer(&request.target)?;
    let target = migrator.check_target(&peer).await?;
    // A task of its own: axum drops a handler whose client hung up, and a move dropped between
    // `begin_move` and `end_move` would leave the conversation refused as "moving" for good.
    let moving = tokio::spawn(async move { migrator.move_one(id, &peer, &target, |_| {}).await });
    let report = moving.await.map_err(|e| {
        ApiError::from(crate::sessions::ConversationError::Internal(format!(
            "the move stopped unexpectedly: {e}"
        )))
    })??;
    Ok(Json(report))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveMany {
    target: String,
    #[serde(default)]
    sessions: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    dry_run: bool,
}

/// `dry_run`: 200 with the plan. Otherwise 202 with the new job's status.
pub async fn migrate_many(
    State(state): State<AppState>,
    Json(request): Json<MoveMany>,
) -> Result<Response, ApiError> {
    let sessions = match (request.all, request.sessions.is_empty()) {
        (true, true) => None,
        (false, false) => Some(
            request
                .sessions
                .iter()
                .map(|s| parse_session_id(s))
                .collect::<Result<Vec<Uuid>, _>>()?,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "name the conversations in \"sessions\" or set \"all\": true (one of the two)",
            ));
        }
    };
    let migrator = state.migrator.clone();
    let peer = migrator.peer(&request.target)?;
    let target = match migrator.check_target(&peer).await {
        Ok(target) => target,
        // A dry run lists every conversation as refused, each with the reason.
        Err(MigrateError::Refused(reason)) if request.dry_run => {
            let refused = migrator.refuse_all(sessions.as_deref(), &reason).await?;
            let plan = Plan {
                target: peer.url().to_string(),
                target_compute_profile: None,
                would_move: Vec::new(),
                refused,
            };
            return Ok(Json(plan).into_response());
        }
        Err(error) => return Err(error.into()),
    };
    let (moves, refused) = migrator.plan(sessions.as_deref(), &target).await?;
    if request.dry_run {
        let plan = Plan {
            target: peer.url().to_string(),
            target_compute_profile: target.live.layout.compute_profile.clone(),
            would_move: moves,
            refused,
        };
        return Ok(Json(plan).into_response());
    }
    let status: JobStatus = jobs::start(migrator, peer, target, moves, refused);
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

pub async fn job(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::bad_request(format!("a job id is a UUID, got {id:?}")))?;
    state
        .migrator
        .jobs
        .status(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("there is no job {id}")))
}
