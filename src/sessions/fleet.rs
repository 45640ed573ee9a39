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
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::UpdateVersion;
use uuid::Uuid;

use crate::engine::EngineError;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::{self, PageId};
use crate::store::remote::{Remote, RemoteConversation, RemoteWriteError};
use crate::store::{PagedPut, SessionStore, Store};

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
    pending: Mutex<BTreeSet<Uuid>>,
    wake: tokio::sync::Notify,
    /// The version of each conversation object this instance last read or wrote.
    seen: Mutex<HashMap<Uuid, UpdateVersion>>,
    /// Pages known to be in the bucket, so a later save does not ask again.
    known: Mutex<HashSet<PageId>>,
    /// One upload at a time: the uploader and remote-sync turns take turns.
    uploading: tokio::sync::Mutex<()>,
    health: Mutex<RemoteHealth>,
}

impl Fleet {
    /// Starts the uploader on the current runtime.
    pub fn start(remote: Remote, store: Arc<Store>, durability: RemoteDurability) -> Arc<Fleet> {
        let fleet = Arc::new(Fleet {
            health: Mutex::new(RemoteHealth {
                url: remote.url.clone(),
                ..Default::default()
            }),
            remote,
            store,
            durability,
            runtime: tokio::runtime::Handle::current(),
            pending: Mutex::new(BTreeSet::new()),
            wake: tokio::sync::Notify::new(),
            seen: Mutex::new(HashMap::new()),
            known: Mutex::new(HashSet::new()),
            uploading: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(uploader(fleet.clone()));
        fleet
    }

    pub fn health(&self) -> RemoteHealth {
        let mut health = self.health.lock().expect("health").clone();
        health.pending_uploads = self.pending.lock().expect("pending").len();
        health
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

    /// The conversation changed here (deleted, say): bring the bucket in line, soon.
    pub fn queue(&self, session: Uuid) {
        self.pending.lock().expect("pending").insert(session);
        metrics::gauge!("kvsnap_remote_uploads_pending")
            .set(self.pending.lock().expect("pending").len() as f64);
        self.wake.notify_one();
    }

    async fn upload_now(&self, session: Uuid) -> Result<(), EngineError> {
        let result = self.upload(session).await;
        self.note(&result);
        result.map_err(|e| {
            self.queue(session);
            EngineError::Internal(format!(
                "the turn is saved here but not in the bucket yet (it will be retried): {e}"
            ))
        })
    }

    fn note(&self, result: &Result<(), EngineError>) {
        let mut health = self.health.lock().expect("health");
        match result {
            Ok(()) => health.last_error = None,
            Err(error) => {
                health.failed_uploads += 1;
                health.last_error = Some(error.to_string());
                metrics::counter!("kvsnap_remote_upload_failures_total").increment(1);
            }
        }
    }

    /// Makes the bucket hold this instance's latest version of `session`: its missing pages,
    /// then its conversation object; or, when this instance no longer has it, no object.
    async fn upload(&self, session: Uuid) -> Result<(), EngineError> {
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
            // Deleted here (a move out keeps no local copy either): the fleet forgets it too.
            self.remote.delete_conversation(session).await?;
            self.seen.lock().expect("seen").remove(&session);
            return Ok(());
        };
        let manifest = Manifest::decode(&manifest_bytes)?;
        let ids: Vec<PageId> = manifest.page_ids();
        self.upload_pages(&ids).await?;
        let t_pages = started.elapsed();
        let object = RemoteConversation {
            record,
            manifest: manifest_bytes,
            refs: ids.concat(),
        };
        let seen = self.seen.lock().expect("seen").get(&session).cloned();
        match self
            .remote
            .put_conversation(session, &object, seen.as_ref())
            .await
        {
            Ok(version) => {
                self.seen.lock().expect("seen").insert(session, version);
                metrics::histogram!("kvsnap_remote_upload_seconds")
                    .record(started.elapsed().as_secs_f64());
                tracing::debug!(%session, ?t_pages, took = ?started.elapsed(), "uploaded");
                Ok(())
            }
            Err(RemoteWriteError::Lost(_)) => {
                // The bucket may hold exactly this version (written before a restart).
                if let Some(found) = self.remote.conversation(session).await?
                    && found.conversation == object
                {
                    self.seen
                        .lock()
                        .expect("seen")
                        .insert(session, found.version);
                    return Ok(());
                }
                tracing::warn!(
                    %session,
                    "another instance continued this conversation in the bucket; this \
                     instance's copy is older and is not uploaded over it"
                );
                metrics::counter!("kvsnap_remote_conflicts_total").increment(1);
                Ok(())
            }
            Err(RemoteWriteError::Store(e)) => Err(e.into()),
        }
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

    /// When the local store has no `session` (and it did not move away), looks for it in the
    /// bucket and brings it here: its pages fetched several at once, each checked against its
    /// id, then committed locally with its manifest in one transaction. A damaged object or
    /// page is refused (422) and nothing of it is kept.
    pub async fn fetch(&self, session: Uuid) -> Result<(), EngineError> {
        let store = self.store.clone();
        let here = blocking(move || {
            Ok(store.record(session)?.is_some() || store.forward(session)?.is_some())
        })
        .await?;
        if here {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let Some(found) = self.remote.conversation(session).await? else {
            return Ok(());
        };
        let conversation = found.conversation;
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
                let bytes = self.remote.page(&id).await?.ok_or_else(|| {
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
        blocking(move || {
            let put = PagedPut {
                manifest: &conversation.manifest,
                refs: &ids,
                pages: fetched.iter().map(|(id, b)| (*id, b.as_ref())).collect(),
            };
            // The bucket holds it durably: this copy needs no fsync of its own.
            store.put_copy(session, &record, &put)?;
            Ok(())
        })
        .await?;
        self.seen
            .lock()
            .expect("seen")
            .insert(session, found.version);
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
        let next = fleet.pending.lock().expect("pending").pop_first();
        let Some(session) = next else {
            fleet.wake.notified().await;
            continue;
        };
        let result = fleet.upload(session).await;
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
        metrics::gauge!("kvsnap_remote_uploads_pending")
            .set(fleet.pending.lock().expect("pending").len() as f64);
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
}

fn damaged(session: Uuid, why: &str) -> EngineError {
    EngineError::Damaged(format!(
        "conversation {session} in the bucket is damaged: {why}"
    ))
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| EngineError::Internal(format!("a store task failed: {e}")))?
}
