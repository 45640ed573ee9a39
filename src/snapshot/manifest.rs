//! A conversation in the page store: everything its snapshot holds except the KV rows, which
//! live in content-addressed pages (`pages`), named here by id.
//!
//! Encoded as `MANIFEST_MAGIC`, the MessagePack body (named fields), then blake3 of both. A
//! manifest and its pages give back the snapshot file exactly (`Manifest::snapshot` around the
//! assembled state, encoded): downloads, exports and migrations still send that file.

use serde::{Deserialize, Serialize};

use super::llama_state::{self, SequenceState, StateVersion};
use super::pages::{self, PageError, PageId, PagedState, SplitPage};
use super::{LayoutIdentity, ModelIdentity, Snapshot, SnapshotError, StoredSampling};
use crate::sampling::RngState;

/// Pages with their bytes, each page once.
pub type PageBytes = Vec<(PageId, Vec<u8>)>;

/// The first bytes of every manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"KVSNAPM\x01";
const HASH_LEN: usize = 32;

/// Everything of a snapshot but its rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub model: ModelIdentity,
    pub layout: LayoutIdentity,
    pub tokens: Vec<i32>,
    pub sampling: Option<StoredSampling>,
    pub rng: RngState,
    pub pending_token: Option<i32>,
    pub created_unix_ms: u64,
    pub state: PagedState,
}

impl From<PageError> for SnapshotError {
    fn from(error: PageError) -> Self {
        SnapshotError::Corrupt(format!("its pages: {error}"))
    }
}

impl Manifest {
    /// Cuts `snapshot`'s state into pages. `state` is the state's parse and `section` the bytes
    /// it was parsed from (the snapshot's own, or llama.cpp's buffer: either works). `previous`
    /// is the manifest the conversation had, so unchanged pages are not written again, and
    /// positions below `unchanged_below` are known to be unchanged since it; `read_page` gives
    /// a stored page's bytes (see `pages::split`). A recurrent state keeps up to
    /// `turn_states` states of earlier turns' ends beside it (`pages::keep_turn_states`).
    #[allow(clippy::too_many_arguments)]
    pub fn split(
        snapshot: &Snapshot<'_>,
        state: &SequenceState,
        section: &[u8],
        owner: Option<&str>,
        previous: Option<&Manifest>,
        unchanged_below: u32,
        turn_states: usize,
        read_page: &mut dyn FnMut(&PageId) -> Option<Vec<u8>>,
    ) -> Result<(Manifest, Vec<SplitPage>), SnapshotError> {
        let salt = pages::page_salt(&snapshot.model, &snapshot.layout, owner);
        // A previous manifest of another identity or owner shares no pages with this one.
        let previous = previous
            .filter(|p| pages::page_salt(&p.model, &p.layout, owner) == salt)
            .map(|p| &p.state);
        let (mut paged, split) = pages::split(
            state,
            section,
            snapshot.layout.cell_ext,
            &salt,
            previous,
            unchanged_below,
            read_page,
        )?;
        pages::keep_turn_states(&mut paged, previous, unchanged_below, turn_states);
        let manifest = Manifest {
            format_version: snapshot.format_version,
            model: snapshot.model.clone(),
            layout: snapshot.layout.clone(),
            tokens: snapshot.tokens.clone(),
            sampling: snapshot.sampling.clone(),
            rng: snapshot.rng,
            pending_token: snapshot.pending_token,
            created_unix_ms: snapshot.created_unix_ms,
            state: paged,
        };
        Ok((manifest, split))
    }

    /// A whole snapshot file as its manifest and every page with its bytes (each once), after
    /// checking the file's checksum and walking its llama.cpp state against its own layout.
    /// What moves between instances and what a store upgrade cuts old files into.
    pub fn cut_file(file: &[u8], owner: Option<&str>) -> Result<(Manifest, PageBytes), String> {
        let snapshot = Snapshot::decode(file).map_err(|e| e.to_string())?;
        let layout = &snapshot.layout;
        let options = layout.parse_options(StateVersion::V4, layout.n_ctx_per_sequence.max(1));
        let state = llama_state::parse(&snapshot.sequence_state, options)
            .map_err(|e| format!("its llama.cpp state: {e}"))?;
        layout.check(&state)?;
        let (manifest, split) = Manifest::split(
            &snapshot,
            &state,
            &snapshot.sequence_state,
            owner,
            None,
            0,
            0,
            &mut |_| None,
        )
        .map_err(|e| e.to_string())?;
        let pages = split
            .into_iter()
            .filter_map(|p| p.bytes.map(|bytes| (p.page.id, bytes)))
            .collect();
        Ok((manifest, pages))
    }

    /// The salt of this conversation's pages, for checking a page against its id.
    pub fn salt(&self, owner: Option<&str>) -> [u8; 32] {
        pages::page_salt(&self.model, &self.layout, owner)
    }

    /// Writes the normalised state the pages hold into `out` from byte `at` on, over what lies
    /// there (`pages::assemble`); `page` gives each page's bytes, already checked.
    pub fn assemble_state<'p>(
        &self,
        page: &dyn Fn(&PageId) -> Option<&'p [u8]>,
        out: &mut Vec<u8>,
        at: usize,
    ) -> Result<(), SnapshotError> {
        pages::assemble(
            &self.state,
            &self.layout.caches,
            self.layout.recurrent.as_ref(),
            self.layout.cell_ext,
            page,
            out,
            at,
        )?;
        Ok(())
    }

    /// The conversation as it stood at its latest kept turn end within its first `most`
    /// tokens (its last save, or `PagedState::at_turn_end`): a recurrent state cannot be cut
    /// back, so this is
    /// how it goes back. Its random stream is the conversation's own, where it stands now, as
    /// a conversation whose cache is cut back keeps drawing from its stream. `None` when no
    /// kept turn end lies within them, or when a window cache dropped cells that turn end
    /// still needs.
    pub fn at_turn_end(&self, most: usize) -> Option<Manifest> {
        if self.layout.n_swa > 0 || self.state.recurrent.is_none() {
            return None;
        }
        // Its last save already stands within them (a conversation saved less often than each
        // turn, with --persist evict, or whose last turn was not saved).
        if self.tokens.len() <= most {
            return Some(self.clone());
        }
        let (state, tokens) = self.state.at_turn_end(most.min(self.tokens.len()))?;
        Some(Manifest {
            tokens: self.tokens[..tokens].to_vec(),
            pending_token: None,
            state,
            ..self.clone()
        })
    }

    /// The snapshot this manifest stands for, around its assembled state.
    pub fn snapshot<'a>(&self, state: &'a [u8]) -> Snapshot<'a> {
        Snapshot {
            format_version: self.format_version,
            model: self.model.clone(),
            layout: self.layout.clone(),
            tokens: self.tokens.clone(),
            sampling: self.sampling.clone(),
            rng: self.rng,
            pending_token: self.pending_token,
            created_unix_ms: self.created_unix_ms,
            sequence_state: std::borrow::Cow::Borrowed(state),
        }
    }

    /// Every page id referenced, once per reference (what the store counts).
    pub fn page_ids(&self) -> Vec<PageId> {
        self.state.page_ids().copied().collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = MANIFEST_MAGIC.to_vec();
        rmp_serde::encode::write_named(&mut out, self).expect("a Manifest always serializes");
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        if bytes.len() < MANIFEST_MAGIC.len() + HASH_LEN || !bytes.starts_with(&MANIFEST_MAGIC[..7])
        {
            return Err(SnapshotError::Corrupt(
                "its manifest is truncated or not a manifest".into(),
            ));
        }
        // Not damage: a manifest from a newer kvsnap.
        if bytes[7] != MANIFEST_MAGIC[7] {
            return Err(SnapshotError::UnknownLayout(bytes[7]));
        }
        let (hashed, hash) = bytes.split_at(bytes.len() - HASH_LEN);
        if blake3::hash(hashed).as_bytes() != hash {
            return Err(SnapshotError::Corrupt(
                "its manifest does not match its checksum".into(),
            ));
        }
        let manifest: Manifest = rmp_serde::from_slice(&hashed[MANIFEST_MAGIC.len()..])
            .map_err(|e| SnapshotError::Corrupt(format!("its manifest cannot be read: {e}")))?;
        if manifest.format_version != super::FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(manifest.format_version));
        }
        Ok(manifest)
    }
}
