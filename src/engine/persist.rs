//! A sequence's state out as a snapshot, and verified state back in: saves, restores, a
//! resident conversation looked at or checked out as bytes, llama-server's slot files.
//!
//! Where the bytes go is the `Keeper`'s business (`sessions/`): the engine hands a state out,
//! to be saved now (`Keep`) or off its thread (`SaveJob`), and loads what the keeper read back
//! only after verifying it against the live context.

use std::borrow::Cow;
use std::path::Path;

use uuid::Uuid;

use super::scratch::Scratch;
use super::state_io;
use super::worker::Worker;
use super::{
    AfterSave, EngineError, Keep, KeepAs, KeepError, Requester, Residency, SaveJob, Saved,
    SessionInfo, SlotFile, SlotInfo,
};
use crate::clock::now_ms;
use crate::sampling::RngState;
use crate::snapshot::llama_file;
use crate::snapshot::llama_state::{self, SequenceState, StateVersion};
use crate::snapshot::{EncodedSnapshot, FORMAT_VERSION, LiveIdentity, Snapshot, SnapshotError};

impl From<SnapshotError> for EngineError {
    fn from(error: SnapshotError) -> Self {
        if error.is_damage() {
            EngineError::Damaged(error.to_string())
        } else {
            EngineError::Incompatible(error.to_string())
        }
    }
}

/// The compute profile snapshots written here record.
fn live_profile(live: Option<&LiveIdentity>) -> Option<String> {
    live.and_then(|l| l.layout.compute_profile.clone())
}

fn unknown(session: Uuid) -> EngineError {
    EngineError::NotFound(format!("there is no conversation {session}"))
}

impl Worker<'_> {
    fn live(&self) -> Result<&LiveIdentity, EngineError> {
        self.info.snapshot_identity()
    }

    /// The slot holding `session`, if it is resident.
    pub(super) fn resident_slot(&self, session: Uuid) -> Option<usize> {
        self.slots.iter().position(|s| s.session == Some(session))
    }

    /// The stored conversation `session`, checked against `requester`.
    pub(super) fn stored_record(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<SessionInfo>, EngineError> {
        let stored = self.keeper.stored(session, &self.info)?;
        match stored {
            Some(r) if !requester.may_use(&r.owner) => Err(unknown(session)),
            other => Ok(other),
        }
    }

    /// Copies the slot's llama.cpp state into `raw` and walks it; its memory section is
    /// `state_io::section(raw)`. The caller checks the slot is not empty:
    /// llama.cpp crashes saving one (#14434).
    fn read_state(&self, index: usize, raw: &mut Vec<u8>) -> Result<SequenceState, EngineError> {
        let live = self.live()?;
        let raw =
            state_io::read_sequence(&self.ctx, self.slots[index].seq_id, raw).ok_or_else(|| {
                EngineError::Internal("llama.cpp returned no state for the sequence".into())
            })?;
        let options = live
            .layout
            .parse_options(StateVersion::V4, live.layout.n_ctx_per_sequence);
        llama_state::parse(raw, options).map_err(|e| {
            EngineError::Internal(format!("llama.cpp wrote a state we cannot read: {e}"))
        })
    }

    /// Takes the slot's state now into `raw` and parses it; returns the conversation,
    /// the snapshot around it with its state left out (`encode_around` or paging takes the
    /// state from `scratch.raw`), and the parse.
    fn take_slot(
        &self,
        index: usize,
        raw: &mut Vec<u8>,
    ) -> Result<(Uuid, Snapshot<'static>, SequenceState), EngineError> {
        let session = self.slots[index].session.ok_or_else(|| {
            EngineError::Internal("a slot without a conversation was asked to save".into())
        })?;
        if self.slots[index].cached.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "conversation {session} holds no tokens yet"
            )));
        }
        let rng = self
            .streams
            .get(&session)
            .copied()
            .unwrap_or_else(|| RngState::from_seed(0));
        let (shell, state) = self.take_state(index, rng, raw)?;
        Ok((session, shell, state))
    }

    /// Takes the slot's state now into `raw` and parses it; returns the snapshot around it
    /// (its state left out) with `rng` as its random stream, and the parse.
    pub(super) fn take_state(
        &self,
        index: usize,
        rng: RngState,
        raw: &mut Vec<u8>,
    ) -> Result<(Snapshot<'static>, SequenceState), EngineError> {
        let live = self.live()?;
        let slot = &self.slots[index];
        if slot.cached.is_empty() {
            // llama.cpp crashes saving an empty sequence (#14434); there is nothing to keep.
            return Err(EngineError::InvalidInput(
                "the sequence holds no tokens yet".into(),
            ));
        }
        let state = self.read_state(index, raw)?;
        let shell = Snapshot {
            format_version: FORMAT_VERSION,
            model: live.model.clone(),
            layout: live.layout.clone(),
            tokens: slot.cached.clone(),
            sampling: None,
            rng,
            pending_token: None,
            created_unix_ms: now_ms(),
            sequence_state: Cow::Borrowed(&[]),
        };
        Ok((shell, state))
    }

    /// Takes the slot's state now and encodes it as a snapshot file whose state pieces borrow
    /// `scratch.raw`: normalised to one stream per cache without being copied.
    fn snapshot_slot<'s>(
        &self,
        index: usize,
        scratch: &'s mut Scratch,
    ) -> Result<(Uuid, EncodedSnapshot<'s>), EngineError> {
        let (session, shell, state) = self.take_slot(index, &mut scratch.raw)?;
        let scratch: &'s Scratch = scratch;
        let pieces = state.normalised_pieces(state_io::section(&scratch.raw));
        Ok((session, shell.encode_around(pieces)?))
    }

    /// The slot's conversation as a snapshot file, taken now.
    pub(super) fn snapshot_bytes(&mut self, index: usize) -> Result<Vec<u8>, EngineError> {
        self.with_scratch(|worker, scratch| {
            let (_, encoded) = worker.snapshot_slot(index, scratch)?;
            Ok(encoded.to_vec())
        })
    }

    /// Saves the slot's conversation and commits it; the slot is clean afterwards.
    pub(super) fn save_slot(&mut self, index: usize) -> Result<SessionInfo, EngineError> {
        self.with_scratch(|worker, scratch| Ok(worker.commit_from(index, scratch)?.0))
    }

    /// `save_slot`, also returning the snapshot file it committed.
    pub(super) fn commit_slot(
        &mut self,
        index: usize,
    ) -> Result<(SessionInfo, Vec<u8>), EngineError> {
        self.with_scratch(|worker, scratch| {
            let (info, file) = worker.commit_from(index, scratch)?;
            Ok((info, file.to_vec()))
        })
    }

    /// Runs `work` with the reusable buffers lent out of `self`.
    fn with_scratch<T>(&mut self, work: impl FnOnce(&mut Self, &mut Scratch) -> T) -> T {
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = work(self, &mut scratch);
        self.scratch = scratch.recycled();
        result
    }

    /// Takes the slot's snapshot and commits it as a manifest and the pages the store lacks;
    /// returns the committed file, which borrows `scratch`.
    fn commit_from<'s>(
        &mut self,
        index: usize,
        scratch: &'s mut Scratch,
    ) -> Result<(SessionInfo, EncodedSnapshot<'s>), EngineError> {
        // A queued save of this conversation must not commit after this newer one.
        if let Some(session) = self.slots[index].session {
            self.wait_saved(Some(session));
        }
        let (session, shell, state) = self.take_slot(index, &mut scratch.raw)?;
        let scratch: &'s Scratch = scratch;
        let section = state_io::section(&scratch.raw);
        // The file a download gives: the keeper records its size and checksum.
        let file = shell.encode_around(state.normalised_pieces(section))?;
        let slot = &self.slots[index];
        self.keeper.save(Keep {
            session,
            kind: KeepAs::Conversation,
            owner: slot.owner.clone(),
            created_ms: slot.created_ms,
            shell: &shell,
            state: &state,
            section,
            unchanged_below: slot.saved_prefix as u32,
            file: Some(&file),
        })?;
        self.slots[index].saved_prefix = self.slots[index].cached.len();
        self.slots[index].dirty = false;
        Ok((self.describe_slot(index, file.len() as u64), file))
    }

    /// Copies the slot's state out and hands its save to the writer thread, so decoding goes
    /// on while it is paged and committed; `then` runs on the writer once it committed or
    /// failed. The slot counts as saved from now on; a failure marks it dirty again
    /// (`saved`). Anything that reads the stored version first waits for it (`wait_saved`).
    pub(super) fn queue_save(&mut self, index: usize, then: AfterSave) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        let mut raw = self.raw_pool.pop().unwrap_or_default();
        let (session, shell, state) = match self.take_slot(index, &mut raw) {
            Ok(taken) => taken,
            Err(error) => {
                self.raw_pool.push(raw);
                return Err(error);
            }
        };
        let slot = &self.slots[index];
        let job = SaveJob {
            session,
            kind: KeepAs::Conversation,
            owner: slot.owner.clone(),
            created_ms: slot.created_ms,
            shell,
            state,
            raw,
            section_at: state_io::HEADER,
            unchanged_below: slot.saved_prefix as u32,
            then,
        };
        if let Err(job) = self.keeper.queue(job) {
            (job.then)(&Err(KeepError::Failed(
                "the server is shutting down".into(),
            )));
            return Err(EngineError::ShuttingDown);
        }
        self.slots[index].saved_prefix = self.slots[index].cached.len();
        self.slots[index].dirty = false;
        tracing::debug!(%session, copied_out = ?started.elapsed(), "save queued");
        Ok(())
    }

    /// Takes in one finished save: its buffer back, and on failure the conversation marked
    /// unsaved again (while it is still resident) so the next save retries it.
    fn saved(&mut self, saved: Saved) {
        if let Err(error) = &saved.result {
            tracing::error!(session = %saved.session, %error, "a save failed; the conversation stays unsaved");
            let index = self.resident_slot(saved.session).or_else(|| {
                self.slots
                    .iter()
                    .position(|s| s.entry == Some(saved.session))
            });
            if let Some(index) = index {
                self.slots[index].dirty = true;
                // The store holds an older version than the one handed out.
                self.slots[index].saved_prefix = 0;
                self.slots[index].entry = None;
            }
        }
        if saved.raw.capacity() <= super::scratch::KEEP_BYTES && self.raw_pool.len() < 4 {
            self.raw_pool.push(saved.raw);
        }
    }

    /// Takes in every save finished so far, without waiting.
    pub(super) fn take_saved(&mut self) {
        for saved in self.keeper.finished() {
            self.saved(saved);
        }
    }

    /// Waits until every queued save of `session` (all of them with `None`) finished, so
    /// what the keeper holds is its latest version.
    pub(super) fn wait_saved(&mut self, session: Option<Uuid>) {
        for saved in self.keeper.wait(session) {
            self.saved(saved);
        }
    }

    /// Saves every resident conversation with unsaved changes (shutdown, eviction).
    pub(super) fn save_dirty(&mut self) {
        self.wait_saved(None);
        for index in 0..self.slots.len() {
            if self.slots[index].dirty
                && self.slots[index].session.is_some()
                && let Err(error) = self.save_slot(index)
            {
                tracing::error!(%error, slot = index, "could not save a conversation");
            }
        }
        for index in 0..self.slots.len() {
            self.keep_unnamed(index);
        }
        self.wait_saved(None);
    }

    /// Reads `session` from the store into slot `index`. On damage the record is marked and
    /// kept; on any failure the slot is left empty.
    pub(super) fn restore(
        &mut self,
        index: usize,
        session: Uuid,
        stored: &SessionInfo,
    ) -> Result<usize, EngineError> {
        if let Some(reason) = &stored.damaged {
            return Err(EngineError::Damaged(format!(
                "the stored conversation {session} is damaged: {reason}"
            )));
        }
        let started = std::time::Instant::now();
        let result = self.restore_inner(index, session, stored.owner.as_deref(), None);
        match result {
            Ok((tokens, rng)) => {
                self.streams.insert(session, rng);
                metrics::histogram!("kvsnap_snapshot_restore_seconds")
                    .record(started.elapsed().as_secs_f64());
                let slot = &mut self.slots[index];
                slot.session = Some(session);
                slot.owner = stored.owner.clone();
                slot.created_ms = stored.created_ms;
                slot.dirty = false;
                Ok(tokens)
            }
            Err(error) => {
                self.empty_slot(index);
                self.slots[index].session = None;
                if let EngineError::Damaged(reason) = &error {
                    tracing::warn!(%session, %reason, "stored conversation is damaged; kept, marked");
                    self.keeper.mark_damaged(session, reason);
                }
                Err(error)
            }
        }
    }

    /// Loads stored state `session` (a conversation or an unnamed entry) into slot `index`,
    /// or with `most_tokens` the state it kept at its latest turn end within them
    /// (`Keeper::read`); returns how many tokens it holds and its random stream.
    pub(super) fn restore_inner(
        &mut self,
        index: usize,
        session: Uuid,
        owner: Option<&str>,
        most_tokens: Option<usize>,
    ) -> Result<(usize, RngState), EngineError> {
        self.with_scratch(|worker, scratch| {
            let started = std::time::Instant::now();
            let Scratch { raw, frame } = scratch;
            // The state assembled into `frame`, each piece checked against its content
            // address, with room in front for llama.cpp's header.
            let manifest = worker
                .keeper
                .read(session, owner, frame, state_io::HEADER, most_tokens)?
                .ok_or_else(|| unknown(session))?;
            let read = started.elapsed();
            let in_frame = state_io::HEADER..frame.len();
            let state = manifest
                .snapshot(&frame[in_frame.clone()])
                .verify(worker.live()?)?;
            tracing::debug!(?read, verified = ?started.elapsed(), "restore phases");
            let n_tokens = manifest.tokens.len();
            let seq = worker.empty_slot(index);
            let n_stream = worker.info.parallel as u32;
            // Framed where it lies; `raw` is spare room should it not be normalised.
            let loaded = state_io::write_sequence_from_file(
                &mut worker.ctx,
                seq,
                &state,
                frame,
                in_frame,
                n_stream,
                raw,
            );
            worker.finish_load(index, loaded, manifest.tokens)?;
            tracing::debug!(loaded = ?started.elapsed(), "restore phases");
            Ok((n_tokens, manifest.rng))
        })
    }

    /// A recurrent state cannot be cut back to a shorter history, so slot `index`'s named
    /// conversation goes back instead to the latest turn end it kept within `prompt`'s first
    /// `most` tokens, read from the store: what it held there, byte for byte, so the prompt's
    /// rest is evaluated as when the conversation first went on from there. Returns the tokens
    /// it then holds; 0 when it kept no such turn end (the prompt is then evaluated from the
    /// start: exact, not cheap), with the slot left to be emptied.
    pub(super) fn go_back(&mut self, index: usize, prompt: &[i32], most: usize) -> usize {
        let Some(session) = self.slots[index].session else {
            return 0;
        };
        // The store must hold the conversation's last save before it is read. With `--persist
        // turn` that save committed before the last reply ended, so this waits only when a turn
        // was cut off (a client hanging up) just before, and then for that one save.
        self.wait_saved(Some(session));
        let owner = self.slots[index].owner.clone();
        match self.restore_inner(index, session, owner.as_deref(), Some(most)) {
            Ok((tokens, _)) if prompt.starts_with(&self.slots[index].cached) => {
                metrics::counter!("kvsnap_turn_returns_total").increment(1);
                tracing::debug!(%session, tokens, "went back to a kept turn end");
                tokens
            }
            Ok(_) => 0,
            Err(EngineError::NotFound(_)) => 0,
            Err(error) => {
                tracing::warn!(%session, %error, "could not go back to a kept turn end; the prompt is evaluated");
                0
            }
        }
    }

    /// Empties slot `index`'s sequence (for a load, or after one failed); returns its id.
    pub(super) fn empty_slot(&mut self, index: usize) -> i32 {
        let seq = self.slots[index].seq_id;
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        self.slots[index].cached.clear();
        self.slots[index].saved_prefix = 0;
        seq
    }

    /// After a load into slot `index`: its `cached` becomes `tokens`, or, if llama.cpp refused
    /// the state, the sequence is emptied again (a failed load may leave cells behind, #27068).
    fn finish_load(
        &mut self,
        index: usize,
        loaded: bool,
        tokens: Vec<i32>,
    ) -> Result<(), EngineError> {
        if !loaded {
            let seq = self.slots[index].seq_id;
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            return Err(EngineError::Internal(
                "llama.cpp refused a state that passed every check".into(),
            ));
        }
        // What was just loaded is what the keeper holds.
        self.slots[index].saved_prefix = tokens.len();
        self.slots[index].cached = tokens;
        Ok(())
    }

    /// A resident conversation: it continues here, and every snapshot of it taken from now on
    /// (a save, a download, a move) records this build's profile.
    fn describe_slot(&self, index: usize, bytes: u64) -> SessionInfo {
        let slot = &self.slots[index];
        let profile = live_profile(self.info.live.as_ref().ok());
        SessionInfo {
            session_id: slot.session.unwrap_or_default(),
            state: "resident",
            tokens: slot.cached.len() as u64,
            bytes,
            model: self.info.id.clone(),
            created_ms: slot.created_ms,
            last_used_ms: slot.last_used_ms,
            damaged: None,
            checksum: None,
            owner: slot.owner.clone(),
            exactness: SessionInfo::exactness_here(profile.as_deref(), &self.info),
        }
    }

    /// `session` as its sequence holds it, if it is resident (and `requester`'s).
    pub(super) fn look(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<Residency>, EngineError> {
        Ok(self.owned_slot(session, requester)?.map(|index| Residency {
            info: self.describe_slot(index, 0),
            dirty: self.slots[index].dirty,
        }))
    }

    pub(super) fn resident(&self) -> Vec<SessionInfo> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].session.is_some())
            .map(|i| self.describe_slot(i, 0))
            .collect()
    }

    /// Which slot a command about `session` may act on, after the owner check.
    fn owned_slot(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<usize>, EngineError> {
        match self.resident_slot(session) {
            Some(index) if !requester.may_use(&self.slots[index].owner) => Err(unknown(session)),
            other => Ok(other),
        }
    }

    /// Empties slot `index` and forgets whose it was (its conversation lives on in the store).
    pub(super) fn drop_resident(&mut self, index: usize) {
        let seq = self.slots[index].seq_id as u32;
        let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
        let slot = &mut self.slots[index];
        slot.cached.clear();
        slot.saved_prefix = 0;
        slot.session = None;
        slot.owner = None;
        slot.dirty = false;
    }

    /// Saves a resident conversation now (`None`: it is not resident).
    pub(super) fn save_now(
        &mut self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<SessionInfo>, EngineError> {
        match self.owned_slot(session, requester)? {
            Some(index) if self.slots[index].busy => Err(EngineError::Conflict(format!(
                "conversation {session} is generating; save it when its turn ends"
            ))),
            Some(index) => self.save_slot(index).map(Some),
            None => Ok(None),
        }
    }

    /// A resident conversation's snapshot file, taken now (`None`: it is not resident).
    pub(super) fn check_out(
        &mut self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<Vec<u8>>, EngineError> {
        match self.owned_slot(session, requester)? {
            Some(index) if self.slots[index].busy => Err(EngineError::Conflict(format!(
                "conversation {session} is generating; export it when its turn ends"
            ))),
            Some(index) => self.snapshot_bytes(index).map(Some),
            None => Ok(None),
        }
    }

    /// llama-server's `/slots` view: one entry per sequence.
    pub(super) fn slots_info(&self) -> Vec<SlotInfo> {
        self.slots
            .iter()
            .enumerate()
            .map(|(id, slot)| SlotInfo {
                id,
                n_ctx: self.info.n_ctx_per_sequence,
                is_processing: slot.busy,
                n_tokens: slot.cached.len(),
                session_id: slot.session,
                owner: if slot.session.is_some() {
                    slot.owner.clone()
                } else {
                    slot.tenant.clone()
                },
            })
            .collect()
    }

    fn idle_slot(&self, id: usize) -> Result<usize, EngineError> {
        let slot = self.slots.get(id).ok_or_else(|| {
            EngineError::NotFound(format!(
                "there is no slot {id}; slots are 0..{}",
                self.slots.len()
            ))
        })?;
        if slot.busy {
            return Err(EngineError::Conflict(format!(
                "slot {id} is processing a request"
            )));
        }
        Ok(id)
    }

    /// `/slots/{id}?action=save`: the slot's sequence as a `ggsq` v4 file, fsync'd.
    pub(super) fn slot_save(&mut self, id: usize, path: &Path) -> Result<SlotFile, EngineError> {
        let started = std::time::Instant::now();
        let index = self.idle_slot(id)?;
        let slot = &self.slots[index];
        if slot.cached.is_empty() {
            return Err(EngineError::InvalidInput(format!(
                "slot {id} holds no tokens to save"
            )));
        }
        let section = self.with_scratch(|worker, scratch| {
            let state = worker.read_state(index, &mut scratch.raw)?;
            Ok::<_, EngineError>(
                state
                    .normalised_pieces(state_io::section(&scratch.raw))
                    .concat(),
            )
        })?;
        let slot = &self.slots[index];
        let file = llama_file::write_seq_file(4, &slot.cached, &section);
        slot_files::write(path, &file)?;
        Ok(SlotFile {
            tokens: slot.cached.len(),
            bytes: file.len(),
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// `/slots/{id}?action=restore`: a `ggsq` file, verified, into the slot. A conversation
    /// that held the slot is saved to the store first; the slot's content is then anonymous.
    pub(super) fn slot_restore(
        &mut self,
        id: usize,
        path: &Path,
        requester: &Requester,
    ) -> Result<SlotFile, EngineError> {
        let started = std::time::Instant::now();
        let index = self.idle_slot(id)?;
        let bytes = slot_files::read(path)?;
        let snapshot = llama_file::into_snapshot(&bytes, self.live()?, now_ms())?;
        let state = snapshot.verify(self.live()?)?;
        if self.slots[index].dirty && self.slots[index].session.is_some() {
            self.save_slot(index)?;
        }
        self.drop_resident(index);
        let seq = self.empty_slot(index);
        let n_stream = self.info.parallel as u32;
        let loaded = self.with_scratch(|worker, scratch| {
            state_io::write_sequence(
                &mut worker.ctx,
                seq,
                &state,
                &snapshot.sequence_state,
                n_stream,
                &mut scratch.frame,
            )
        });
        self.finish_load(index, loaded, snapshot.tokens.clone())?;
        // A slot file's tokens cannot be checked against its KV without evaluating them: the
        // cache it brings serves only the key that restored it.
        self.slots[index].tenant = requester.tenant();
        Ok(SlotFile {
            tokens: snapshot.tokens.len(),
            bytes: bytes.len(),
            millis: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// `/slots/{id}?action=erase`: empties the slot (a conversation in it stays in the store).
    pub(super) fn slot_erase(&mut self, id: usize) -> Result<usize, EngineError> {
        let index = self.idle_slot(id)?;
        if self.slots[index].dirty && self.slots[index].session.is_some() {
            self.save_slot(index)?;
        }
        let erased = self.slots[index].cached.len();
        self.drop_resident(index);
        Ok(erased)
    }
}

/// Reading and writing slot files without ever following a symbolic link.
mod slot_files {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    use super::EngineError;

    /// Largest slot file read: a full context of a mid-size model fits.
    const MAX_BYTES: u64 = 1 << 30;

    fn refuse(path: &Path, error: std::io::Error) -> EngineError {
        if error.raw_os_error() == Some(libc::ELOOP) {
            return EngineError::InvalidInput(format!(
                "{} is a symbolic link; slot files are never followed out of the slot folder",
                path.display()
            ));
        }
        if error.kind() == std::io::ErrorKind::NotFound {
            return EngineError::NotFound(format!("there is no slot file {}", path.display()));
        }
        EngineError::Internal(format!("slot file {}: {error}", path.display()))
    }

    pub(super) fn write(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| refuse(path, e))?;
        file.write_all(bytes).map_err(|e| refuse(path, e))?;
        file.sync_all().map_err(|e| refuse(path, e))
    }

    pub(super) fn read(path: &Path) -> Result<Vec<u8>, EngineError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| refuse(path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| refuse(path, e))?;
        Ok(bytes)
    }
}
