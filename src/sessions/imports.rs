//! A conversation arriving whole (an upload, a llama.cpp file, one sent back by another
//! instance): verified completely against the running model, then stored. This runs on a
//! blocking thread while the engine holds the conversation (`EngineHandle::hold`), never on
//! the decode thread: checking a file of up to a gigabyte stalls nobody's turn.

use uuid::Uuid;

use super::ConversationError;
use super::fleet::Fleet;
use super::{describe, save};
use crate::clock::now_ms;
use crate::engine::{Keep, KeepAs, ModelInfo, Requester, SessionInfo};
use crate::snapshot::Snapshot;
use crate::snapshot::llama_file;
use crate::store::{SessionStore, Store};

/// Where a conversation came from, when another instance sent it: its owner and age travel
/// with it.
#[derive(Debug, Clone)]
pub struct Origin {
    /// The owner's key hash (keys themselves never travel).
    pub owner: Option<String>,
    pub created_ms: u64,
}

/// Verifies the snapshot file `bytes` (checksum, model, layout, tokens, llama.cpp state) and
/// stores it as conversation `session`, for `requester` (an upload) or with `origin`'s owner
/// and age (sent by another instance). A stored conversation of another owner is unknown to
/// `requester`.
pub fn verify_and_store(
    store: &Store,
    fleet: Option<&Fleet>,
    model: &ModelInfo,
    session: Uuid,
    requester: &Requester,
    bytes: &[u8],
    origin: Option<Origin>,
) -> Result<SessionInfo, ConversationError> {
    let started = std::time::Instant::now();
    let snapshot = Snapshot::decode(bytes)?;
    let decoded = started.elapsed();
    let state = snapshot.verify(model.snapshot_identity()?)?;
    let verified = started.elapsed();
    if let Some(existing) = store.record(session)?
        && !requester.may_use(&existing.owner)
    {
        return Err(ConversationError::NotFound(format!(
            "there is no conversation {session}"
        )));
    }
    let (owner, created_ms) = match origin {
        Some(origin) => (origin.owner, origin.created_ms),
        None => (requester.owner(), now_ms()),
    };
    // The file a download will give back: this snapshot in the current layout (an upload in
    // an older layout is re-encoded), so its checksum is that file's.
    let file = snapshot.encode_parts()?;
    let record = save(
        store,
        Keep {
            session,
            kind: KeepAs::Conversation,
            owner,
            created_ms,
            shell: &snapshot,
            state: &state,
            section: &snapshot.sequence_state,
            unchanged_below: 0,
            file: Some(&file),
        },
    )?;
    if let Some(fleet) = fleet {
        fleet.queue(session);
    }
    tracing::debug!(?decoded, ?verified, stored = ?started.elapsed(), "import phases");
    Ok(describe(session, &record, model))
}

/// A llama.cpp `ggsq` file as a snapshot file for the running model (`llama_file::into_snapshot`).
pub fn snapshot_from_llama_file(
    bytes: &[u8],
    model: &ModelInfo,
) -> Result<Vec<u8>, ConversationError> {
    let snapshot = llama_file::into_snapshot(bytes, model.snapshot_identity()?, now_ms())?;
    Ok(snapshot.encode()?)
}
