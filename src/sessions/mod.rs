//! Where conversations' bytes go, and when: the layer between `http/`, the engine (which only
//! hands a sequence's state out and loads verified state in) and the store.
//!
//! - `conversations.rs`: `Conversations`, the service `http/` and `migrate/` ask about a
//!   conversation: the fleet claim before every read, the per-key quota, uploads verified
//!   and stored off the decode thread (`imports.rs`) while the engine holds the conversation.
//! - `keeper.rs`: `StoreKeeper`, the engine's `Keeper` on the store: the persist policy,
//!   synchronous saves, the queue of saves off the decode path and its "latest version" map,
//!   restores' reads, eviction's saves, forks, moves out, deletes.
//! - `lookup.rs`: unnamed entries found by their tokens (the index names, the search).
//! - `paging.rs`: a snapshot to and from the page store (a manifest and content-addressed
//!   pages).
//! - `writer.rs`: the thread that commits queued saves.
//! - `fleet/`: the shared bucket: uploads after saves, fetches before reads, lease handoffs.
//! - `incoming.rs`: a conversation arriving page by page from an instance of another fleet.
//! - `audit.rs`: appending to the audit trail from async code.
//! - `rekey.rs`: key rotation in the background (store, then bucket).
//! - `responses.rs`: stored responses of OpenAI's Responses API, each the text of the named
//!   conversation of its id.
//!
//! Also here: the record a save stores, and a stored conversation described.

pub mod audit;
mod conversations;
mod error;
mod fleet;
mod imports;
pub mod incoming;
mod keeper;
pub mod lookup;
pub mod paging;
mod rekey;
mod responses;
mod writer;

use uuid::Uuid;

pub use conversations::Conversations;
pub use error::{ConversationError, FleetError};
pub use fleet::{Fleet, FleetMember, RemoteDurability, RemoteHealth};
pub use imports::Origin;
pub use keeper::StoreKeeper;
pub use rekey::{RekeyStatus, Rekeys};

use crate::clock::now_ms;
use crate::engine::{Keep, ModelInfo, SessionInfo};
use crate::snapshot::EncodedSnapshot;
use crate::store::records::{EntryRecord, RECORD_VERSION, SessionRecord};
use crate::store::{SessionStore, Store};

/// When a resident conversation's state is written to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PersistPolicy {
    /// After every completed turn: a turn is durable when its reply ends.
    Turn,
    /// Only when its sequence is needed by another conversation, and at shutdown.
    Evict,
    /// Only at shutdown.
    Shutdown,
    /// Never: a plain server, as llama-server is. A request may not name a conversation, and
    /// nothing is written to the store; a model whose state kvsnap cannot keep runs only so.
    Off,
}

/// Saves `keep` as a manifest and the pages the store lacks, with its record, in one durable
/// transaction; returns the record stored.
pub fn save(store: &Store, keep: Keep<'_>) -> Result<SessionRecord, ConversationError> {
    let started = std::time::Instant::now();
    let encoded;
    let file: &EncodedSnapshot<'_> = match keep.file {
        Some(file) => file,
        None => {
            encoded = keep
                .shell
                .encode_around(keep.state.normalised_pieces(keep.section))?;
            &encoded
        }
    };
    // This save continues the stored history: one more than the copy it replaces.
    let saves = store.record(keep.session)?.map_or(0, |r| r.saves) + 1;
    // A download gives the snapshot file: its size and checksum are what the record promises.
    let record = SessionRecord {
        record_version: RECORD_VERSION,
        owner: keep.owner.clone(),
        created_ms: keep.created_ms,
        last_used_ms: now_ms(),
        tokens: keep.shell.tokens.len() as u64,
        bytes: file.len() as u64,
        chunks: 0,
        checksum: file.file_checksum.to_hex().to_string(),
        model: keep.shell.model.file_hash.clone(),
        damaged: None,
        compute_profile: keep.shell.layout.compute_profile.clone(),
        saves,
    };
    let stats = paging::Cut::of(&keep, Some(keep.session))
        .put(store, |put| store.put(keep.session, &record, put))?;
    tracing::debug!(
        session = %keep.session, saved = ?started.elapsed(), bytes = file.len(),
        pages_written = stats.pages_written, page_bytes = stats.page_bytes_written,
        "save"
    );
    metrics::histogram!("kvsnap_snapshot_save_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("kvsnap_page_bytes_written_total").increment(stats.page_bytes_written);
    metrics::counter!("kvsnap_manifest_bytes_written_total").increment(stats.manifest_bytes);
    Ok(record)
}

/// Keeps `keep` as the unnamed entry `keep.session`, continuing the entry `continues`, in
/// one durable transaction that also holds the store to its budget. Too short a state to be
/// found again (`lookup::BOUNDARY`) is not kept.
pub fn save_entry(
    store: &Store,
    keep: Keep<'_>,
    continues: Option<Uuid>,
    checkpoint: bool,
) -> Result<(), ConversationError> {
    let started = std::time::Instant::now();
    let tokens = &keep.shell.tokens;
    let Some(point) = lookup::index_point(tokens.len()) else {
        return Ok(());
    };
    let salt = lookup::salt(&keep.shell.model, &keep.shell.layout, keep.owner.as_deref());
    let now = now_ms();
    let index = lookup::prefix_hash(&salt, &tokens[..point]);
    let record = EntryRecord {
        record_version: RECORD_VERSION,
        owner: keep.owner.clone(),
        created_ms: now,
        last_used_ms: now,
        tokens: tokens.len() as u64,
        tokens_hash: lookup::prefix_hash(&salt, tokens).to_vec(),
        model: keep.shell.model.file_hash.clone(),
        checkpoint,
        index: index.to_vec(),
    };
    // A prefix computed cold again (its checkpoint was not used, say `cache_prompt: false`)
    // is the same bytes: one copy under its name keeps lookups at that name short.
    if checkpoint && store.holds_checkpoint(&index, &record.tokens_hash)? {
        tracing::debug!(entry = %keep.session, tokens = tokens.len(), "checkpoint already kept");
        return Ok(());
    }
    let (stats, dropped) = paging::Cut::of(&keep, continues).put(store, |put| {
        store.put_entry(keep.session, &record, &index, put)
    })?;
    tracing::debug!(
        entry = %keep.session, saved = ?started.elapsed(), tokens = tokens.len(),
        pages_written = stats.pages_written, page_bytes = stats.page_bytes_written, dropped,
        checkpoint, "entry kept"
    );
    metrics::counter!("kvsnap_entries_kept_total").increment(1);
    metrics::counter!("kvsnap_entries_dropped_total").increment(dropped as u64);
    metrics::counter!("kvsnap_page_bytes_written_total").increment(stats.page_bytes_written);
    Ok(())
}

/// A conversation known only from its stored record.
pub fn describe(session: Uuid, record: &SessionRecord, model: &ModelInfo) -> SessionInfo {
    SessionInfo {
        session_id: session,
        state: if record.damaged.is_some() {
            "damaged"
        } else {
            "stored"
        },
        tokens: record.tokens,
        bytes: record.bytes,
        model: if record.model == model.file_hash {
            model.id.clone()
        } else {
            format!("blake3:{}", record.model)
        },
        created_ms: record.created_ms,
        last_used_ms: record.last_used_ms,
        damaged: record.damaged.clone(),
        checksum: Some(record.checksum.clone()),
        owner: record.owner.clone(),
        exactness: SessionInfo::exactness_here(record.compute_profile.as_deref(), model),
    }
}

/// A blocking task of this layer that died (its panic is in the log).
pub(crate) struct TaskFailed(String);

impl From<TaskFailed> for ConversationError {
    fn from(failed: TaskFailed) -> Self {
        ConversationError::Internal(failed.0)
    }
}

impl From<TaskFailed> for FleetError {
    fn from(failed: TaskFailed) -> Self {
        FleetError::Internal(failed.0)
    }
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ConversationError> + Send + 'static,
) -> Result<T, ConversationError> {
    blocking_as(work).await
}

/// `blocking`, for any error a dead task can become.
async fn blocking_as<T, E>(work: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<TaskFailed> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| E::from(TaskFailed(format!("a store task failed: {e}"))))?
}
