//! Holding a conversation while its bytes travel: moved to another instance, or replaced by
//! an upload, as the engine sees it.
//!
//! `begin_move` hands out the conversation's snapshot and marks it held: from then on a turn
//! or any other change to it is refused with 409 (retry shortly), so it cannot fork while its
//! copy travels. `end_move` either finishes the move — the conversation is deleted here and a
//! forwarding record written, in one store transaction — or gives the conversation back. The
//! transfer itself is `crate::migrate`'s job; the engine never waits on the network.
//!
//! `hold` and `release` do the same around a replacement: `sessions/` verifies and stores the
//! new version off this thread while the conversation is held.

use uuid::Uuid;

use super::worker::Worker;
use super::{EngineError, Outgoing, Requester};

/// Why a conversation is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Its snapshot is on its way to another instance.
    Moving,
    /// A new version of it is being verified and stored.
    Replacing,
}

impl Worker<'_> {
    /// Refuses work on a conversation that is held (409) or has moved away (its new home).
    pub(super) fn check_here(&self, session: Uuid) -> Result<(), EngineError> {
        match self.held.get(&session) {
            Some(Held::Moving) => {
                return Err(EngineError::Conflict(format!(
                    "conversation {session} is moving to another instance; retry in a moment"
                )));
            }
            Some(Held::Replacing) => {
                return Err(EngineError::Conflict(format!(
                    "conversation {session} is being replaced by an upload; retry in a moment"
                )));
            }
            None => {}
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
        self.held.insert(session, Held::Moving);
        Ok(outgoing)
    }

    /// Ends a move begun by `begin_move`. With a target (it acknowledged a durable copy) the
    /// conversation is deleted here and forwarded there; without one it simply stays.
    pub(super) fn end_move(
        &mut self,
        session: Uuid,
        target: Option<String>,
    ) -> Result<(), EngineError> {
        if self.held.get(&session) != Some(&Held::Moving) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} is not moving"
            )));
        }
        let Some(target) = target else {
            self.held.remove(&session);
            return Ok(());
        };
        // The target holds it now. If this commit fails the conversation stays refused here
        // (still "moving") rather than open to turns that would fork it; a restart clears that.
        self.keeper.move_out(session, target)?;
        self.held.remove(&session);
        if let Some(index) = self.resident_slot(session) {
            self.drop_resident(index);
        }
        self.streams.remove(&session);
        Ok(())
    }

    /// Holds `session` for a replacement (`Held::Replacing`): refused while a turn of it runs
    /// or waits; a resident copy with unsaved changes is saved first, so nothing is lost if
    /// the new version is refused. `returning`: another instance sends it back, so a forward
    /// to it does not refuse.
    pub(super) fn hold(
        &mut self,
        session: Uuid,
        requester: &Requester,
        returning: bool,
    ) -> Result<(), EngineError> {
        if !returning || self.held.contains_key(&session) {
            self.check_here(session)?;
        }
        if self.pending.iter().any(|p| p.session == Some(session)) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} has a turn waiting; replace it when the turn ends"
            )));
        }
        if let Some(index) = self.resident_slot(session) {
            if !requester.may_use(&self.slots[index].owner) {
                return Err(self.missing(session));
            }
            if self.slots[index].busy {
                return Err(EngineError::Conflict(format!(
                    "conversation {session} is generating; replace it when its turn ends"
                )));
            }
            if self.slots[index].dirty {
                self.commit_slot(index)?;
            }
        }
        self.held.insert(session, Held::Replacing);
        Ok(())
    }

    /// Ends a `hold`. `replaced`: the store holds a new version, so the resident copy and the
    /// random stream of the old one go (the next turn restores the new one).
    pub(super) fn release(&mut self, session: Uuid, replaced: bool) {
        if self.held.get(&session) != Some(&Held::Replacing) {
            return;
        }
        self.held.remove(&session);
        if replaced {
            if let Some(index) = self.resident_slot(session) {
                self.drop_resident(index);
            }
            self.streams.remove(&session);
        }
    }

    /// "No such conversation", or where it went if it moved away.
    pub(super) fn missing(&self, session: Uuid) -> EngineError {
        match self.keeper.forwarded_to(session) {
            Ok(Some(target)) => EngineError::Moved { session, target },
            _ => EngineError::NotFound(format!("there is no conversation {session}")),
        }
    }
}
