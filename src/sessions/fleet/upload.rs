//! The uploader: each committed save brought to the bucket (the pages it lacks, then the
//! conversation object, written on the version this instance last saw), at once in
//! `remote-sync` or by the background task in `async`, and what `/health` says of it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

use super::{Fleet, FleetError, PARALLEL_PAGES, RemoteDurability, blocking, lease};
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::PageId;
use crate::store::SessionStore;
use crate::store::remote::{RemoteConversation, RemoteWriteError};

/// What an upload did.
pub(super) enum Uploaded {
    /// The bucket holds this instance's version (or, for a conversation gone from here, none).
    Kept,
    /// The bucket holds a newer version, which was not written over.
    Superseded,
}

/// What the uploader brings to the bucket. Conversations and responses sort first: they were
/// acknowledged, entries only save re-reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Upload {
    Conversation(Uuid),
    Response(Uuid),
    Entry(Uuid),
}

/// Longest wait between retries of a failing upload.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

impl Fleet {
    /// Saves not in the bucket yet (conversations' latest, entries): queued or being uploaded.
    pub(super) fn pending_count(&self) -> usize {
        // In this order: a conversation moves from `pending` to `in_flight` with the latter
        // locked first, so it is never missing from both while counted here.
        let in_flight = self.in_flight.lock().expect("in flight");
        let pending = self.pending.lock().expect("pending");
        pending.union(&in_flight.keys().copied().collect()).count()
    }

    /// Takes the next queued upload as being uploaded.
    fn take_next(&self) -> Option<InFlight<'_>> {
        let mut in_flight = self.in_flight.lock().expect("in flight");
        let item = self.pending.lock().expect("pending").pop_first()?;
        *in_flight.entry(item).or_default() += 1;
        Some(InFlight { fleet: self, item })
    }

    /// Takes conversation `session` out of the queue to upload it now.
    pub(super) fn take(&self, session: Uuid) -> InFlight<'_> {
        let item = Upload::Conversation(session);
        let mut in_flight = self.in_flight.lock().expect("in flight");
        self.pending.lock().expect("pending").remove(&item);
        *in_flight.entry(item).or_default() += 1;
        InFlight { fleet: self, item }
    }

    fn publish_pending(&self) {
        metrics::gauge!("kvsnap_remote_uploads_pending").set(self.pending_count() as f64);
    }

    /// After a save committed locally (on the writer thread or the engine's): uploads it
    /// before returning in `remote-sync` mode when `wait` is set, else queues it.
    pub fn saved(self: &Arc<Self>, session: Uuid, wait: bool) -> Result<(), FleetError> {
        if wait && self.durability == RemoteDurability::RemoteSync {
            // Run on the runtime's threads, not the calling writer thread: that one yields to
            // decoding (nice 9), and driving the upload there made it 5x slower.
            let fleet = self.clone();
            let upload = self
                .runtime
                .spawn(async move { fleet.upload_now(session).await });
            return self.runtime.block_on(upload).unwrap_or_else(|e| {
                Err(FleetError::Internal(format!("an upload task failed: {e}")))
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
        self.enqueue(Upload::Conversation(session));
    }

    /// Entry `id` was kept here: the bucket gets it soon. Nobody waits for it, in any mode:
    /// no reply was promised on it.
    pub fn queue_entry(&self, id: Uuid) {
        self.enqueue(Upload::Entry(id));
    }

    pub(super) fn enqueue(&self, item: Upload) {
        self.pending.lock().expect("pending").insert(item);
        self.publish_pending();
        self.wake.notify_one();
    }

    async fn upload_now(&self, session: Uuid) -> Result<(), FleetError> {
        let uploading = self.take(session);
        // A turn another instance superseded is not the conversation any more: in
        // `remote-sync` it is not acknowledged (its reply ends in an error, and the next
        // request continues from the bucket's newer version).
        let result = match self.upload(session).await {
            Ok(Uploaded::Kept) => Ok(()),
            Ok(Uploaded::Superseded) => {
                return Err(FleetError::Conflict(format!(
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
            FleetError::Unavailable(format!(
                "the turn is saved here but not in the bucket yet (it will be retried): {e}"
            ))
        })
    }

    pub(super) fn note(&self, result: &Result<(), FleetError>) {
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
    pub(super) async fn upload(&self, session: Uuid) -> Result<Uploaded, FleetError> {
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
                            if lease::may_write_over(
                                self.instance,
                                object.record.saves,
                                &found.conversation,
                            ) =>
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

    /// Uploads the pages among `ids` the bucket lacks, several at once.
    pub(super) async fn upload_pages(&self, ids: &[PageId]) -> Result<(), FleetError> {
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
                            FleetError::Store(crate::store::StoreError::Io(
                                "a page vanished from the local store".into(),
                            ))
                        })?;
                    let size = bytes.len() as u64;
                    if self.remote.put_page(&id, Bytes::from(bytes)).await? {
                        metrics::counter!("kvsnap_remote_page_bytes_uploaded_total")
                            .increment(size);
                        metrics::counter!("kvsnap_remote_pages_uploaded_total").increment(1);
                    }
                }
                self.known.lock().expect("known").insert(id);
                Ok::<(), FleetError>(())
            })
            .buffer_unordered(PARALLEL_PAGES)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// The background uploader: takes queued uploads one at a time, retrying a failing one with a
/// doubling pause. It lives as long as the process.
pub(super) async fn uploader(fleet: Arc<Fleet>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(uploading) = fleet.take_next() else {
            fleet.wake.notified().await;
            continue;
        };
        let item = uploading.item;
        let result = match item {
            Upload::Conversation(session) => fleet.upload(session).await.map(|_| ()),
            Upload::Response(id) => fleet.upload_response(id).await,
            Upload::Entry(id) => fleet.upload_entry(id).await,
        };
        fleet.note(&result);
        let pause = match result {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                None
            }
            Err(error) => {
                tracing::warn!(?item, %error, retry_in = ?backoff, "an upload to the bucket failed");
                fleet.pending.lock().expect("pending").insert(item);
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

/// An upload under way: it counts as pending until this is dropped.
pub(super) struct InFlight<'a> {
    fleet: &'a Fleet,
    item: Upload,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.fleet.in_flight.lock().expect("in flight");
        if let Some(count) = in_flight.get_mut(&self.item) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.item);
            }
        }
    }
}
