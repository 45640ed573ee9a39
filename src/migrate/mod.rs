//! Moving conversations between instances: the protocol and its jobs.
//!
//! One conversation moves like this (`Migrator::move_one`):
//! 1. The target must be a configured peer; its model and layout are fetched and compared with
//!    ours, so an incompatible target is refused before any byte is sent.
//! 2. The engine hands out the conversation's snapshot and marks it moving (`begin_move`): a
//!    turn for it now gets 409 with `Retry-After`, never a fork.
//! 3. The snapshot streams to the target's `PUT /admin/v1/sessions/{id}/import` in pieces, with
//!    its blake3 checksum. The target checks the checksum, verifies the snapshot like any upload
//!    and commits it with fsync before it answers 200.
//! 4. Only then does the engine delete its copy and write a forwarding record, in one store
//!    transaction (`end_move`). On any failure before that the conversation simply stays here.
//!
//! So the conversation exists whole on at least one instance at every moment. A retry is
//! idempotent: a conversation already forwarded to the same target reports "already_moved", and
//! a target that already committed it (its answer lost) overwrites it with the same bytes.
//!
//! - `peer.rs`: the HTTP client for a target. `jobs.rs`: bulk moves in the background.
//! - `report.rs`: the answers, shared with the CLI.

pub mod jobs;
pub mod peer;
pub mod report;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use uuid::Uuid;

use crate::config::Config;
use crate::engine::{EngineError, EngineHandle, Requester};
use crate::store::Store;
use peer::{PeerClient, PeerError, PeerIdentity};
use report::{MoveReport, PlannedMove, Refusal};

/// Why a move did not happen. The HTTP layer maps each to a status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MigrateError {
    /// The request names a target that is not configured: 400.
    #[error(
        "{0} is not a configured peer; start kvsnap with --peer {0}=ITS_ADMIN_KEY (or list it under [[peers]] in the config file)"
    )]
    UnknownPeer(String),
    /// Target and conversation cannot match: 409 without a retry hint.
    #[error("{0}")]
    Refused(String),
    /// The target could not be reached or failed mid-way: 502. The conversation stays here.
    #[error("{0}")]
    Peer(PeerError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The migration side of a daemon.
pub struct Migrator {
    engine: EngineHandle,
    store: Arc<Store>,
    config: Config,
    http: reqwest::Client,
    pub jobs: jobs::Jobs,
}

impl Migrator {
    pub fn new(engine: EngineHandle, store: Arc<Store>, config: Config) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .read_timeout(std::time::Duration::from_secs(120))
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            engine,
            store,
            config,
            http,
            jobs: jobs::Jobs::default(),
        }
    }

    /// The configured peer named `target`.
    pub fn peer(&self, target: &str) -> Result<PeerClient, MigrateError> {
        let peer = self
            .config
            .peer(target)
            .ok_or_else(|| MigrateError::UnknownPeer(target.trim_end_matches('/').to_string()))?;
        Ok(PeerClient::new(peer.clone(), self.http.clone()))
    }

    /// Fetches the target's identity and refuses it if our conversations cannot run there.
    pub async fn check_target(&self, peer: &PeerClient) -> Result<PeerIdentity, MigrateError> {
        let theirs = peer.identity().await.map_err(MigrateError::Peer)?;
        let ours = self.engine.info().live.as_ref().ok_or_else(|| {
            MigrateError::Refused(
                "this model's state cannot be snapshotted, so its conversations cannot move".into(),
            )
        })?;
        if let Some(difference) = theirs
            .live
            .difference(&ours.model, &ours.layout, "the target")
        {
            return Err(MigrateError::Refused(format!(
                "{} cannot take conversations from this instance: {difference}",
                peer.url()
            )));
        }
        Ok(theirs)
    }

    /// Moves one conversation to `peer` (already checked by `check_target`). `sent` hears
    /// every piece of snapshot as it leaves.
    pub async fn move_one(
        &self,
        session: Uuid,
        peer: &PeerClient,
        target: &PeerIdentity,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<MoveReport, MigrateError> {
        let started = Instant::now();
        let report = |outcome: &str, tokens: u64, bytes: u64| MoveReport {
            session_id: session,
            target: peer.url().to_string(),
            outcome: outcome.to_string(),
            tokens,
            bytes,
            millis: started.elapsed().as_secs_f64() * 1e3,
        };
        let outgoing = match self.engine.begin_move(session).await {
            Ok(outgoing) => outgoing,
            Err(EngineError::Moved { target, .. }) if target == peer.url() => {
                return Ok(report("already_moved", 0, 0));
            }
            Err(EngineError::Moved { target, .. }) => {
                return Err(MigrateError::Refused(format!(
                    "conversation {session} already moved to {target}"
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let limit = target.live.layout.n_ctx_per_sequence as u64;
        if outgoing.tokens >= limit {
            self.engine.end_move(session, None).await?;
            return Err(MigrateError::Refused(format!(
                "conversation {session} has {} tokens but a conversation on {} holds at most {}",
                outgoing.tokens,
                peer.url(),
                limit - 1
            )));
        }
        let (tokens, bytes) = (outgoing.tokens, outgoing.bytes.len() as u64);
        let rate = self.config.migrate_rate_limit * 1024.0 * 1024.0;
        let result = peer
            .send(
                session,
                Bytes::from(outgoing.bytes),
                outgoing.owner.as_deref(),
                outgoing.created_ms,
                rate,
                sent,
            )
            .await;
        match result {
            Ok(()) => {
                self.engine
                    .end_move(session, Some(peer.url().to_string()))
                    .await?;
                tracing::info!(%session, target = peer.url(), tokens, bytes, "conversation moved");
                Ok(report("moved", tokens, bytes))
            }
            Err(error) => {
                tracing::warn!(%session, %error, "move failed; the conversation stays here");
                self.engine.end_move(session, None).await?;
                Err(MigrateError::Peer(error))
            }
        }
    }

    /// `sessions` (every conversation when `None`), each refused for `reason`.
    pub async fn refuse_all(
        &self,
        sessions: Option<&[Uuid]>,
        reason: &str,
    ) -> Result<Vec<Refusal>, MigrateError> {
        let ids: Vec<Uuid> = match sessions {
            Some(ids) => ids.to_vec(),
            None => self
                .engine
                .sessions(&self.store, usize::MAX)
                .await?
                .iter()
                .map(|s| s.session_id)
                .collect(),
        };
        Ok(ids
            .into_iter()
            .map(|session_id| Refusal {
                session_id,
                reason: reason.to_string(),
            })
            .collect())
    }

    /// What moving `sessions` (every conversation when `None`) to the target would do.
    pub async fn plan(
        &self,
        sessions: Option<&[Uuid]>,
        target: &PeerIdentity,
    ) -> Result<(Vec<PlannedMove>, Vec<Refusal>), MigrateError> {
        let known = self.engine.sessions(&self.store, usize::MAX).await?;
        let wanted: Vec<Uuid> = match sessions {
            Some(ids) => ids.to_vec(),
            None => known.iter().map(|s| s.session_id).collect(),
        };
        let limit = target.live.layout.n_ctx_per_sequence as u64;
        let (mut moves, mut refused) = (Vec::new(), Vec::new());
        for id in wanted {
            let refuse = |reason: String| Refusal {
                session_id: id,
                reason,
            };
            let Some(info) = known.iter().find(|s| s.session_id == id) else {
                refused.push(refuse(
                    match self.engine.describe(id, Requester::Admin).await {
                        Err(EngineError::Moved { target, .. }) => {
                            format!("it already moved to {target}")
                        }
                        _ => "there is no such conversation here".into(),
                    },
                ));
                continue;
            };
            if let Some(reason) = &info.damaged {
                refused.push(refuse(format!("it is damaged: {reason}")));
            } else if info.tokens >= limit {
                refused.push(refuse(format!(
                    "it has {} tokens but a conversation on the target holds at most {}",
                    info.tokens,
                    limit - 1
                )));
            } else {
                moves.push(PlannedMove {
                    session_id: id,
                    state: info.state.to_string(),
                    tokens: info.tokens,
                    bytes: info.bytes,
                });
            }
        }
        Ok((moves, refused))
    }
}
