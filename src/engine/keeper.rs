//! The port through which the engine keeps what it does not hold in a sequence.
//!
//! The engine knows no store. It hands a conversation's state out (`Keep`, `SaveJob`) and
//! asks for verified-to-be-whole bytes back (`read`); where those bytes live, when a turn is
//! saved and how saves are ordered is the business of whoever implements `Keeper` —
//! `sessions::StoreKeeper`, on the store. Every method runs on the engine thread.

use uuid::Uuid;

use super::{ModelInfo, SessionInfo};
use crate::snapshot::llama_state::SequenceState;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::{EncodedSnapshot, LiveIdentity, Snapshot};

/// What a state is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAs {
    /// A new version of the named conversation `session`.
    Conversation,
    /// A new unnamed entry with the id `session` (a request no client named), continuing the
    /// entry `continues` when the sequence was restored from or last kept as one: positions
    /// below `unchanged_below` are that entry's. A `checkpoint` holds what a cold start of
    /// its tokens computes (see `EntryRecord::checkpoint`).
    Entry {
        continues: Option<Uuid>,
        checkpoint: bool,
    },
}

/// A kept unnamed entry whose tokens begin a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundEntry {
    pub entry: Uuid,
    /// The prompt's first `tokens` tokens are the entry's, all of them.
    pub tokens: usize,
    /// What a cold start of those tokens computes: a new conversation may start from it.
    pub checkpoint: bool,
}

/// A conversation's state to keep, borrowed for a synchronous save.
pub struct Keep<'a> {
    pub session: Uuid,
    pub kind: KeepAs,
    pub owner: Option<String>,
    pub created_ms: u64,
    /// The snapshot around the state: tokens, random stream, identity. Its
    /// `sequence_state` is not read; the state is `section`.
    pub shell: &'a Snapshot<'a>,
    /// The parse of `section`, llama.cpp's memory section.
    pub state: &'a SequenceState,
    pub section: &'a [u8],
    /// Positions below this hold the same KV as in this conversation's last save handed to
    /// the keeper; 0 when nothing is known.
    pub unchanged_below: u32,
    /// The snapshot file, when the caller encoded it already (its size and checksum are
    /// what the stored record promises a download).
    pub file: Option<&'a EncodedSnapshot<'a>>,
}

/// Why the keeper could not keep or read back a conversation: all the engine knows of the
/// store and the bucket behind it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeepError {
    /// The stored conversation is damaged: it is kept, marked damaged, and refused.
    #[error("{0}")]
    Damaged(String),
    /// The stored state is sound but cannot fit this server (another model or layout).
    #[error("{0}")]
    Incompatible(String),
    /// The store (or the bucket a save must reach) failed; the details are the keeper's log.
    #[error("{0}")]
    Failed(String),
}

/// How a queued save ended.
pub type SaveResult = Result<(), KeepError>;

/// What runs once a queued save committed or failed (a turn's reply ends there), on whatever
/// thread committed it.
pub type AfterSave = Box<dyn FnOnce(&SaveResult) + Send>;

/// A conversation's state copied out of its sequence, handed over to be saved while the
/// engine decodes on.
pub struct SaveJob {
    pub session: Uuid,
    pub kind: KeepAs,
    pub owner: Option<String>,
    pub created_ms: u64,
    pub shell: Snapshot<'static>,
    pub state: SequenceState,
    /// llama.cpp's state as it wrote it; the memory section is `raw[section_at..]`.
    pub raw: Vec<u8>,
    pub section_at: usize,
    /// As `Keep::unchanged_below`.
    pub unchanged_below: u32,
    pub then: AfterSave,
}

impl SaveJob {
    pub fn keep(&self) -> Keep<'_> {
        Keep {
            session: self.session,
            kind: self.kind,
            owner: self.owner.clone(),
            created_ms: self.created_ms,
            shell: &self.shell,
            state: &self.state,
            section: &self.raw[self.section_at..],
            unchanged_below: self.unchanged_below,
            file: None,
        }
    }
}

/// A queued save that finished, back to the engine.
pub struct Saved {
    pub session: Uuid,
    pub result: SaveResult,
    /// The job's state buffer, for the next save.
    pub raw: Vec<u8>,
}

/// Where conversations go when they are not (only) in a sequence.
pub trait Keeper: Send {
    /// Whether a conversation is saved when each turn ends (otherwise only when its sequence
    /// is needed by another conversation, and at shutdown).
    fn saves_every_turn(&self) -> bool;

    /// A stored conversation, described as the store knows it (for a restore: its owner,
    /// age and whether it is damaged); `None` if there is none.
    fn stored(&self, session: Uuid, model: &ModelInfo) -> Result<Option<SessionInfo>, KeepError>;

    /// Where a conversation that moved to another instance went.
    fn forwarded_to(&self, session: Uuid) -> Result<Option<String>, KeepError>;

    /// Saves now; returns once it is durable.
    fn save(&mut self, keep: Keep<'_>) -> Result<(), KeepError>;

    /// Queues a save to commit off the engine thread; gives the job back if that cannot be.
    fn queue(&mut self, job: SaveJob) -> Result<(), Box<SaveJob>>;

    /// Waits until every queued save of `session` (of every conversation with `None`) has
    /// finished; returns the saves that finished meanwhile.
    fn wait(&mut self, session: Option<Uuid>) -> Vec<Saved>;

    /// The queued saves that finished so far, without waiting.
    fn finished(&mut self) -> Vec<Saved>;

    /// The stored state of `session` (owned by `owner`): assembled into `frame` after `room`
    /// bytes left free in front, every piece checked against its content address. Returns
    /// the rest of the conversation; the caller verifies the state against the live context.
    /// With `most_tokens`, the state it kept at its latest turn end within its first that many
    /// tokens (a recurrent state cannot be cut back); `None` when it kept none there.
    fn read(
        &mut self,
        session: Uuid,
        owner: Option<&str>,
        frame: &mut Vec<u8>,
        room: usize,
        most_tokens: Option<usize>,
    ) -> Result<Option<Manifest>, KeepError>;

    /// Marks a stored conversation damaged (it is kept, and refused until replaced).
    fn mark_damaged(&mut self, session: Uuid, reason: &str);

    /// Whether requests no client named are kept as unnamed entries (`KeepAs::Entry`).
    fn keeps_entries(&self) -> bool;

    /// The kept unnamed entry of `owner`, written by a context of `identity`, holding the most
    /// tokens that all begin `prompt` (only checkpoints with `checkpoints_only`); `None` when
    /// there is none.
    fn find_entry(
        &mut self,
        owner: Option<&str>,
        identity: &LiveIdentity,
        prompt: &[i32],
        checkpoints_only: bool,
    ) -> Result<Option<FoundEntry>, KeepError>;

    /// Drops an unnamed entry that could not be restored (damaged, or of another shape).
    fn drop_entry(&mut self, entry: Uuid, reason: &str);
}
