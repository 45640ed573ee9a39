//! Moving conversations between instances: the protocol and its jobs.
//!
//! One conversation moves like this (`Migrator::move_one`):
//! 1. The target must be a configured peer; its model and layout are fetched and compared with
//!    ours, so an incompatible target is refused before any byte is sent.
//! 2. `sessions::Conversations::begin_move` marks it moving in the engine and hands out its
//!    snapshot: a turn for it now gets 409 with `Retry-After`, never a fork.
//! 3. Within one fleet (the target shares this instance's bucket) nothing is sent: what is not
//!    uploaded yet goes up, and the conversation's lease is handed to the target
//!    (`Fleet::hand_over`), which fetches it from the bucket on its first request.
//! 4. Otherwise it is sent page by page (`push`): its manifest with the snapshot's blake3
//!    checksum (`PUT …/incoming`; the target answers which pages it lacks), those pages
//!    (each checked by the target against its id and kept durably as it arrives), then the
//!    commit: the target assembles the file, checks the checksum, verifies it like any upload
//!    and commits it with fsync before it answers 200. A transfer that broke off resumes:
//!    the next offer's answer leaves out the pages the target kept.
//! 5. Only then is its copy deleted and a forwarding record written, in one store transaction,
//!    and its sequence emptied (`end_move`). On any failure before that the conversation simply
//!    stays here.
//!
//! So the conversation exists whole on at least one instance at every moment. When a transfer
//! ends without an answer, the source asks the target whether it holds exactly the checksum
//! sent before it decides either way. A retry is idempotent: a conversation already forwarded to
//! the same target reports "already_moved", and a copy the target holds from an attempt whose
//! outcome the source never learnt is simply replaced by the next attempt's (nothing forwards
//! to it, so nobody has used it).
//!
//! - `peer.rs`: the HTTP client for a target. `jobs.rs`: bulk moves in the background.
//! - `report.rs`: the answers, shared with the CLI.

pub mod jobs;
pub mod peer;
pub mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use uuid::Uuid;

use crate::compute::Exactness;
use crate::engine::{EngineError, Outgoing, Requester};
use crate::sessions::audit;
use crate::sessions::{ConversationError, Conversations, Fleet, FleetMember};
use crate::snapshot::manifest::Manifest;
use crate::store::records::AuditRecord;
use crate::store::{PageId, SessionStore, Store};
use peer::{PeerClient, PeerError, PeerIdentity};
use report::{MoveReport, PlannedMove, Refusal};

/// Why a move did not happen. The HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
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
    /// Holding, reading or forwarding the conversation here failed.
    #[error(transparent)]
    Conversation(#[from] ConversationError),
}

impl From<EngineError> for MigrateError {
    fn from(error: EngineError) -> Self {
        MigrateError::Conversation(error.into())
    }
}

/// What a migrator is configured with.
#[derive(Debug, Clone)]
pub struct MigratorOptions {
    /// The instances conversations may move to (`--peer`).
    pub peers: Vec<peer::Peer>,
    /// Transfer rate limit in MiB/s (`--migrate-rate-limit`; 0: none).
    pub rate_limit_mib_s: f64,
}

impl MigratorOptions {
    /// The configured peer at `url` (a trailing slash aside).
    pub fn peer(&self, url: &str) -> Option<&peer::Peer> {
        let wanted = url.trim_end_matches('/');
        self.peers.iter().find(|p| p.url == wanted)
    }
}

/// The migration side of a daemon.
pub struct Migrator {
    /// Conversations held, handed out and forwarded (`begin_move`, `end_move`).
    conversations: Arc<Conversations>,
    store: Arc<Store>,
    /// This store's instance id, for the audit trail.
    instance: u64,
    options: MigratorOptions,
    http: reqwest::Client,
    /// The fleet this instance belongs to: a move to another member is a lease handover.
    fleet: Option<Arc<Fleet>>,
    pub jobs: jobs::Jobs,
}

impl Migrator {
    /// `instance` is this store's id (`Store::instance_id`), which the audit trail names.
    pub fn new(
        conversations: Arc<Conversations>,
        store: Arc<Store>,
        instance: u64,
        options: MigratorOptions,
        fleet: Option<Arc<Fleet>>,
    ) -> Self {
        // No redirects and no proxies: the admin key goes to the configured peer and nowhere
        // else. Timeouts are set per request (a transfer's from its size).
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("a plain HTTP client always builds");
        Self {
            conversations,
            store,
            instance,
            options,
            http,
            fleet,
            jobs: jobs::Jobs::default(),
        }
    }

    /// The configured peer named `target`.
    pub fn peer(&self, target: &str) -> Result<PeerClient, MigrateError> {
        let peer = self
            .options
            .peer(target)
            .ok_or_else(|| MigrateError::UnknownPeer(target.trim_end_matches('/').to_string()))?;
        Ok(PeerClient::new(peer.clone(), self.http.clone()))
    }

    /// Fetches the target's identity and refuses it if our conversations cannot run there.
    pub async fn check_target(&self, peer: &PeerClient) -> Result<PeerIdentity, MigrateError> {
        let theirs = peer.identity().await.map_err(refusal_or_failure)?;
        let ours = self.conversations.model().live.as_ref().map_err(|_| {
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
    /// every piece of snapshot as it leaves. The audit trail gets an entry for the move,
    /// whatever its outcome.
    pub async fn move_one(
        &self,
        session: Uuid,
        peer: &PeerClient,
        target: &PeerIdentity,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<MoveReport, MigrateError> {
        let result = self.move_unaudited(session, peer, target, sent).await;
        let outcome = match &result {
            Ok(report) => format!("ok: {}", report.outcome),
            Err(error) => format!("failed: {error}"),
        };
        let entry = AuditRecord::now(
            audit::instance_actor(self.instance),
            "move",
            session.to_string(),
            outcome,
        )
        .with_detail(format!("to {}", peer.url()));
        audit::append(&self.store, entry).await;
        result
    }

    async fn move_unaudited(
        &self,
        session: Uuid,
        peer: &PeerClient,
        target: &PeerIdentity,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<MoveReport, MigrateError> {
        let started = Instant::now();
        let report = |outcome: &str, tokens: u64, sent: Sent| MoveReport {
            session_id: session,
            target: peer.url().to_string(),
            outcome: outcome.to_string(),
            tokens,
            bytes: sent.bytes,
            pages_sent: sent.pages_sent,
            pages_resumed: sent.pages_resumed,
            pages_held: sent.pages_held,
            millis: started.elapsed().as_secs_f64() * 1e3,
        };
        let outgoing = match self.conversations.begin_move(session).await {
            Ok(outgoing) => outgoing,
            Err(ConversationError::Engine(EngineError::Moved { target, .. }))
                if target == peer.url() =>
            {
                return Ok(report("already_moved", 0, Sent::default()));
            }
            Err(ConversationError::Engine(EngineError::Moved { target, .. })) => {
                return Err(MigrateError::Refused(format!(
                    "conversation {session} already moved to {target}"
                )));
            }
            Err(error) => return Err(error.into()),
        };
        let limit = target.live.layout.n_ctx_per_sequence as u64;
        if outgoing.tokens > limit {
            self.conversations.end_move(session, None).await?;
            return Err(MigrateError::Refused(format!(
                "conversation {session} has {} tokens but a conversation on {} holds at most {}",
                outgoing.tokens,
                peer.url(),
                limit
            )));
        }
        let tokens = outgoing.tokens;
        if let Some(member) = self.same_fleet(target) {
            return match self.hand_over(session, &member).await {
                Ok(()) => {
                    self.conversations
                        .end_move(session, Some(peer.url().to_string()))
                        .await?;
                    tracing::info!(%session, target = peer.url(), tokens, "conversation handed over");
                    Ok(report("handed_over", tokens, Sent::default()))
                }
                Err(error) => {
                    tracing::warn!(%session, %error, "handover failed; the conversation stays here");
                    self.conversations.end_move(session, None).await?;
                    Err(error)
                }
            };
        }
        let checksum = crate::snapshot::checksum(&outgoing.bytes)
            .to_hex()
            .to_string();
        let result = self.push(session, peer, &outgoing, &checksum, sent).await;
        let arrived = match &result {
            Ok(_) => true,
            // The target answered with an error: it answers only after its commit succeeded,
            // so it does not hold this copy.
            Err(PeerError::Refused { .. }) => false,
            // No answer: the target may have committed before the connection broke. Ask it.
            Err(PeerError::Unreachable { .. }) => self.target_holds(peer, session, &checksum).await,
        };
        if arrived {
            self.conversations
                .end_move(session, Some(peer.url().to_string()))
                .await?;
            let sent = result.unwrap_or_default();
            tracing::info!(
                %session, target = peer.url(), tokens, bytes = sent.bytes,
                pages_sent = sent.pages_sent, pages_resumed = sent.pages_resumed,
                pages_held = sent.pages_held, "conversation moved"
            );
            return Ok(report("moved", tokens, sent));
        }
        let error = result.expect_err("a transfer that did not arrive failed");
        tracing::warn!(%session, %error, "move failed; the conversation stays here");
        self.conversations.end_move(session, None).await?;
        Err(refusal_or_failure(error))
    }

    /// The target's fleet membership when it shares this instance's bucket.
    fn same_fleet(&self, target: &PeerIdentity) -> Option<FleetMember> {
        let ours = self.fleet.as_ref()?.member();
        target
            .fleet
            .clone()
            .filter(|theirs| theirs.bucket == ours.bucket)
    }

    async fn hand_over(&self, session: Uuid, member: &FleetMember) -> Result<(), MigrateError> {
        let fleet = self.fleet.as_ref().expect("a handover needs a fleet");
        fleet
            .hand_over(session, member)
            .await
            .map_err(|e| MigrateError::Conversation(e.into()))
    }

    /// Sends `outgoing` to `peer` page by page: its manifest first, then only the pages the
    /// target lacks (it may hold some for other conversations, or from an attempt that broke
    /// off), then the commit, which the target answers after its fsync. A target that takes
    /// whole snapshots only gets the whole file.
    async fn push(
        &self,
        session: Uuid,
        peer: &PeerClient,
        outgoing: &Outgoing,
        checksum: &str,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<Sent, PeerError> {
        let rate = self.options.rate_limit_mib_s * 1024.0 * 1024.0;
        let (manifest, pages) = self.paged(session, peer, outgoing, checksum).await?;
        let manifest_len = manifest.len() as u64;
        let owner = outgoing.owner.as_deref();
        let Some(answer) = peer
            .offer(session, manifest, checksum, owner, outgoing.created_ms)
            .await?
        else {
            let bytes = Bytes::from(outgoing.bytes.clone());
            let size = bytes.len() as u64;
            peer.send(
                session,
                bytes,
                checksum,
                owner,
                outgoing.created_ms,
                rate,
                sent,
            )
            .await?;
            return Ok(Sent {
                bytes: size,
                ..Sent::default()
            });
        };
        sent(manifest_len);
        let mut done = Sent {
            bytes: manifest_len,
            pages_resumed: answer.staged,
            pages_held: answer.held,
            ..Sent::default()
        };
        let started = Instant::now();
        for page in &answer.missing {
            let bytes = self.page(peer, &pages, page).await?;
            let size = bytes.len() as u64;
            if rate > 0.0 {
                let due = std::time::Duration::from_secs_f64(done.bytes as f64 / rate);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            peer.send_page(
                session,
                page,
                Bytes::from(bytes),
                transfer_timeout(size as usize, rate),
            )
            .await?;
            sent(size);
            done.bytes += size;
            done.pages_sent += 1;
        }
        peer.commit(session, transfer_timeout(outgoing.bytes.len(), rate))
            .await?;
        Ok(done)
    }

    /// `outgoing` as a manifest and its pages. The store's own when it holds exactly this
    /// snapshot (a stored conversation, or a resident one with nothing unsaved): its pages
    /// are read as the target asks for them. Otherwise the file is cut into pages here.
    async fn paged(
        &self,
        session: Uuid,
        peer: &PeerClient,
        outgoing: &Outgoing,
        checksum: &str,
    ) -> Result<(Bytes, OutgoingPages), PeerError> {
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::store::StoreError>(store.record(session)?.zip(store.manifest(session)?))
        })
        .await
        .map_err(|e| peer.failed(format!("reading the stored conversation stopped: {e}")))?
        .map_err(|e| peer.failed(e.to_string()))?;
        if let Some((record, manifest)) = stored
            && record.checksum == checksum
        {
            // The target may ask for these pages and no others: the store holds every owner's.
            let ids = Manifest::decode(&manifest)
                .map_err(|e| peer.failed(format!("the stored manifest cannot be read: {e}")))?
                .page_ids()
                .into_iter()
                .collect();
            return Ok((Bytes::from(manifest), OutgoingPages::Stored(ids)));
        }
        let owner = outgoing.owner.clone();
        let file = outgoing.bytes.clone();
        let (manifest, pages) =
            tokio::task::spawn_blocking(move || Manifest::cut_file(&file, owner.as_deref()))
                .await
                .map_err(|e| peer.failed(format!("cutting the snapshot into pages stopped: {e}")))?
                .map_err(|e| peer.failed(format!("the snapshot cannot be cut into pages: {e}")))?;
        let pages = pages
            .into_iter()
            .map(|(id, bytes)| (hex::encode(id), bytes))
            .collect();
        Ok((Bytes::from(manifest.encode()), OutgoingPages::Cut(pages)))
    }

    /// The bytes of `page` (hex id), which the target asked for.
    async fn page(
        &self,
        peer: &PeerClient,
        pages: &OutgoingPages,
        page: &str,
    ) -> Result<Vec<u8>, PeerError> {
        let unknown = || {
            peer.failed(format!(
                "the target asked for page {page}, which this conversation does not have"
            ))
        };
        match pages {
            OutgoingPages::Cut(pages) => pages.get(page).cloned().ok_or_else(unknown),
            OutgoingPages::Stored(ids) => {
                let id: PageId = hex::decode(page)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .filter(|id| ids.contains(id))
                    .ok_or_else(unknown)?;
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.page(&id))
                    .await
                    .map_err(|e| peer.failed(format!("reading a page stopped: {e}")))?
                    .map_err(|e| peer.failed(e.to_string()))?
                    .ok_or_else(unknown)
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
                .conversations
                .list(usize::MAX, Requester::System)
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

    /// Whether the target holds exactly `checksum` for `session`, asked a few times while it
    /// may be restarting. If it cannot be reached at all the answer is "no": the conversation
    /// stays here, and a copy the target may have committed unseen is never announced (no
    /// forward points to it) and is overwritten by the next attempt.
    async fn target_holds(&self, peer: &PeerClient, session: Uuid, checksum: &str) -> bool {
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            match peer.stored_checksum(session).await {
                Ok(found) => return found.as_deref() == Some(checksum),
                Err(PeerError::Refused { .. }) => return false,
                Err(PeerError::Unreachable { .. }) => continue,
            }
        }
        false
    }

    /// What moving `sessions` (every conversation when `None`) to the target would do.
    pub async fn plan(
        &self,
        sessions: Option<&[Uuid]>,
        target: &PeerIdentity,
    ) -> Result<(Vec<PlannedMove>, Vec<Refusal>), MigrateError> {
        let known = self
            .conversations
            .list(usize::MAX, Requester::System)
            .await?;
        let mut wanted: Vec<Uuid> = match sessions {
            Some(ids) => ids.to_vec(),
            None => known.iter().map(|s| s.session_id).collect(),
        };
        let mut seen = std::collections::HashSet::new();
        wanted.retain(|id| seen.insert(*id));
        let limit = target.live.layout.n_ctx_per_sequence as u64;
        let (mut moves, mut refused) = (Vec::new(), Vec::new());
        for id in wanted {
            let refuse = |reason: String| Refusal {
                session_id: id,
                reason,
            };
            let Some(info) = known.iter().find(|s| s.session_id == id) else {
                refused.push(refuse(match self.conversations.moved_to(id).await {
                    Ok(Some(target)) => format!("it already moved to {target}"),
                    _ => "there is no such conversation here".into(),
                }));
                continue;
            };
            if let Some(reason) = &info.damaged {
                refused.push(refuse(format!("it is damaged: {reason}")));
            } else if info.tokens > limit {
                refused.push(refuse(format!(
                    "it has {} tokens but a conversation on the target holds at most {}",
                    info.tokens, limit
                )));
            } else {
                let exactness = Exactness::of(
                    info.exactness.compute_profile.as_deref(),
                    target_profile(target),
                );
                moves.push(PlannedMove {
                    session_id: id,
                    state: info.state.to_string(),
                    tokens: info.tokens,
                    bytes: info.bytes,
                    bit_exact: exactness.bit_exact,
                    exactness: exactness.exactness,
                });
            }
        }
        Ok((moves, refused))
    }
}

/// Where the pages of a conversation being sent come from.
enum OutgoingPages {
    /// Cut from its snapshot file here, by hex id.
    Cut(HashMap<String, Vec<u8>>),
    /// The store's, which holds exactly the snapshot being sent: the ids its manifest names.
    Stored(std::collections::HashSet<PageId>),
}

/// What a transfer sent: bytes on the wire (manifest and pages, or the whole file to a target
/// that takes only those), pages sent, and pages the target already had.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    bytes: u64,
    pages_sent: usize,
    pages_resumed: usize,
    pages_held: usize,
}

/// How long one exchange of `bytes` may take, the target's verify and fsync included: the
/// slowest expected rate twice over, so a stalled peer fails and a slow one does not.
fn transfer_timeout(bytes: usize, rate: f64) -> std::time::Duration {
    let expected = bytes as f64 / if rate > 0.0 { rate } else { peer::SLOWEST_RATE };
    std::time::Duration::from_secs_f64(60.0 + 2.0 * expected)
}

/// The compute profile a target runs, as `Exactness` names it.
pub fn target_profile(target: &PeerIdentity) -> &str {
    target
        .live
        .layout
        .compute_profile
        .as_deref()
        .unwrap_or("an unknown profile")
}

/// A target's error answer, as a move's failure: a 4xx is a refusal (409, nothing to retry),
/// anything else a failed exchange (502).
fn refusal_or_failure(error: PeerError) -> MigrateError {
    match error {
        PeerError::Refused {
            url,
            status,
            message,
        } if status == reqwest::StatusCode::UNAUTHORIZED
            || status == reqwest::StatusCode::FORBIDDEN =>
        {
            MigrateError::Refused(format!(
                "{url} refused the admin key configured for it (--peer URL=ADMIN_KEY): {message}"
            ))
        }
        PeerError::Refused {
            url,
            status,
            message,
        } if status.is_client_error() => MigrateError::Refused(format!("{url} refused: {message}")),
        other => MigrateError::Peer(other),
    }
}
