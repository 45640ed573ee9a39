//! The fleet tier as conversations see it: every committed save is uploaded to the shared
//! bucket (the pages it lacks, then the conversation object), and a conversation this
//! instance does not hold is fetched from the bucket — every page checked against its id —
//! into the local store before anything reads it.
//!
//! The local store stays the first durable copy. Durability modes (`RemoteDurability`):
//! - `async` (the default): a turn is acknowledged at the local fsync; the uploader, a
//!   background task, sends it soon after and retries with backoff while the bucket fails.
//!   A host lost before its uploads finished loses, for the fleet, the turns not yet uploaded
//!   (they are still on its disk should it return).
//! - `remote-sync`: a turn's reply ends only after its conversation object is in the bucket,
//!   so every acknowledged turn survives the loss of the host.
//!
//! Conversation objects are written on the version this instance last saw: when another
//! instance continued a conversation meanwhile, the write fails and this instance says so in
//! its log instead of overwriting the newer conversation.
//!
//! - `upload.rs`: the queue, the uploader and `/health`'s figures.
//! - `claim.rs`: the claim before a read (redirect, replace an older copy, take the lease).
//! - `lease.rs`: the ownership rules as pure decisions, unit-tested without a bucket.
//! - `fetch.rs`: a conversation from the bucket into the local store, every page checked.
//! - `entries.rs`: unnamed entries up to the bucket, and down when a prompt needs one.
//! - here: the shared state, and a lease handed to another member.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::UpdateVersion;
use uuid::Uuid;

mod claim;
mod entries;
mod fetch;
mod lease;
mod responses;
mod upload;

pub use claim::Claim;
use upload::{Upload, uploader};

use crate::clock::now_ms;
use crate::snapshot::pages::PageId;
use crate::store::remote::{Lease, Remote, RemoteConversation, RemoteWriteError};
use crate::store::{Store, StoreError};

/// When a turn counts as durable for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteDurability {
    /// Acknowledged at the local fsync; uploaded in the background.
    Async,
    /// Acknowledged once the conversation object is in the bucket.
    RemoteSync,
}

/// Pages fetched or checked at once.
const PARALLEL_PAGES: usize = 16;

/// What `/health` and `/metrics` say about the bucket.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RemoteHealth {
    pub url: String,
    /// Saves not in the bucket yet: conversations' latest, and unnamed entries.
    pub pending_uploads: usize,
    pub failed_uploads: u64,
    /// The last failure, while the bucket keeps failing; `None` once an upload succeeded.
    pub last_error: Option<String>,
}

pub struct Fleet {
    remote: Remote,
    store: Arc<Store>,
    durability: RemoteDurability,
    runtime: tokio::runtime::Handle,
    /// Conversations and entries queued for the uploader.
    pending: Mutex<BTreeSet<Upload>>,
    /// Uploads under way. They count as pending until the bucket has them: an admin who
    /// waits for "no pending uploads" before stopping a host must not stop it in the middle
    /// of one.
    in_flight: Mutex<HashMap<Upload, usize>>,
    /// Conversations deleted or moved out here whose bucket object the uploader has not dealt
    /// with yet: until it has, they are not fetched back from the bucket.
    leaving: Mutex<HashSet<Uuid>>,
    wake: tokio::sync::Notify,
    /// This instance, as its leases name it: its store's id, and its URL for redirects (set
    /// once the port is bound).
    instance: u64,
    url: std::sync::OnceLock<String>,
    lease_ms: u64,
    /// Conversations this instance holds the lease of: the object version it last wrote or
    /// read, the lease's epoch and expiry.
    owned: Mutex<HashMap<Uuid, Owned>>,
    /// Pages known to be in the bucket, so a later save does not ask again.
    known: Mutex<HashSet<PageId>>,
    /// One upload at a time: the uploader and remote-sync turns take turns.
    uploading: tokio::sync::Mutex<()>,
    health: Mutex<RemoteHealth>,
    /// When a request last found the bucket not answering (cleared by an upload that works).
    bucket_failed_at: Mutex<Option<Instant>>,
}

#[derive(Debug, Clone)]
struct Owned {
    version: UpdateVersion,
    epoch: u64,
    expires_ms: u64,
}

/// An instance as a member of a fleet: a conversation moves between two members of one fleet
/// by handing its lease over, without sending its pages.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct FleetMember {
    /// The shared bucket (`s3://bucket/prefix`) and the endpoint that serves it.
    pub bucket: String,
    /// The instance id its leases carry.
    pub instance: u64,
    /// Where the fleet's other members send requests for the conversations it holds.
    pub url: String,
}

impl Fleet {
    /// Starts the uploader on the current runtime. Leases last `lease` from each write.
    pub fn start(
        remote: Remote,
        store: Arc<Store>,
        durability: RemoteDurability,
        lease: Duration,
    ) -> Result<Arc<Fleet>, FleetError> {
        let instance = store.instance_id()?;
        let fleet = Arc::new(Fleet {
            instance,
            url: std::sync::OnceLock::new(),
            lease_ms: lease.as_millis() as u64,
            owned: Mutex::new(HashMap::new()),
            health: Mutex::new(RemoteHealth {
                url: remote.url.clone(),
                ..Default::default()
            }),
            remote,
            store,
            durability,
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(BTreeSet::new()),
            in_flight: Mutex::new(HashMap::new()),
            leaving: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            known: Mutex::new(HashSet::new()),
            uploading: tokio::sync::Mutex::new(()),
            bucket_failed_at: Mutex::new(None),
        });
        tokio::spawn(uploader(fleet.clone()));
        Ok(fleet)
    }

    /// Where other instances send requests for conversations this one holds.
    pub fn set_url(&self, url: String) {
        let _ = self.url.set(url);
    }

    fn lease(&self, epoch: u64) -> Lease {
        Lease {
            instance: self.instance,
            url: self.url.get().cloned().unwrap_or_default(),
            epoch,
            expires_ms: now_ms() + self.lease_ms,
        }
    }

    pub fn health(&self) -> RemoteHealth {
        let mut health = self.health.lock().expect("health").clone();
        health.pending_uploads = self.pending_count();
        health
    }

    /// Seals every bucket object an older key sealed with the current one.
    pub async fn rekey(
        &self,
        report: &mut (dyn FnMut(crate::store::RekeyProgress) + Send),
    ) -> Result<crate::store::RekeyProgress, StoreError> {
        self.remote.rekey(report).await
    }

    /// This instance as other members of its fleet know it.
    pub fn member(&self) -> FleetMember {
        FleetMember {
            bucket: format!("{} at {}", self.remote.url, self.remote.endpoint),
            instance: self.instance,
            url: self.url.get().cloned().unwrap_or_default(),
        }
    }

    /// Hands `session` to `to`, another member of this fleet: what is not uploaded yet goes
    /// up now, then the object is written once more, on the version this instance wrote, with
    /// a lease that names `to`. `to` fetches it from the bucket on its first request; this
    /// instance must not write it again (the caller moves it out of the local store, and the
    /// object, no longer this instance's, is left alone).
    pub async fn hand_over(&self, session: Uuid, to: &FleetMember) -> Result<(), FleetError> {
        let _uploading = self.take(session);
        let uploaded = self.upload(session).await.map(|_| ());
        self.note(&uploaded);
        uploaded?;
        let _one = self.uploading.lock().await;
        let lost = || {
            FleetError::Conflict(format!(
                "another instance continued conversation {session} in the bucket; it was not \
                 handed over"
            ))
        };
        let found = self
            .remote
            .conversation(session)
            .await
            .map_err(unreachable)?
            .ok_or_else(|| {
                FleetError::NotFound(format!(
                    "conversation {session} is not in the fleet's bucket"
                ))
            })?;
        if !self.is_mine(&found.conversation) {
            return Err(lost());
        }
        let epoch = found.conversation.lease.as_ref().map_or(0, |l| l.epoch) + 1;
        let handed = RemoteConversation {
            lease: Some(Lease {
                instance: to.instance,
                url: to.url.clone(),
                epoch,
                expires_ms: now_ms() + self.lease_ms,
            }),
            ..found.conversation
        };
        match self
            .remote
            .put_conversation(session, &handed, Some(&found.version))
            .await
        {
            Ok(_) => {}
            Err(RemoteWriteError::Lost(_)) => return Err(lost()),
            Err(RemoteWriteError::Store(e)) => return Err(unreachable(e)),
        }
        self.owned.lock().expect("owned").remove(&session);
        tracing::info!(%session, to = %to.url, epoch, "handed the conversation's lease over");
        Ok(())
    }

    /// Whether this instance wrote the object's version (it holds, or held, its lease).
    fn is_mine(&self, conversation: &RemoteConversation) -> bool {
        lease::is_mine(self.instance, conversation.lease.as_ref())
    }

    fn own(&self, session: Uuid, version: UpdateVersion, written: &RemoteConversation) {
        let lease = written.lease.as_ref().expect("written with a lease");
        self.owned.lock().expect("owned").insert(
            session,
            Owned {
                version,
                epoch: lease.epoch,
                expires_ms: lease.expires_ms,
            },
        );
    }
}

/// What goes wrong between this instance and the fleet's bucket.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Another instance holds the conversation's live lease: the client goes there (307).
    #[error("conversation {session} moved to {target}")]
    Moved { session: Uuid, target: String },
    /// The bucket does not answer; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The conversation is changing hands, or another instance continued it: retry.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// What the bucket holds is damaged: refused, and nothing of it kept.
    #[error("{0}")]
    Damaged(String),
    /// The local store failed.
    #[error(transparent)]
    Store(StoreError),
    /// A task of the fleet's died (a bug; the log has the panic).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for FleetError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Damaged(_, reason) => FleetError::Damaged(reason),
            other => FleetError::Store(other),
        }
    }
}

impl From<crate::snapshot::SnapshotError> for FleetError {
    fn from(error: crate::snapshot::SnapshotError) -> Self {
        FleetError::Damaged(format!("the bucket's copy is damaged: {error}"))
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FleetError> + Send + 'static,
) -> Result<T, FleetError> {
    super::blocking_as(work).await
}

/// A bucket failure while serving a request: the bucket does not answer (503, or the local
/// copy serves); damage stays damage (422).
fn unreachable(error: StoreError) -> FleetError {
    match error {
        StoreError::Io(message) => FleetError::Unavailable(message),
        other => other.into(),
    }
}
