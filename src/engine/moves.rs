//! Holding a conversation while its bytes travel: moved to another instance, or replaced by
//! an upload, as the engine sees it.
//!
//! `begin_move` marks the conversation held and hands out a resident one's snapshot: from then
//! on a turn or any other change to it is refused with 409 (retry shortly), so it cannot fork
//! while its copy travels. `end_move` either finishes the move — `sessions/` deleted it from
//! the store and wrote a forwarding record, in one transaction, and the resident copy goes —
//! or gives the conversation back. The transfer itself is `crate::migrate`'s job; the engine
//! never waits on the network or the store.
//!
//! `hold` and `release` do the same around a replacement or a delete: `sessions/` verifies and
//! stores the new version (or deletes it) off this thread while the conversation is held.

use uuid::Uuid;

use super::worker::{Held, Worker};
use super::{EngineError, HoldFor, Outgoing, Requester};

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

    /// Holds `session` for a move: refused to everyone until `end_move`, whole here. A
    /// resident conversation is handed out as its snapshot, committed to the store first if it
    /// has unsaved changes (so a crash mid-move loses nothing); `None` for one only stored,
    /// which `sessions/` reads from the store itself.
    pub(super) fn begin_move(&mut self, session: Uuid) -> Result<Option<Outgoing>, EngineError> {
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
                Some(Outgoing {
                    tokens: slot.cached.len() as u64,
                    owner: slot.owner.clone(),
                    created_ms: slot.created_ms,
                    bytes,
                })
            }
            None => None,
        };
        self.held.insert(session, Held::Moving);
        Ok(outgoing)
    }

    /// Ends a move begun by `begin_move`. `moved`: the store forwards the conversation now
    /// (`sessions/` committed that), so its resident copy goes; otherwise it simply stays.
    pub(super) fn end_move(&mut self, session: Uuid, moved: bool) -> Result<(), EngineError> {
        if self.held.get(&session) != Some(&Held::Moving) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} is not moving"
            )));
        }
        self.held.remove(&session);
        if moved {
            if let Some(index) = self.resident_slot(session) {
                self.drop_resident(index);
            }
            self.streams.remove(&session);
        }
        Ok(())
    }

    /// Holds `session` while `sessions/` replaces or deletes its stored version
    /// (`Held::Replacing`): refused while a turn of it runs or waits. For an upload, a resident
    /// copy with unsaved changes is saved first, so nothing is lost if the upload is refused;
    /// a conversation sent back may have been forwarded from here. Returns whether it is
    /// resident.
    pub(super) fn hold(
        &mut self,
        session: Uuid,
        requester: &Requester,
        purpose: HoldFor,
    ) -> Result<bool, EngineError> {
        if purpose != HoldFor::Return || self.held.contains_key(&session) {
            self.check_here(session)?;
        }
        let verb = match purpose {
            HoldFor::Delete => "delete",
            HoldFor::Upload | HoldFor::Return => "replace",
        };
        if self.pending.iter().any(|p| p.session == Some(session)) {
            return Err(EngineError::Conflict(format!(
                "conversation {session} has a turn waiting; {verb} it when the turn ends"
            )));
        }
        // A save queued before (a slot whose turn ended is no longer dirty) must commit before
        // the store's version is replaced: committed after, it would be cut against the new
        // version as if it continued it.
        self.wait_saved(Some(session));
        let resident = self.resident_slot(session);
        if let Some(index) = resident {
            if !requester.may_use(&self.slots[index].owner) {
                return Err(self.missing(session));
            }
            if self.slots[index].busy {
                return Err(EngineError::Conflict(format!(
                    "conversation {session} is generating; {verb} it when its turn ends"
                )));
            }
            if self.slots[index].dirty && purpose != HoldFor::Delete {
                self.commit_slot(index)?;
            }
        }
        self.held.insert(session, Held::Replacing);
        Ok(resident.is_some())
    }

    /// Ends a `hold`. `replaced`: the store holds a new version (or none), so the resident
    /// copy and the random stream of the old one go (the next turn restores the new one).
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
