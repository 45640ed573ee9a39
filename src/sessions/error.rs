//! What goes wrong in `sessions/`, one type per part: `ConversationError` for what is asked of
//! a conversation, `FleetError` (`fleet/`) for the bucket and its leases. `http/error.rs` maps
//! each to a status; the engine sees them only as the `KeepError` its port speaks.

use crate::engine::{EngineError, KeepError};
use crate::snapshot::SnapshotError;
use crate::store::StoreError;

pub use super::fleet::FleetError;

/// A request about a conversation that this layer refused or could not carry out.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    /// The engine refused or failed (validation, a busy or held sequence, llama.cpp).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The fleet's bucket or its leases.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// A file, or a stored state, that is not a sound snapshot for this server.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// Fine, but not now (a transfer in progress): 409 with a hint to retry.
    #[error("{0}")]
    Conflict(String),
    /// Can never be (an id already taken, a state this model cannot hold): 409.
    #[error("{0}")]
    Incompatible(String),
    /// The stored conversation is damaged.
    #[error("{0}")]
    Damaged(String),
    /// The key keeps as many conversations as it may (`--max-conversations-per-key`).
    #[error(
        "this key keeps {held} conversations, the most it may (--max-conversations-per-key); \
         delete some with DELETE /v1/sessions/{{id}} before starting another"
    )]
    Quota { held: usize },
    /// A fault of this layer: a task that died, a state it cannot page (a bug; see the log).
    #[error("{0}")]
    Internal(String),
}

impl ConversationError {
    /// "No such conversation".
    pub fn unknown(session: uuid::Uuid) -> Self {
        ConversationError::NotFound(format!("there is no conversation {session}"))
    }
}

/// What the engine is told when its keeper fails: damage, a state that cannot fit, or a
/// failure whose details go to the log here.
impl From<ConversationError> for KeepError {
    fn from(error: ConversationError) -> Self {
        match error {
            ConversationError::Damaged(reason) => KeepError::Damaged(reason),
            ConversationError::Store(StoreError::Damaged(_, reason)) => KeepError::Damaged(reason),
            ConversationError::Snapshot(error) if error.is_damage() => {
                KeepError::Damaged(error.to_string())
            }
            ConversationError::Snapshot(error) => KeepError::Incompatible(error.to_string()),
            ConversationError::Incompatible(reason) => KeepError::Incompatible(reason),
            other => KeepError::Failed(other.to_string()),
        }
    }
}

impl From<StoreError> for KeepError {
    fn from(error: StoreError) -> Self {
        ConversationError::Store(error).into()
    }
}

impl From<FleetError> for KeepError {
    fn from(error: FleetError) -> Self {
        KeepError::Failed(error.to_string())
    }
}
