//! The portable snapshot format: one conversation's whole inference state.
//!
//! A snapshot file is `MAGIC` (8 bytes), a blake3 hash of the body (32 bytes), then the body:
//! a `Snapshot` in MessagePack with named fields (rmp-serde), its blobs as `serde_bytes`.
//! `docs/format.md` documents it for people. This module knows neither redb nor HTTP; it is the
//! gate every byte passes before the engine may hand it to llama.cpp: `verify` checks the
//! checksum, version, model and layout identity, the tokens, and walks the llama.cpp memory
//! section (`llama_state`).

pub mod llama_file;
pub mod llama_state;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::sampling::RngState;
use llama_state::{CacheLayout, ParseOptions, SequenceState, StateVersion};

/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"KVSNAP\x00\x01";
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
    /// Whether cells carry an 8-byte extension (M-RoPE models).
    pub cell_ext: bool,
    /// Per cache (full, then sliding-window): V layout, rotation, per-layer types and rows.
    pub caches: Vec<CacheLayout>,
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
    /// llama.cpp's memory section for the sequence, normalised to one stream per cache.
    #[serde(borrow, with = "serde_bytes")]
    pub sequence_state: Cow<'a, [u8]>,
    pub created_unix_ms: u64,
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
    #[error("the snapshot does not fit this server: {0}")]
    Incompatible(String),
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
        llama_state::layout_difference(&mine.caches, &theirs.caches)
    }
}

impl Snapshot<'_> {
    /// The file bytes: magic, checksum, body — written into one buffer, the hash patched in.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// `encode` into `out`, replacing its contents (a caller may reuse one buffer).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let header = MAGIC.len() + HASH_LEN;
        out.clear();
        out.reserve(header + self.sequence_state.len() + 4096);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0; HASH_LEN]);
        rmp_serde::encode::write_named(out, self).expect("a Snapshot always serializes");
        let hash = checksum(&out[header..]);
        out[MAGIC.len()..header].copy_from_slice(hash.as_bytes());
    }

    /// Checks magic and checksum, then reads the body.
    pub fn decode(bytes: &[u8]) -> Result<Snapshot<'_>, SnapshotError> {
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot);
        }
        if bytes.len() < MAGIC.len() + HASH_LEN {
            return Err(SnapshotError::Corrupt(
                "it is truncated before its checksum".into(),
            ));
        }
        let (hash, body) = bytes[MAGIC.len()..].split_at(HASH_LEN);
        if checksum(body).as_bytes() != hash {
            return Err(SnapshotError::Corrupt(
                "its checksum does not match its content (truncated or altered)".into(),
            ));
        }
        let snapshot: Snapshot = rmp_serde::from_slice(body)
            .map_err(|e| SnapshotError::Corrupt(format!("its body cannot be read: {e}")))?;
        if snapshot.format_version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(snapshot.format_version));
        }
        Ok(snapshot)
    }

    /// Everything that must hold before the state may reach llama.cpp. Returns the parsed
    /// memory section, ready to be rewritten for the live stream count.
    pub fn verify(&self, live: &LiveIdentity) -> Result<SequenceState, SnapshotError> {
        if let Some(difference) = live.difference(&self.model, &self.layout, "this server") {
            return Err(SnapshotError::Incompatible(difference));
        }
        let theirs = &live.layout;
        let limit = theirs.n_ctx_per_sequence as usize;
        if self.tokens.len() >= limit {
            return Err(SnapshotError::Incompatible(format!(
                "its history has {} tokens but a conversation here holds at most {}",
                self.tokens.len(),
                limit - 1
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
        let options = ParseOptions {
            version: StateVersion::V4,
            n_caches: theirs.caches.len(),
            cell_ext: theirs.cell_ext,
            max_cells: theirs.n_ctx_per_sequence,
        };
        let state = llama_state::parse(&self.sequence_state, options)
            .map_err(|e| SnapshotError::Corrupt(format!("its llama.cpp state: {e}")))?;
        // The bytes must be what the envelope says they are (which equals the live layout).
        state.check_layout(&theirs.caches).map_err(|difference| {
            SnapshotError::Corrupt(format!(
                "its llama.cpp state contradicts its description: {difference}"
            ))
        })?;
        check_positions(&state, self.tokens.len(), theirs.n_swa)?;
        Ok(state)
    }
}

/// The full cache must hold exactly positions `0..n`; a window cache a subset of them.
fn check_positions(state: &SequenceState, n: usize, n_swa: u32) -> Result<(), SnapshotError> {
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
