//! What the migration API answers, shared by the daemon and the `kvsnap` CLI that reads it.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One conversation moved (or found already moved) to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveReport {
    pub session_id: Uuid,
    pub target: String,
    /// "moved"; "handed_over" within a fleet (the target takes its lease and reads it from
    /// the shared bucket; nothing is sent); or "already_moved" when a retry finds the move done.
    pub outcome: String,
    pub tokens: u64,
    /// Bytes sent: the manifest and the pages the target lacked.
    pub bytes: u64,
    /// Pages sent, and pages the target already had: `pages_resumed` from an earlier attempt
    /// that broke off, `pages_held` stored for other conversations of the same owner.
    #[serde(default)]
    pub pages_sent: usize,
    #[serde(default)]
    pub pages_resumed: usize,
    #[serde(default)]
    pub pages_held: usize,
    pub millis: f64,
}

/// A conversation that will not (or did not) move, and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refusal {
    pub session_id: Uuid,
    pub reason: String,
}

/// A conversation a migration would move.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedMove {
    pub session_id: Uuid,
    /// "resident" or "stored".
    pub state: String,
    pub tokens: u64,
    /// Its stored snapshot's size; 0 when it was never stored (it is snapshotted when it moves).
    pub bytes: u64,
    /// Whether it will continue on the target exactly as here (same compute profile), and
    /// why not when it will not. Another profile still moves: the state is valid there.
    pub bit_exact: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exactness: Option<String>,
}

/// What a migration would do, without doing it (`dry_run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub target: String,
    /// The compute profile the target runs (`None`: a target that does not say).
    #[serde(default)]
    pub target_compute_profile: Option<String>,
    pub would_move: Vec<PlannedMove>,
    pub refused: Vec<Refusal>,
}

/// A migration job's progress, as `GET /admin/v1/jobs/{id}` reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobStatus {
    pub job_id: Uuid,
    pub target: String,
    /// "running" or "finished".
    pub state: String,
    pub sessions_total: usize,
    /// Conversations finished, moved or failed.
    pub sessions_done: usize,
    pub sessions_moved: usize,
    /// Snapshot bytes sent so far, including those of a conversation in flight.
    pub bytes_done: u64,
    /// Known stored sizes of the conversations to move (an estimate: resident ones are
    /// snapshotted as they go).
    pub bytes_planned: u64,
    pub failures: Vec<Refusal>,
    pub moved: Vec<Uuid>,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Set when the job itself failed, beyond any one conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
