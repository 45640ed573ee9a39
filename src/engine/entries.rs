//! Unnamed entries on the engine's side: the state of a request that names no conversation
//! is handed to the keeper when its turn ends (queued, so the reply does not wait: nobody was
//! promised it), and a later request of the same key that starts with an entry's tokens gets
//! the entry restored into its sequence instead of reading those tokens again.
//!
//! A restored entry continues exactly as the sequence that kept it would have: the same bytes
//! and the same cell layout (`lay_out_as_restored` keeps every sequence past the window laid
//! out as a restore lays it out). Whatever goes wrong with one, the request evaluates its
//! prompt instead; an entry that does not restore is dropped.

use uuid::Uuid;

use super::keeper::{FoundEntry, KeepAs, KeepError, SaveJob};
use super::slots::{common_prefix, unnamed_reuse};
use super::state_io;
use super::worker::{Pending, Worker};
use crate::sampling::RngState;

impl Worker<'_> {
    /// Before an anonymous request takes slot `index`: the slot's own state, when it has not
    /// been kept yet and the request does not simply extend it, is kept; then the kept entry
    /// of the request's key that holds the most of its prompt is restored, when it holds more
    /// than the slot's cache shares. Returns whether the slot's cache is the request's own.
    pub(super) fn take_for_unnamed(&mut self, index: usize, request: &Pending, own: bool) -> bool {
        let cached = self.slots[index].cached.len();
        // What of the sequence the request may keep (`Worker::begin` keeps the same).
        let usable = if own {
            unnamed_reuse(
                &self.slots[index].cached,
                &request.tokens,
                self.info.n_swa as usize,
            )
        } else {
            0
        };
        if usable < cached {
            if own {
                self.log_divergence(index, &request.tokens, usable);
            }
            self.keep_unnamed(index);
        }
        if !request.cache_prompt {
            return own;
        }
        let found = self.find_entry(index, request, false);
        match found {
            Some(found) if found.tokens > usable => {
                self.restore_entry(index, found, request.requester.tenant())
            }
            _ => own,
        }
    }

    /// Where a prompt that names no conversation leaves the state of the sequence it came to,
    /// at debug level: when a frontend resends a history in another form (an edited reply, other
    /// white space), this says which tokens differ, so the re-read can be explained.
    fn log_divergence(&self, index: usize, prompt: &[i32], usable: usize) {
        let held = &self.slots[index].cached;
        let shared = common_prefix(held, prompt);
        let next = |tokens: &[i32]| tokens[shared..tokens.len().min(shared + 8)].to_vec();
        tracing::debug!(
            slot = index,
            held = held.len(),
            prompt = prompt.len(),
            shared,
            reused = usable,
            held_next = ?next(held),
            prompt_next = ?next(prompt),
            "the prompt does not continue this sequence's state"
        );
    }

    /// Before a new named conversation's first turn takes slot `index`: the checkpoint of the
    /// requester's key holding the most of its prompt, restored; it computes what a cold start
    /// would. Returns whether the slot holds one.
    pub(super) fn take_checkpoint(&mut self, index: usize, request: &Pending) -> bool {
        if !request.cache_prompt {
            return false;
        }
        let Some(found) = self.find_entry(index, request, true) else {
            return false;
        };
        let restored = self.restore_entry(index, found, request.requester.tenant());
        // The conversation's saves speak of its own manifest, which it does not have yet.
        self.slots[index].entry = None;
        self.slots[index].saved_prefix = 0;
        restored
    }

    /// The kept entry of the request's key holding the most of its prompt, if entries are kept.
    fn find_entry(
        &mut self,
        index: usize,
        request: &Pending,
        checkpoints_only: bool,
    ) -> Option<FoundEntry> {
        if !self.keeper.keeps_entries() {
            return None;
        }
        let identity = self.info.snapshot_identity().ok()?;
        let tenant = request.requester.tenant();
        match self.keeper.find_entry(
            tenant.as_deref(),
            identity,
            &request.tokens,
            checkpoints_only,
        ) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, slot = index, "could not look for a kept prefix; the prompt is evaluated");
                None
            }
        }
    }

    /// Restores `found` into slot `index`; on failure the slot is left empty (and the entry
    /// dropped when it is damaged or cannot fit). Returns whether the slot holds it.
    fn restore_entry(&mut self, index: usize, found: FoundEntry, owner: Option<String>) -> bool {
        // The slot's own state, if kept above, was copied out already: it may be replaced.
        let started = std::time::Instant::now();
        self.slots[index].checkpoint = false;
        match self.restore_inner(index, found.entry, owner.as_deref(), None) {
            Ok(_) => {
                metrics::counter!("kvsnap_prefix_hits_total").increment(1);
                metrics::counter!("kvsnap_prefix_tokens_restored_total")
                    .increment(found.tokens as u64);
                metrics::histogram!("kvsnap_snapshot_restore_seconds")
                    .record(started.elapsed().as_secs_f64());
                let slot = &mut self.slots[index];
                slot.entry = Some(found.entry);
                slot.checkpoint = found.checkpoint;
                slot.dirty = false;
                true
            }
            Err(error) => {
                self.empty_slot(index);
                self.slots[index].entry = None;
                match &error {
                    super::EngineError::Damaged(reason)
                    | super::EngineError::Incompatible(reason) => {
                        self.keeper.drop_entry(found.entry, reason);
                    }
                    _ => {
                        tracing::warn!(%error, entry = %found.entry, "could not restore a kept prefix; the prompt is evaluated")
                    }
                }
                false
            }
        }
    }

    /// Hands the anonymous state slot `index` holds to the keeper as a new unnamed entry,
    /// queued, when it has changes not kept yet and entries are kept. Failures are logged:
    /// an entry is a cache, and nobody waits for it.
    pub(super) fn keep_unnamed(&mut self, index: usize) {
        let slot = &self.slots[index];
        if slot.session.is_some() || !slot.dirty {
            return;
        }
        let tenant = slot.tenant.clone();
        if self.keep_entry(index, tenant, false) {
            self.slots[index].dirty = false;
        }
    }

    /// Keeps what slot `index` holds now, in the middle of a canonical prompt at a grid
    /// boundary, as a checkpoint entry of the key whose prompt it is (a named conversation's
    /// owner).
    pub(super) fn keep_checkpoint(&mut self, index: usize) {
        let slot = &self.slots[index];
        let owner = match slot.session {
            Some(_) => slot.owner.clone(),
            None => slot.tenant.clone(),
        };
        self.keep_entry(index, owner, true);
    }

    /// Queues slot `index`'s state as a new entry of `owner`, continuing the entry the slot
    /// was restored from or last kept as; returns whether it was queued. A named conversation's
    /// slot stays its own: its saves speak of its own manifest, not of the entry.
    fn keep_entry(&mut self, index: usize, owner: Option<String>, checkpoint: bool) -> bool {
        if self.slots[index].cached.is_empty() || !self.keeper.keeps_entries() {
            return false;
        }
        let mut raw = self.raw_pool.pop().unwrap_or_default();
        // An anonymous turn draws from its own seed or fresh entropy: no stream to keep.
        let (shell, state) = match self.take_state(index, RngState::from_seed(0), &mut raw) {
            Ok(taken) => taken,
            Err(error) => {
                self.raw_pool.push(raw);
                tracing::warn!(%error, slot = index, "could not keep an unnamed state");
                return false;
            }
        };
        let slot = &self.slots[index];
        let entry = Uuid::new_v4();
        let job = SaveJob {
            session: entry,
            kind: KeepAs::Entry {
                continues: slot.entry,
                checkpoint,
            },
            owner,
            created_ms: slot.created_ms,
            shell,
            state,
            raw,
            section_at: state_io::HEADER,
            // Taken only against the manifest of `continues` (`paging::Cut`).
            unchanged_below: slot.saved_prefix as u32,
            then: Box::new(|_: &Result<(), KeepError>| {}),
        };
        if self.keeper.queue(job).is_err() {
            tracing::warn!(
                slot = index,
                "the writer has stopped; an unnamed state is not kept"
            );
            return false;
        }
        let slot = &mut self.slots[index];
        if slot.session.is_none() {
            slot.entry = Some(entry);
            slot.saved_prefix = slot.cached.len();
        }
        true
    }
}
