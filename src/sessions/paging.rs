//! Conversations to and from the page store: a snapshot is saved as a manifest plus the pages
//! the store lacks, and read back by assembling its pages, each checked against its id.
//!
//! These functions know the snapshot format and the store, not llama.cpp: the engine's
//! `persist.rs` hands them a state it read from llama.cpp, and gets back bytes to verify and
//! load.

use std::collections::HashMap;

use uuid::Uuid;

use super::ConversationError;
use crate::engine::{Keep, KeepAs};
use crate::snapshot::llama_state::SequenceState;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::{self, PageId, PageRef};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::store::records::SessionRecord;
use crate::store::{PagedPut, SessionStore, Store, StoreError};

/// A state to save as a manifest and the pages the store lacks, cut against the manifest of
/// `previous_of` (the conversation's own previous version, or the entry a new entry continues):
/// it lets a window cache keep a page whose front it dropped, and its pages for positions
/// below `unchanged_below` are taken as they are.
pub struct Cut<'a> {
    previous_of: Option<Uuid>,
    owner: Option<&'a str>,
    snapshot: &'a Snapshot<'a>,
    state: &'a SequenceState,
    section: &'a [u8],
    unchanged_below: u32,
    turn_states: usize,
}

/// How many earlier turns' ends a named conversation of a recurrent model keeps the running
/// state of (`pages::keep_turn_states`): its previous turn, to answer again (a regenerated
/// reply, an edited last message) without reading the history again, and the one before. Each
/// costs the store one running state while it is kept and no write. Unnamed entries keep
/// none: they are found by their tokens, never gone back in.
pub const TURN_STATES: usize = 2;

impl<'a> Cut<'a> {
    /// `keep`'s state, against the manifest of `previous_of`.
    pub fn of(keep: &'a Keep<'a>, previous_of: Option<Uuid>) -> Cut<'a> {
        Cut {
            previous_of,
            owner: keep.owner.as_deref(),
            snapshot: keep.shell,
            state: keep.state,
            section: keep.section,
            unchanged_below: keep.unchanged_below,
            turn_states: match keep.kind {
                KeepAs::Conversation => TURN_STATES,
                KeepAs::Entry { .. } => 0,
            },
        }
    }

    /// Cuts the state into pages and hands them to `put` (one store transaction), writing
    /// only the pages the store lacks.
    pub fn put<T>(
        &self,
        store: &Store,
        put: impl FnOnce(&PagedPut<'_>) -> Result<T, StoreError>,
    ) -> Result<T, ConversationError> {
        let started = std::time::Instant::now();
        let previous = match self.previous_of {
            Some(id) => store
                .manifest(id)?
                .and_then(|bytes| Manifest::decode(&bytes).ok()),
            None => None,
        };
        // Positions are only known unchanged against a previous manifest.
        let unchanged_below = if previous.is_some() {
            self.unchanged_below
        } else {
            0
        };
        let mut read_page = |id: &PageId| store.page(id).ok().flatten();
        let (manifest, split) = Manifest::split(
            self.snapshot,
            self.state,
            self.section,
            self.owner,
            previous.as_ref(),
            unchanged_below,
            self.turn_states,
            &mut read_page,
        )
        .map_err(|e| ConversationError::Internal(format!("the state cannot be paged: {e}")))?;
        let t_split = started.elapsed();
        let refs = manifest.page_ids();
        let encoded = manifest.encode();
        let paged = PagedPut {
            manifest: &encoded,
            refs: &refs,
            pages: split
                .iter()
                .filter_map(|p| p.bytes.as_deref().map(|bytes| (p.page.id, bytes)))
                .collect(),
        };
        let done = put(&paged)?;
        tracing::debug!(?t_split, put = ?started.elapsed(), "page save phases");
        Ok(done)
    }
}

/// Reads conversation `session`'s manifest and checks its pages where the store holds them,
/// then assembles the normalised state into `state_buf` after `room` bytes (the engine frames
/// it there for llama.cpp without a copy). `None` when the store has no manifest for it. A
/// page that is missing or does not match its id is damage. With `most_tokens`, the state of
/// its latest kept turn end within them (`Manifest::at_turn_end`), `None` when there is none.
pub fn read(
    store: &Store,
    session: Uuid,
    owner: Option<&str>,
    state_buf: &mut Vec<u8>,
    room: usize,
    most_tokens: Option<usize>,
) -> Result<Option<Manifest>, ConversationError> {
    let started = std::time::Instant::now();
    let Some(bytes) = store.manifest(session)? else {
        return Ok(None);
    };
    let manifest = Manifest::decode(&bytes)?;
    let manifest = match most_tokens {
        None => manifest,
        Some(most) => match manifest.at_turn_end(most) {
            Some(earlier) => earlier,
            None => return Ok(None),
        },
    };
    // Only what the state is assembled from: a damaged page of a kept turn end must not make
    // the conversation's own state unreadable, nor be read for nothing.
    let mut ids: Vec<PageId> = manifest.state.state_refs().map(|p| p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    let salt = manifest.salt(owner);
    let (mut assembled, mut t_read) = (Ok(()), None);
    store.with_pages(&ids, &mut |pages| {
        t_read = Some(started.elapsed());
        assembled = check_and_assemble(&manifest, &salt, &ids, pages, state_buf, room);
    })?;
    assembled?;
    tracing::debug!(?t_read, assembled = ?started.elapsed(), "page read phases");
    Ok(Some(manifest))
}

/// Checks each of `pages` (the pages `ids` names) against its reference, then assembles the
/// state they hold into `state_buf` after `room` bytes.
fn check_and_assemble(
    manifest: &Manifest,
    salt: &[u8; 32],
    ids: &[PageId],
    pages: &[Option<&[u8]>],
    state_buf: &mut Vec<u8>,
    room: usize,
) -> Result<(), ConversationError> {
    let started = std::time::Instant::now();
    let refs: HashMap<&PageId, &PageRef> = manifest.state.page_refs().map(|p| (&p.id, p)).collect();
    let mut found: HashMap<&PageId, &[u8]> = HashMap::with_capacity(ids.len());
    for (id, page) in ids.iter().zip(pages) {
        let page = page.ok_or_else(|| damaged("one of its pages is missing from the store"))?;
        // One thread: llama.cpp's OpenMP threads spin on both cores between decodes, and
        // rayon's two made this check slower, not faster (measured: 7.6 ms against 2.3 ms).
        if !refs
            .get(id)
            .is_some_and(|r| pages::page_matches(salt, r, page))
        {
            return Err(damaged("one of its pages does not match its id"));
        }
        found.insert(id, page);
    }
    let checked = started.elapsed();
    // Not cleared: the assembly writes every byte after `room`, and the caller writes the room.
    manifest.assemble_state(&|id| found.get(id).copied(), state_buf, room)?;
    tracing::debug!(?checked, assembled = ?started.elapsed(), "page check and assembly");
    Ok(())
}

/// The conversation's snapshot file as it was saved (pages assembled, encoded, checked against
/// the checksum its record holds), or the whole file a store upgrade kept.
pub fn stored_file(
    store: &Store,
    session: Uuid,
    record: &SessionRecord,
) -> Result<Option<Vec<u8>>, ConversationError> {
    let mut state_buf = Vec::new();
    let file = match read(
        store,
        session,
        record.owner.as_deref(),
        &mut state_buf,
        0,
        None,
    )? {
        Some(manifest) => manifest.snapshot(&state_buf).encode()?,
        None => return Ok(store.legacy_snapshot(session)?),
    };
    if crate::snapshot::checksum(&file).to_hex().as_str() != record.checksum {
        return Err(damaged(
            "its pages assemble to a file other than the one saved",
        ));
    }
    Ok(Some(file))
}

fn damaged(reason: &str) -> ConversationError {
    ConversationError::Damaged(SnapshotError::Corrupt(reason.to_string()).to_string())
}
