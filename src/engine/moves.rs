//! Moving a conversation to another instance, as the engine sees it.
//!
//! `begin_move` hands out the conversation's snapshot and marks it moving: from then on a turn
//! or any other change to it is refused with 409 (retry shortly), so it cannot fork while its
//! copy travels. `end_move` either finishes the move — the conversation is deleted here and a
//! forwarding record written, in one store transaction — or gives the conversation back. The
//! transfer itself is `crate::migrate`'s job; the engine never waits on the network.

use uuid::Uuid;

use super::worker::Worker;
use super::{EngineError, Outgoing};

impl Worker<'_> {
    /// Refuses work on a conversation that is moving (409) or has moved away (its new home).
    pub(super) fn check_here(&self, session: Uuid) -> Result<(), EngineError> {
        if self.moving.contains(&session) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} is moving to another instance; retry in a moment"
            )));
        }
        if self.resident_slot(session).is_none()
            && let Some(target) = self.keeper.forwarded_to(session)?
        {
            return Err(EngineError::Moved { session, target });
        }
        Ok(())
    }

    /// The conversation's current snapshot, for sending to another instance; it stays here,
    /// whole, and is refused to everyone until `end_move`. A resident conversation with unsaved
    /// changes is committed to the store first, so a crash mid-move loses nothing.
    pub(super) fn begin_move(&mut self, session: Uuid) -> Result<Outgoing, EngineError> {
        self.check_here(session)?;
        if self.pending.iter().any(|p| p.session == Some(session)) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} has a turn waiting; it can move when the turn ends"
            )));
        }
        let outgoing = match self.resident_slot(session) {
            Some(index) if self.slots[index].busy => {
                return Err(EngineError::Conflict(format!(
                    "conversation {session} is generating; it can move when its turn ends"
                )));
            }
            Some(index) => {
                let bytes = if self.slots[index].dirty {
                    self.commit_slot(index)?.1
                } else {
                    self.snapshot_bytes(index)?
                };
                let slot = &self.slots[index];
                Outgoing {
                    tokens: slot.cached.len() as u64,
                    owner: slot.owner.clone(),
                    created_ms: slot.created_ms,
                    bytes,
                }
            }
            None => {
                let stored = self
                    .keeper
                    .stored(session, &self.info)?
                    .ok_or_else(|| self.missing(session))?;
                if let Some(reason) = &stored.damaged {
                    return Err(EngineError::Damaged(format!(
                        "conversation {session} is damaged and cannot move: {reason}"
                    )));
                }
                let bytes = self
                    .keeper
                    .stored_file(session)?
                    .ok_or_else(|| self.missing(session))?;
                Outgoing {
                    tokens: stored.tokens,
                    owner: stored.owner,
                    created_ms: stored.created_ms,
                    bytes,
                }
            }
        };
        self.moving.insert(session);
        Ok(outgoing)
    }

    /// Ends a move begun by `begin_move`. With a target (it acknowledged a durable copy) the
    /// conversation is deleted here and forwarded there; without one it simply stays.
    pub(super) fn end_move(
        &mut self,
        session: Uuid,
        target: Option<String>,
    ) -> Result<(), EngineError> {
        if !self.moving.contains(&session) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} is not moving"
            )));
        }
        let Some(target) = target else {
            self.moving.remove(&session);
            return Ok(());
        };
        // The target holds it now. If this commit fails the conversation stays refused here
        // (still "moving") rather than open to turns that would fork it; a restart clears that.
        self.keeper.move_out(session, target)?;
        self.moving.remove(&session);
        if let Some(index) = self.resident_slot(session) {
            self.drop_resident(index);
        }
        self.streams.remove(&session);
        Ok(())
    }

    /// "No such conversation", or where it went if it moved away.
    pub(super) fn missing(&self, session: Uuid) -> EngineError {
        match self.keeper.forwarded_to(session) {
            Ok(Some(target)) => EngineError::Moved { session, target },
            _ => EngineError::NotFound(format!("there is no conversation {session}")),
        }
    }
}
