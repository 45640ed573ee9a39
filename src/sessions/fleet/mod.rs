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

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::UpdateVersion;
use uuid::Uuid;

use super::blocking;
use crate::engine::{EngineError, now_ms};
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::{self, PageId};
use crate::store::records::AuditRecord;
use crate::store::remote::{Lease, Remote, RemoteConversation, RemoteWriteError};
use crate::store::{PagedPut, SessionStore, Store, StoreError};

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
/// After a request found the bucket not answering, requests serve local copies without asking
/// it for this long.
const ASK_FAILED_BUCKET_AFTER: Duration = Duration::from_secs(10);
/// Longest wait between retries of a failing upload.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What `/health` and `/metrics` say about the bucket.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RemoteHealth {
    pub url: String,
    /// Conversations whose latest save is not in the bucket yet.
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
    /// Conversations queued for the uploader.
    pending: Mutex<BTreeSet<Uuid>>,
    /// Conversations being uploaded right now. They count as pending until the bucket has
    /// them: an admin who waits for "no pending uploads" before stopping a host must not stop
    /// it in the middle of one.
    in_flight: Mutex<HashMap<Uuid, usize>>,
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

/// What an upload did.
enum Uploaded {
    /// The bucket holds this instance's version (or, for a conversation gone from here, none).
    Kept,
    /// The bucket holds a newer version, which was not written over.
    Superseded,
}

/// What `claim` found.
pub enum Claim {
    /// The conversation can be served here (or does not exist anywhere).
    Here,
    /// Another instance continued it since this one last held it: this instance's resident
    /// copy must be dropped (unsaved) before `claim` is asked again with `replace`.
    Stale,
}

impl Fleet {
    /// Starts the uploader on the current runtime. Leases last `lease` from each write.
    pub fn start(
        remote: Remote,
        store: Arc<Store>,
        durability: RemoteDurability,
        lease: Duration,
    ) -> Result<Arc<Fleet>, EngineError> {
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

    /// Conversations whose latest save is not in the bucket yet: queued or being uploaded.
    fn pending_count(&self) -> usize {
        // In this order: a conversation moves from `pending` to `in_flight` with the latter
        // locked first, so it is never missing from both while counted here.
        let in_flight = self.in_flight.lock().expect("in flight");
        let pending = self.pending.lock().expect("pending");
        pending.union(&in_flight.keys().copied().collect()).count()
    }

    /// Takes the next queued conversation as being uploaded.
    fn take_next(&self) -> Option<InFlight<'_>> {
        let mut in_flight = self.in_flight.lock().expect("in flight");
        let session = self.pending.lock().expect("pending").pop_first()?;
        *in_flight.entry(session).or_default() += 1;
        Some(InFlight {
            fleet: self,
            session,
        })
    }

    /// Takes `session` out of the queue to upload it now.
    fn take(&self, session: Uuid) -> InFlight<'_> {
        let mut in_flight = self.in_flight.lock().expect("in flight");
        self.pending.lock().expect("pending").remove(&session);
        *in_flight.entry(session).or_default() += 1;
        InFlight {
            fleet: self,
            session,
        }
    }

    fn publish_pending(&self) {
        metrics::gauge!("kvsnap_remote_uploads_pending").set(self.pending_count() as f64);
    }

    /// After a save committed locally (on the writer thread or the engine's): uploads it
    /// before returning in `remote-sync` mode when `wait` is set, else queues it.
    pub fn saved(self: &Arc<Self>, session: Uuid, wait: bool) -> Result<(), EngineError> {
        if wait && self.durability == RemoteDurability::RemoteSync {
            // Run on the runtime's threads, not the calling writer thread: that one yields to
            // decoding (nice 9), and driving the upload there made it 5x slower.
            let fleet = self.clone();
            let upload = self
                .runtime
                .spawn(async move { fleet.upload_now(session).await });
            return self.runtime.block_on(upload).unwrap_or_else(|e| {
                Err(EngineError::Internal(format!("an upload task failed: {e}")))
            });
        }
        self.queue(session);
        Ok(())
    }

    /// The conversation left this instance (deleted, or moved out): the bucket forgets it
    /// soon, and until then it is not fetched back from there.
    pub fn left(&self, session: Uuid) {
        self.leaving.lock().expect("leaving").insert(session);
        self.queue(session);
    }

    /// The conversation changed here: bring the bucket in line, soon.
    pub fn queue(&self, session: Uuid) {
        self.pending.lock().expect("pending").insert(session);
        self.publish_pending();
        self.wake.notify_one();
    }

    async fn upload_now(&self, session: Uuid) -> Result<(), EngineError> {
        let uploading = self.take(session);
        // A turn another instance superseded is not the conversation any more: in
        // `remote-sync` it is not acknowledged (its reply ends in an error, and the next
        // request continues from the bucket's newer version).
        let result = match self.upload(session).await {
            Ok(Uploaded::Kept) => Ok(()),
            Ok(Uploaded::Superseded) => {
                return Err(EngineError::Conflict(format!(
                    "another instance continued conversation {session} in the fleet's bucket \
                     meanwhile; this turn is not kept there"
                )));
            }
            Err(error) => Err(error),
        };
        // Queued again before it stops counting as in flight: never missing from both.
        if result.is_err() {
            self.queue(session);
        }
        drop(uploading);
        self.note(&result);
        result.map_err(|e| {
            EngineError::Internal(format!(
                "the turn is saved here but not in the bucket yet (it will be retried): {e}"
            ))
        })
    }

    fn note(&self, result: &Result<(), EngineError>) {
        let mut health = self.health.lock().expect("health");
        match result {
            Ok(()) => {
                health.last_error = None;
                *self.bucket_failed_at.lock().expect("failed at") = None;
            }
            Err(error) => {
                health.failed_uploads += 1;
                health.last_error = Some(error.to_string());
                metrics::counter!("kvsnap_remote_upload_failures_total").increment(1);
            }
        }
    }

    /// Makes the bucket hold this instance's latest version of `session`: its missing pages,
    /// then its conversation object; or, when this instance no longer has it, no object. A
    /// newer version in the bucket (another instance's, or this instance's own from before its
    /// store was restored from a backup: more saves) is never written over.
    async fn upload(&self, session: Uuid) -> Result<Uploaded, EngineError> {
        let _one = self.uploading.lock().await;
        let started = std::time::Instant::now();
        let store = self.store.clone();
        let local = blocking(move || {
            let record = store.record(session)?;
            let manifest = store.manifest(session)?;
            Ok(record.zip(manifest))
        })
        .await?;
        let Some((record, manifest_bytes)) = local else {
            // Deleted here, or moved out of the fleet: the fleet forgets it too. Unless another
            // member holds it now (it was handed over): that one's object is not this
            // instance's to delete.
            let found = self.remote.conversation(session).await?;
            let ours = found
                .is_some_and(|f| f.conversation.lease.is_none() || self.is_mine(&f.conversation));
            if ours {
                self.remote.delete_conversation(session).await?;
            }
            self.owned.lock().expect("owned").remove(&session);
            self.leaving.lock().expect("leaving").remove(&session);
            return Ok(Uploaded::Kept);
        };
        let manifest = Manifest::decode(&manifest_bytes)?;
        let ids: Vec<PageId> = manifest.page_ids();
        self.upload_pages(&ids).await?;
        let t_pages = started.elapsed();
        let owned = self.owned.lock().expect("owned").get(&session).cloned();
        let mut object = RemoteConversation {
            lease: Some(self.lease(owned.as_ref().map_or(1, |o| o.epoch))),
            record,
            manifest: manifest_bytes,
            refs: ids.concat(),
        };
        let mut version = owned.map(|o| o.version);
        // Twice at most: a first write after a restart finds this instance's own lease.
        for _ in 0..2 {
            match self
                .remote
                .put_conversation(session, &object, version.as_ref())
                .await
            {
                Ok(written) => {
                    self.own(session, written, &object);
                    // Made anew after it left: the bucket has this version now.
                    self.leaving.lock().expect("leaving").remove(&session);
                    metrics::histogram!("kvsnap_remote_upload_seconds")
                        .record(started.elapsed().as_secs_f64());
                    tracing::debug!(%session, ?t_pages, took = ?started.elapsed(), "uploaded");
                    return Ok(Uploaded::Kept);
                }
                Err(RemoteWriteError::Lost(_)) => {
                    let found = self.remote.conversation(session).await?;
                    match found {
                        Some(found)
                            if self.is_mine(&found.conversation)
                                && found.conversation.record.saves <= object.record.saves =>
                        {
                            let epoch = found.conversation.lease.as_ref().map_or(1, |l| l.epoch);
                            object.lease = Some(self.lease(epoch));
                            version = Some(found.version);
                        }
                        _ => break,
                    }
                }
                Err(RemoteWriteError::Store(e)) => return Err(e.into()),
            }
        }
        self.owned.lock().expect("owned").remove(&session);
        tracing::warn!(
            %session,
            "another instance continued this conversation in the bucket; this instance's \
             copy is older and is not uploaded over it"
        );
        metrics::counter!("kvsnap_remote_conflicts_total").increment(1);
        Ok(Uploaded::Superseded)
    }

    /// This instance as other members of its fleet know it.
    /// Seals every bucket object an older key sealed with the current one.
    pub async fn rekey(
        &self,
        report: &mut (dyn FnMut(crate::store::RekeyProgress) + Send),
    ) -> Result<crate::store::RekeyProgress, StoreError> {
        self.remote.rekey(report).await
    }

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
    pub async fn hand_over(&self, session: Uuid, to: &FleetMember) -> Result<(), EngineError> {
        let _uploading = self.take(session);
        let uploaded = self.upload(session).await.map(|_| ());
        self.note(&uploaded);
        uploaded?;
        let _one = self.uploading.lock().await;
        let lost = || {
            EngineError::Conflict(format!(
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
                EngineError::NotFound(format!(
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

    /// Records in the audit trail that this instance took `session`'s lease from `previous`
    /// (expired, or absent in an object written before leases).
    async fn audit_takeover(&self, session: Uuid, previous: Option<&Lease>, epoch: u64) {
        let detail = match previous {
            Some(lease) => format!(
                "from instance {:016x} ({}), whose lease expired at {} ms; epoch {epoch}",
                lease.instance, lease.url, lease.expires_ms
            ),
            None => format!("the object had no lease; epoch {epoch}"),
        };
        let entry = AuditRecord::now(
            super::audit::instance_actor(self.instance),
            "lease_takeover",
            session.to_string(),
            "ok".to_string(),
        )
        .with_detail(detail);
        super::audit::append(&self.store, entry).await;
    }

    /// Whether this instance wrote the object's version (it holds, or held, its lease).
    fn is_mine(&self, conversation: &RemoteConversation) -> bool {
        conversation
            .lease
            .as_ref()
            .is_some_and(|l| l.instance == self.instance)
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

    /// Uploads the pages among `ids` the bucket lacks, several at once.
    async fn upload_pages(&self, ids: &[PageId]) -> Result<(), EngineError> {
        let unknown: Vec<PageId> = {
            let known = self.known.lock().expect("known");
            let mut unknown: Vec<PageId> = ids
                .iter()
                .filter(|id| !known.contains(*id))
                .copied()
                .collect();
            unknown.sort_unstable();
            unknown.dedup();
            unknown
        };
        futures::stream::iter(unknown)
            .map(|id| async move {
                if !self.remote.has_page(&id).await? {
                    let store = self.store.clone();
                    let bytes = blocking(move || Ok(store.page(&id)?))
                        .await?
                        .ok_or_else(|| {
                            EngineError::Internal("a page vanished from the local store".into())
                        })?;
                    let size = bytes.len() as u64;
                    if self.remote.put_page(&id, Bytes::from(bytes)).await? {
                        metrics::counter!("kvsnap_remote_page_bytes_uploaded_total")
                            .increment(size);
                        metrics::counter!("kvsnap_remote_pages_uploaded_total").increment(1);
                    }
                }
                self.known.lock().expect("known").insert(id);
                Ok::<(), EngineError>(())
            })
            .buffer_unordered(PARALLEL_PAGES)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Before anything reads `session` here: makes sure this instance may serve it and holds
    /// its latest version.
    ///
    /// - While this instance's own lease has more than half its time left: nothing to ask.
    /// - Another instance's live lease: `Moved` to it (a 307 there).
    /// - Otherwise this instance takes the lease (a conditional write of the object). If the
    ///   bucket's version was written by another instance and differs from the local copy,
    ///   that copy is older: `Stale` until `replace`, then the bucket's version is fetched —
    ///   every page checked against its id — and replaces it. A conversation not here at all
    ///   is fetched the same way. A damaged object or page answers 422 and nothing is kept.
    ///
    /// While the bucket does not answer, a conversation the local store holds is served from
    /// it (the failure shows in `/health`; a conditional write still keeps this instance from
    /// overwriting a newer version later); one it lacks answers 503.
    pub async fn claim(&self, session: Uuid, replace: bool) -> Result<Claim, EngineError> {
        // It left this instance and the bucket has not heard yet: the local store's answer
        // (none, or a forward) stands; fetching the bucket's copy would bring it back.
        if self.leaving.lock().expect("leaving").contains(&session) {
            return Ok(Claim::Here);
        }
        // A bucket that just failed is not asked again on every request: each ask would wait
        // out object_store's retries (seconds) before the local copy served anyway.
        let failed_lately = self
            .bucket_failed_at
            .lock()
            .expect("failed at")
            .is_some_and(|at| at.elapsed() < ASK_FAILED_BUCKET_AFTER);
        if failed_lately {
            return self
                .serve_local(session, "the fleet's bucket failed moments ago")
                .await;
        }
        match self.claim_inner(session, replace).await {
            Err(EngineError::Unavailable(error)) => {
                *self.bucket_failed_at.lock().expect("failed at") = Some(Instant::now());
                self.health.lock().expect("health").last_error = Some(error.clone());
                self.serve_local(session, &error).await
            }
            other => other,
        }
    }

    /// While the bucket does not answer: the local copy, if there is one, else 503.
    async fn serve_local(&self, session: Uuid, error: &str) -> Result<Claim, EngineError> {
        let store = self.store.clone();
        let here = blocking(move || Ok(store.record(session)?.is_some())).await?;
        if here {
            tracing::warn!(%session, %error, "the bucket does not answer; serving the local copy");
            return Ok(Claim::Here);
        }
        Err(EngineError::Unavailable(format!(
            "conversation {session} is not on this instance and the fleet's bucket does not \
             answer; retry in a moment"
        )))
    }

    async fn claim_inner(&self, session: Uuid, replace: bool) -> Result<Claim, EngineError> {
        let now = now_ms();
        if let Some(owned) = self.owned.lock().expect("owned").get(&session)
            && owned.expires_ms > now + self.lease_ms / 2
        {
            return Ok(Claim::Here);
        }
        // A conversation this instance moved away is asked for too: a member it was handed to
        // may have handed it back, or died and left it to be taken over. Fetching it clears
        // the forward; a conversation the bucket does not hold stays forwarded.
        let store = self.store.clone();
        let local = blocking(move || Ok(store.record(session)?)).await?;
        for _ in 0..3 {
            let Some(found) = self
                .remote
                .conversation(session)
                .await
                .map_err(unreachable)?
            else {
                // Not in the bucket: new, or not uploaded yet; the local store answers.
                return Ok(Claim::Here);
            };
            let conversation = found.conversation;
            if let Some(lease) = &conversation.lease
                && lease.instance != self.instance
                && lease.expires_ms > now_ms()
            {
                return Err(EngineError::Moved {
                    session,
                    target: lease.url.clone(),
                });
            }
            let mine = self.is_mine(&conversation);
            let same = local
                .as_ref()
                .is_some_and(|l| l.checksum == conversation.record.checksum);
            // More saves there than here: a store restored from a backup, say; the bucket's
            // version is newer even when this instance wrote it.
            let older_here = local
                .as_ref()
                .is_some_and(|l| l.saves < conversation.record.saves);
            let fetch = match &local {
                None => true,
                Some(_) if same => false,
                // This instance wrote the bucket's version: its local copy is as new or newer.
                Some(_) if mine && !older_here => false,
                Some(_) if !replace => return Ok(Claim::Stale),
                Some(_) => true,
            };
            if fetch {
                self.fetch(session, &conversation).await?;
            }
            let epoch = conversation.lease.as_ref().map_or(0, |l| l.epoch) + u64::from(!mine);
            let taken = RemoteConversation {
                lease: Some(self.lease(epoch.max(1))),
                ..conversation
            };
            match self
                .remote
                .put_conversation(session, &taken, Some(&found.version))
                .await
            {
                Ok(version) => {
                    self.own(session, version, &taken);
                    if !mine {
                        tracing::info!(%session, epoch, "took the conversation's lease");
                        self.audit_takeover(session, conversation.lease.as_ref(), epoch)
                            .await;
                    }
                    // A local copy newer than the bucket's goes up soon.
                    if local.is_some() && mine && !same && !fetch {
                        self.queue(session);
                    }
                    return Ok(Claim::Here);
                }
                // Someone wrote meanwhile: look again.
                Err(RemoteWriteError::Lost(_)) => continue,
                Err(RemoteWriteError::Store(e)) => return Err(unreachable(e)),
            }
        }
        Err(EngineError::Conflict(format!(
            "conversation {session} is changing hands between instances; retry in a moment"
        )))
    }

    /// Brings the bucket's `conversation` into the local store: its pages fetched several at
    /// once, each checked against its id, then committed with its manifest in one transaction.
    async fn fetch(
        &self,
        session: Uuid,
        conversation: &RemoteConversation,
    ) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        let manifest = Manifest::decode(&conversation.manifest)?;
        let ids = conversation.page_ids();
        if manifest.page_ids() != ids {
            return Err(damaged(
                session,
                "its page list does not match its manifest",
            ));
        }
        let salt = manifest.salt(conversation.record.owner.as_deref());
        let wanted: Vec<PageId> = {
            let store = self.store.clone();
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            blocking(move || Ok(store.missing_pages(&unique)?)).await?
        };
        let fetched: Vec<(PageId, Bytes)> = futures::stream::iter(wanted)
            .map(|id| async move {
                let bytes = self
                    .remote
                    .page(&id)
                    .await
                    .map_err(unreachable)?
                    .ok_or_else(|| {
                        damaged(session, "one of its pages is missing from the bucket")
                    })?;
                if pages::page_id(&salt, &bytes) != id {
                    return Err(damaged(
                        session,
                        "one of its pages in the bucket does not match its id",
                    ));
                }
                Ok::<_, EngineError>((id, bytes))
            })
            .buffer_unordered(PARALLEL_PAGES)
            .try_collect()
            .await?;
        let t_pages = started.elapsed();
        let fetched_bytes: usize = fetched.iter().map(|(_, b)| b.len()).sum();
        let store = self.store.clone();
        let record = conversation.record.clone();
        let manifest_bytes = conversation.manifest.clone();
        blocking(move || {
            let put = PagedPut {
                manifest: &manifest_bytes,
                refs: &ids,
                pages: fetched.iter().map(|(id, b)| (*id, b.as_ref())).collect(),
            };
            // The bucket holds it durably: this copy needs no fsync of its own.
            store.put_copy(session, &record, &put)?;
            Ok(())
        })
        .await?;
        tracing::info!(
            %session, bytes = fetched_bytes, ?t_pages, took = ?started.elapsed(),
            "conversation fetched from the bucket"
        );
        metrics::counter!("kvsnap_remote_fetches_total").increment(1);
        Ok(())
    }
}

/// The background uploader: takes queued conversations one at a time, retrying a failing one
/// with a doubling pause. It lives as long as the process.
async fn uploader(fleet: Arc<Fleet>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(uploading) = fleet.take_next() else {
            fleet.wake.notified().await;
            continue;
        };
        let session = uploading.session;
        let result = fleet.upload(session).await.map(|_| ());
        fleet.note(&result);
        let pause = match result {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                None
            }
            Err(error) => {
                tracing::warn!(%session, %error, retry_in = ?backoff, "an upload to the bucket failed");
                fleet.pending.lock().expect("pending").insert(session);
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                Some(pause)
            }
        };
        drop(uploading);
        fleet.publish_pending();
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
}

/// A conversation being uploaded: it counts as pending until this is dropped.
struct InFlight<'a> {
    fleet: &'a Fleet,
    session: Uuid,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.fleet.in_flight.lock().expect("in flight");
        if let Some(count) = in_flight.get_mut(&self.session) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.session);
            }
        }
    }
}

/// A bucket failure while serving a request: the bucket does not answer (503, or the local
/// copy serves); damage stays damage (422).
fn unreachable(error: StoreError) -> EngineError {
    match error {
        StoreError::Io(message) => EngineError::Unavailable(message),
        other => other.into(),
    }
}

fn damaged(session: Uuid, why: &str) -> EngineError {
    EngineError::Damaged(format!(
        "conversation {session} in the bucket is damaged: {why}"
    ))
}
