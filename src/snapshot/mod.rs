//! The portable snapshot format: one conversation's whole inference state.
//!
//! A snapshot file is `MAGIC` (8 bytes), the body — a `Snapshot` in MessagePack with named
//! fields (rmp-serde), its blobs as `serde_bytes`, the llama.cpp state last — then a blake3
//! hash of everything before it (32 bytes). Files of the first layout (`MAGIC_V1`: the hash
//! before the body) are still read.
//! `docs/format.md` documents it for people. This module knows neither redb nor HTTP; it is the
//! gate every byte passes before the engine may hand it to llama.cpp: `verify` checks the
//! checksum, version, model and layout identity, the tokens, and walks the llama.cpp memory
//! section (`llama_state`).

pub mod llama_file;
pub mod llama_state;
pub mod manifest;
pub mod pages;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::sampling::RngState;
use llama_state::{CacheLayout, ParseOptions, RecurrentLayout, SequenceState, Shape, StateVersion};

/// The first bytes of every snapshot file this build writes: the body, then its hash.
pub const MAGIC: [u8; 8] = *b"KVSNAP\x00\x02";
/// The first layout, written until the hash moved to the end: magic, hash, body.
pub const MAGIC_V1: [u8; 8] = *b"KVSNAP\x00\x01";
/// What every layout's magic starts with; its last byte is the layout.
const MAGIC_PREFIX: [u8; 7] = *b"KVSNAP\x00";

/// Whether `bytes` begin like a kvsnap snapshot file of any layout.
pub fn is_snapshot(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes.starts_with(&MAGIC_PREFIX)
}
/// The envelope version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const HASH_LEN: usize = 32;

/// Which weights wrote the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// blake3 of the GGUF file.
    pub file_hash: String,
    pub architecture: String,
    pub n_layer: u32,
    pub n_embd: i32,
    pub n_vocab: i32,
}

/// The context settings that change the state's shape or its numerics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutIdentity {
    pub flash_attention: bool,
    pub n_ctx_per_sequence: u32,
    pub n_swa: u32,
    pub n_ubatch: u32,
    /// The llama.cpp build (the vendoring crate's version): numerics differ between builds.
    pub llama_build: String,
    /// Whether cells carry llama.cpp's extension (`llama_state::CELL_EXT_BYTES`; M-RoPE
    /// models).
    pub cell_ext: bool,
    /// Per cache (full, then sliding-window): V layout, rotation, per-layer types and rows.
    pub caches: Vec<CacheLayout>,
    /// The compute profile of the build that wrote the state (`crate::compute`); `None` when
    /// unknown (llama.cpp's own files, snapshots from before it was recorded). Deliberately not
    /// compared by `LiveIdentity::difference`: another profile's state is valid here, only its
    /// continuation is not bit-exact (`LiveIdentity::exactness` says so).
    #[serde(default)]
    pub compute_profile: Option<String>,
    /// The recurrent section's shape, for recurrent and hybrid models (after the caches).
    /// Left out of the encoding when absent, so the identities and page salts of models
    /// without one stay byte for byte what they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrent: Option<RecurrentLayout>,
}

impl LayoutIdentity {
    /// Whether its caches hold V (not with multi-head latent attention).
    pub fn has_v(&self) -> bool {
        self.caches.iter().all(|c| c.has_v)
    }

    /// The shape of the memory sections this layout describes.
    pub fn shape(&self) -> Shape {
        Shape {
            n_caches: self.caches.len(),
            cell_ext: self.cell_ext,
            has_v: self.has_v(),
            recurrent: self.recurrent.is_some(),
        }
    }

    /// How to parse a section of this layout in `version`, with at most `max_cells` cells.
    pub fn parse_options(&self, version: StateVersion, max_cells: u32) -> ParseOptions {
        ParseOptions {
            version,
            shape: self.shape(),
            max_cells,
        }
    }

    /// Checks a parsed section against this layout; the error names the first difference.
    pub fn check(&self, state: &SequenceState) -> Result<(), String> {
        state.check_layout(&self.caches, self.recurrent.as_ref())
    }

    /// The largest normalised state one sequence can hand out: every cache full (the
    /// sliding-window cache holds its window and one micro-batch more), every cell's rows and
    /// metadata. An upper bound, for sizing buffers ahead of use.
    pub fn largest_state_bytes(&self) -> usize {
        let n_ctx = self.n_ctx_per_sequence as usize;
        self.caches
            .iter()
            .enumerate()
            .map(|(index, cache)| {
                let cells = if index > 0 && self.n_swa > 0 {
                    n_ctx.min((self.n_swa + self.n_ubatch) as usize)
                } else {
                    n_ctx
                };
                let rows: u64 = cache
                    .layers
                    .iter()
                    .map(|l| l.k_row_size + l.v_cell_size)
                    .sum();
                llama_state::cache_section_bytes(
                    cells,
                    cache.layers.len(),
                    rows as usize,
                    self.cell_ext,
                )
            })
            .sum::<usize>()
            + self.recurrent.as_ref().map_or(0, |r| r.section_bytes())
    }
}

/// The sampling settings of the conversation's last turn (plain values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSampling {
    pub temperature: f32,
    pub top_k: u64,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub penalty_last_n: u64,
}

/// One conversation, whole. Decoding borrows the llama.cpp state from the file's bytes rather
/// than copying megabytes (`Cow`); built from a live sequence it owns them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot<'a> {
    pub format_version: u32,
    pub model: ModelIdentity,
    pub layout: LayoutIdentity,
    /// Tokens whose KV the state holds, at positions `0..tokens.len()`.
    pub tokens: Vec<i32>,
    pub sampling: Option<StoredSampling>,
    /// The conversation's random stream: where the next draw comes from.
    pub rng: RngState,
    /// A token sampled and sent but not yet decoded, if the turn ended that way.
    pub pending_token: Option<i32>,
    pub created_unix_ms: u64,
    /// llama.cpp's memory section for the sequence, normalised to one stream per cache.
    /// Last on purpose: `encode_parts` writes every field before it and borrows it whole.
    #[serde(borrow, with = "serde_bytes")]
    pub sequence_state: Cow<'a, [u8]>,
}

/// A snapshot file in three pieces that concatenate to it: the head (magic and every field up
/// to the state's length), the state itself, borrowed rather than copied, and the hash. A save
/// hands these pieces to the store as they are: megabytes copied into one buffer first would
/// be a whole extra pass.
pub struct EncodedSnapshot<'s> {
    pub head: Vec<u8>,
    /// The state, itself in pieces: a save borrows each cache's stream from llama.cpp's buffer.
    pub state: Vec<&'s [u8]>,
    pub trailer: [u8; HASH_LEN],
    /// blake3 of the whole file (what a store records), from the same pass as the trailer.
    pub file_checksum: blake3::Hash,
}

impl EncodedSnapshot<'_> {
    pub fn pieces(&self) -> Vec<&[u8]> {
        let mut pieces = Vec::with_capacity(self.state.len() + 2);
        pieces.push(self.head.as_slice());
        pieces.extend_from_slice(&self.state);
        pieces.push(&self.trailer);
        pieces
    }

    pub fn len(&self) -> usize {
        self.pieces().iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The file in one buffer, for callers that send or return it.
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces().concat()
    }
}

/// Why a snapshot cannot be restored. `Incompatible` means "fine, but not for this server";
/// the others mean the bytes are damaged or are not a snapshot.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("this is not a kvsnap snapshot (its first bytes are not the snapshot magic)")]
    NotASnapshot,
    #[error("the snapshot is damaged: {0}")]
    Corrupt(String),
    #[error("the snapshot has format version {0}; this kvsnap reads version {FORMAT_VERSION}")]
    UnsupportedVersion(u32),
    #[error(
        "the snapshot file has layout {0}; this kvsnap reads layouts 1 and 2 (was it written by a newer kvsnap?)"
    )]
    UnknownLayout(u8),
    #[error("the llama.cpp state is {0} bytes; a snapshot holds at most 4 GiB")]
    TooLarge(u64),
    #[error("the snapshot does not fit this server: {0}")]
    Incompatible(String),
}

impl SnapshotError {
    /// Whether the bytes are damaged, rather than sound but not for this server (another
    /// model, layout or file version: refused, and a stored one is not marked damaged).
    pub fn is_damage(&self) -> bool {
        !matches!(
            self,
            SnapshotError::Incompatible(_)
                | SnapshotError::UnsupportedVersion(_)
                | SnapshotError::UnknownLayout(_)
                | SnapshotError::TooLarge(_)
        )
    }
}

/// What the running server is, for `verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveIdentity {
    pub model: ModelIdentity,
    pub layout: LayoutIdentity,
}

impl LiveIdentity {
    /// Why a state written by `model` with `layout` cannot be restored here, as a sentence
    /// about "it" (the state) and `here` (this server, the target…); `None` when it can.
    /// The context size is not compared: a state fits any context that holds its tokens.
    pub fn difference(
        &self,
        model: &ModelIdentity,
        layout: &LayoutIdentity,
        here: &str,
    ) -> Option<String> {
        let (mine, theirs) = (model, &self.model);
        if mine.file_hash != theirs.file_hash {
            return Some(format!(
                "it was written by another model ({} {}, hash {}…) than {here} runs ({} {}, \
                 hash {}…)",
                mine.architecture,
                mine.n_layer,
                short(&mine.file_hash),
                theirs.architecture,
                theirs.n_layer,
                short(&theirs.file_hash)
            ));
        }
        if mine != theirs {
            return Some(format!(
                "its model description differs from the one {here} has"
            ));
        }
        let (mine, theirs) = (layout, &self.layout);
        if mine.flash_attention != theirs.flash_attention {
            return Some(format!(
                "it was written with flash attention {}, {here} runs it {}",
                on_off(mine.flash_attention),
                on_off(theirs.flash_attention)
            ));
        }
        if mine.llama_build != theirs.llama_build {
            return Some(format!(
                "it was written by llama.cpp build {}, {here} runs {}",
                mine.llama_build, theirs.llama_build
            ));
        }
        if mine.n_ubatch != theirs.n_ubatch || mine.n_swa != theirs.n_swa {
            return Some(format!(
                "it was written with ubatch {} and window {}, {here} uses {} and {}",
                mine.n_ubatch, mine.n_swa, theirs.n_ubatch, theirs.n_swa
            ));
        }
        if mine.cell_ext != theirs.cell_ext {
            return Some(format!(
                "its cells carry a different extension than the model {here} runs"
            ));
        }
        llama_state::recurrent_difference(mine.recurrent.as_ref(), theirs.recurrent.as_ref())
            .or_else(|| llama_state::layout_difference(&mine.caches, &theirs.caches))
    }
}

impl Snapshot<'_> {
    /// The file bytes in one buffer.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        Ok(self.encode_parts()?.to_vec())
    }

    /// The file as pieces (see `EncodedSnapshot`), hashed in one pass: blake3 over magic, body
    /// and state gives the trailer; the same hasher fed the trailer gives the file's checksum.
    pub fn encode_parts(&self) -> Result<EncodedSnapshot<'_>, SnapshotError> {
        let shell = Snapshot {
            sequence_state: Cow::Borrowed(&[]),
            model: self.model.clone(),
            layout: self.layout.clone(),
            tokens: self.tokens.clone(),
            sampling: self.sampling.clone(),
            ..*self
        };
        shell.encode_around(vec![&self.sequence_state])
    }

    /// `encode_parts` for a snapshot built without its state (`sequence_state` empty) around
    /// the state given as pieces that concatenate to it, which the file borrows: a save
    /// encodes straight from llama.cpp's buffer.
    /// Fails only for a state MessagePack cannot hold (4 GiB or more).
    pub fn encode_around<'s>(
        &self,
        state: Vec<&'s [u8]>,
    ) -> Result<EncodedSnapshot<'s>, SnapshotError> {
        assert!(
            self.sequence_state.is_empty(),
            "encode_around takes the state separately"
        );
        let shell = self;
        let mut head = Vec::with_capacity(MAGIC.len() + 4096 + 4 * self.tokens.len());
        head.extend_from_slice(&MAGIC);
        rmp_serde::encode::write_named(&mut head, &shell).expect("a Snapshot always serializes");
        // rmp-serde writes fields in declaration order, so the shell ends with its empty state,
        // a zero-length bin (`c4 00`). The real state's bin header takes its place and the
        // state follows: the same bytes `write_named` would give with the state inside.
        const EMPTY_BIN: [u8; 2] = [0xc4, 0x00];
        assert!(
            head.ends_with(&EMPTY_BIN),
            "the state must be the last field of a Snapshot"
        );
        head.truncate(head.len() - EMPTY_BIN.len());
        let state_len: usize = state.iter().map(|p| p.len()).sum();
        let state_len =
            u32::try_from(state_len).map_err(|_| SnapshotError::TooLarge(state_len as u64))?;
        rmp::encode::write_bin_len(&mut head, state_len).expect("writing to a Vec cannot fail");

        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        // One thread: measured on saves here, rayon's two were no faster (its pool wakes from
        // idle for every save) while restores, hashing one large buffer, gain from them.
        for piece in &state {
            hasher.update(piece);
        }
        let trailer = *hasher.finalize().as_bytes();
        hasher.update(&trailer);
        Ok(EncodedSnapshot {
            head,
            state,
            trailer,
            file_checksum: hasher.finalize(),
        })
    }

    /// Where the llama.cpp state lies in `file` when it was decoded from it (borrowed), so
    /// a restore can frame it there instead of copying it.
    pub fn state_range_in(&self, file: &[u8]) -> Option<std::ops::Range<usize>> {
        let Cow::Borrowed(state) = &self.sequence_state else {
            return None;
        };
        let at = state.as_ptr().addr().checked_sub(file.as_ptr().addr())?;
        (at + state.len() <= file.len()).then_some(at..at + state.len())
    }

    /// Checks magic and checksum, then reads the body. Reads both layouts (`MAGIC`,
    /// `MAGIC_V1`).
    pub fn decode(bytes: &[u8]) -> Result<Snapshot<'_>, SnapshotError> {
        Ok(Self::decode_layouts(bytes)?.0)
    }

    /// `decode`, also returning blake3 of the whole file (what a store records). For the
    /// current layout it comes from the same pass that checks the file's own hash.
    pub fn decode_with_checksum(
        bytes: &[u8],
    ) -> Result<(Snapshot<'_>, blake3::Hash), SnapshotError> {
        let (snapshot, file_checksum) = Self::decode_layouts(bytes)?;
        Ok((snapshot, file_checksum.unwrap_or_else(|| checksum(bytes))))
    }

    /// `decode`, with the whole file's checksum when checking the file gave it for free.
    fn decode_layouts(bytes: &[u8]) -> Result<(Snapshot<'_>, Option<blake3::Hash>), SnapshotError> {
        let (body, file_checksum) = match bytes.get(..MAGIC.len()) {
            Some(magic) if magic == MAGIC => {
                let (body, file_checksum) = checked_body(bytes)?;
                (body, Some(file_checksum))
            }
            Some(magic) if magic == MAGIC_V1 => (checked_body_v1(bytes)?, None),
            // Not damage: a file from a newer kvsnap must not get a conversation marked damaged.
            Some(magic) if is_snapshot(bytes) => {
                return Err(SnapshotError::UnknownLayout(magic[MAGIC.len() - 1]));
            }
            _ => return Err(SnapshotError::NotASnapshot),
        };
        let snapshot: Snapshot = rmp_serde::from_slice(body)
            .map_err(|e| SnapshotError::Corrupt(format!("its body cannot be read: {e}")))?;
        if snapshot.format_version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(snapshot.format_version));
        }
        Ok((snapshot, file_checksum))
    }

    /// Everything that must hold before the state may reach llama.cpp. Returns the parsed
    /// memory section, ready to be rewritten for the live stream count.
    pub fn verify(&self, live: &LiveIdentity) -> Result<SequenceState, SnapshotError> {
        if let Some(difference) = live.difference(&self.model, &self.layout, "this server") {
            return Err(SnapshotError::Incompatible(difference));
        }
        let theirs = &live.layout;
        // A conversation that filled its sequence (generation stops there) fits an equal one.
        let limit = theirs.n_ctx_per_sequence as usize;
        if self.tokens.len() > limit {
            return Err(SnapshotError::Incompatible(format!(
                "its history has {} tokens but a conversation here holds at most {}",
                self.tokens.len(),
                limit
            )));
        }
        let n_vocab = self.model.n_vocab;
        if let Some(bad) = self
            .tokens
            .iter()
            .chain(self.pending_token.iter())
            .find(|&&t| t < 0 || t >= n_vocab)
        {
            return Err(SnapshotError::Corrupt(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        if self.tokens.is_empty() {
            return Err(SnapshotError::Corrupt("it holds no tokens".into()));
        }
        let options = theirs.parse_options(StateVersion::V4, theirs.n_ctx_per_sequence);
        let state = llama_state::parse(&self.sequence_state, options)
            .map_err(|e| SnapshotError::Corrupt(format!("its llama.cpp state: {e}")))?;
        // The bytes must be what the envelope says they are (which equals the live layout).
        theirs.check(&state).map_err(|difference| {
            SnapshotError::Corrupt(format!(
                "its llama.cpp state contradicts its description: {difference}"
            ))
        })?;
        check_positions(&state, self.tokens.len(), theirs.n_swa)?;
        Ok(state)
    }
}

/// The body of a file in the current layout (magic, body, hash of both), once the hash matches.
/// Also returns blake3 of the whole file: the same hasher, fed the hash, gives it.
fn checked_body(bytes: &[u8]) -> Result<(&[u8], blake3::Hash), SnapshotError> {
    if bytes.len() < MAGIC.len() + HASH_LEN {
        return Err(SnapshotError::Corrupt(
            "it is truncated before its checksum".into(),
        ));
    }
    let (hashed, hash) = bytes.split_at(bytes.len() - HASH_LEN);
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(hashed);
    if hasher.finalize().as_bytes() != hash {
        return Err(SnapshotError::Corrupt(
            "its checksum does not match its content (truncated or altered)".into(),
        ));
    }
    hasher.update(hash);
    Ok((&hashed[MAGIC.len()..], hasher.finalize()))
}

/// The body of a file in the first layout (magic, hash of the body, body).
fn checked_body_v1(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    if bytes.len() < MAGIC_V1.len() + HASH_LEN {
        return Err(SnapshotError::Corrupt(
            "it is truncated before its checksum".into(),
        ));
    }
    let (hash, body) = bytes[MAGIC_V1.len()..].split_at(HASH_LEN);
    if checksum(body).as_bytes() != hash {
        return Err(SnapshotError::Corrupt(
            "its checksum does not match its content (truncated or altered)".into(),
        ));
    }
    Ok(body)
}

/// The full cache must hold exactly positions `0..n`; a window cache a subset of them; a
/// recurrent state must have read exactly up to position `n - 1`.
fn check_positions(state: &SequenceState, n: usize, n_swa: u32) -> Result<(), SnapshotError> {
    if let Some(recurrent) = &state.recurrent
        && recurrent.position != (n as i32).checked_sub(1)
    {
        return Err(SnapshotError::Corrupt(format!(
            "its recurrent state stands at position {:?}, its history ends at {}",
            recurrent.position,
            n as i32 - 1
        )));
    }
    for (index, cache) in state.caches.iter().enumerate() {
        let mut seen = vec![false; n];
        for &pos in &cache.positions {
            let slot = seen.get_mut(pos as usize).ok_or_else(|| {
                SnapshotError::Corrupt(format!(
                    "cache {index} holds position {pos} beyond its {n} tokens"
                ))
            })?;
            if *slot {
                return Err(SnapshotError::Corrupt(format!(
                    "cache {index} holds position {pos} twice"
                )));
            }
            *slot = true;
        }
        let is_window_cache = index > 0 && n_swa > 0;
        if !is_window_cache && cache.positions.len() != n {
            return Err(SnapshotError::Corrupt(format!(
                "cache {index} holds {} cells for {n} tokens",
                cache.positions.len()
            )));
        }
    }
    Ok(())
}

/// blake3 over both cores: snapshots are megabytes, and hashing is on the save and restore path.
pub fn checksum(bytes: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update_rayon(bytes);
    hasher.finalize()
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}

#[cfg(test)]
mod tests;
