//! llama.cpp's own state files: per-sequence `ggsq` and whole-context `ggsn`.
//!
//! `ggsq`: `u32 magic "ggsq"`, `u32 version`, `u32 n`, `n` words of tokens, then the memory
//! section (`llama_state`). llama.cpp's `llama_state_seq_save_file` writes the tokens plainly;
//! llama-server's slot save (format v3 seen here) wraps them as `-1, 1, count, tokens…, 0`.
//! `ggsn`: `u32 magic "ggsn"`, `u32 version`, `u32 n`, tokens, then the whole context's state.

use super::llama_state::{self, ParseError, ParseOptions, StateVersion};
use super::{FORMAT_VERSION, LayoutIdentity, LiveIdentity, Snapshot, SnapshotError};
use crate::sampling::RngState;

pub const SEQ_MAGIC: u32 = 0x6767_7371; // "ggsq"
pub const CONTEXT_MAGIC: u32 = 0x6767_736e; // "ggsn"

/// The header of a `ggsq` file.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqFile {
    pub version: u32,
    pub tokens: Vec<i32>,
    /// Whether the token list was wrapped as llama-server writes it.
    pub wrapped: bool,
    /// Where the memory section starts.
    pub section_offset: usize,
}

impl SeqFile {
    /// The memory-section version this file's version implies.
    pub fn state_version(&self) -> Option<StateVersion> {
        match self.version {
            3 => Some(StateVersion::V3),
            4 => Some(StateVersion::V4),
            _ => None,
        }
    }
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The magic number a file starts with, if it has four bytes.
pub fn magic(bytes: &[u8]) -> Option<u32> {
    word(bytes, 0)
}

/// Reads a `ggsq` header; every count is checked against the file's length.
pub fn parse_seq_file(bytes: &[u8]) -> Result<SeqFile, ParseError> {
    let err = |m: &str| Err(ParseError(m.to_string()));
    if magic(bytes) != Some(SEQ_MAGIC) {
        return err("this is not a llama.cpp sequence state file (no ggsq magic)");
    }
    let Some(version) = word(bytes, 4) else {
        return err("the file ends inside its header");
    };
    let Some(count) = word(bytes, 8) else {
        return err("the file ends inside its header");
    };
    let words_end = 12usize
        .checked_add(4usize.saturating_mul(count as usize))
        .filter(|&end| end <= bytes.len());
    let Some(words_end) = words_end else {
        return Err(ParseError(format!(
            "the header announces {count} tokens but the file has only {} bytes",
            bytes.len()
        )));
    };
    let words: Vec<i32> = bytes[12..words_end]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    // llama-server's wrapping: -1, 1, count, the tokens, 0.
    let (tokens, wrapped) = match words.as_slice() {
        [-1, 1, inner, rest @ ..] if *inner >= 0 && rest.len() == *inner as usize + 1 => {
            (rest[..*inner as usize].to_vec(), true)
        }
        _ => (words, false),
    };
    Ok(SeqFile {
        version,
        tokens,
        wrapped,
        section_offset: words_end,
    })
}

/// A `ggsq` file (v3 as llama-server writes it, or v4) as a snapshot for the running model
/// `live`: v3 gains v4's fields, V is rearranged to this context's layout, and the layout is
/// checked. A `ggsq` file names no model: only its shape (caches, layers, K/V types, row sizes)
/// can be checked against the running one. It starts a random stream of its own.
pub fn into_snapshot(
    bytes: &[u8],
    live: &LiveIdentity,
    created_unix_ms: u64,
) -> Result<Snapshot<'static>, SnapshotError> {
    let malformed = |what: &str, e: ParseError| {
        SnapshotError::Corrupt(format!("the llama.cpp file's {what} is malformed: {e}"))
    };
    let unfit = |e: &dyn std::fmt::Display| {
        SnapshotError::Incompatible(format!("the llama.cpp file cannot match this model: {e}"))
    };
    let file = parse_seq_file(bytes).map_err(|e| malformed("header", e))?;
    let version = file.state_version().ok_or_else(|| {
        SnapshotError::Incompatible(format!(
            "llama.cpp sequence file version {} cannot be read; versions 3 and 4 can",
            file.version
        ))
    })?;
    let section = &bytes[file.section_offset..];
    let options = live
        .layout
        .parse_options(version, live.layout.n_ctx_per_sequence);
    let state = llama_state::parse(section, options).map_err(|e| malformed("memory section", e))?;
    let rotations: Vec<(u32, u32)> = live
        .layout
        .caches
        .iter()
        .map(|c| (c.n_rot_k, c.n_rot_v))
        .collect();
    // Files written with flash attention on store V by row; translate to this context's
    // V layout (a rearrangement of elements), then check everything else as usual.
    let v_trans: Vec<bool> = live.layout.caches.iter().map(|c| c.v_trans).collect();
    let translated = state
        .to_v4_with_v_layout(section, &rotations, &v_trans)
        .map_err(|e| unfit(&e))?;
    let options = ParseOptions {
        version: StateVersion::V4,
        ..options
    };
    let state =
        llama_state::parse(&translated, options).map_err(|e| malformed("memory section", e))?;
    live.layout
        .check(&state)
        .map_err(|difference| unfit(&difference))?;
    Ok(Snapshot {
        format_version: FORMAT_VERSION,
        model: live.model.clone(),
        // A llama.cpp file does not say which build and instructions computed it.
        layout: LayoutIdentity {
            compute_profile: None,
            ..live.layout.clone()
        },
        tokens: file.tokens,
        sampling: None,
        rng: RngState::from_entropy(),
        pending_token: None,
        sequence_state: translated.into(),
        created_unix_ms,
    })
}

/// Writes a `ggsq` file of `version` (plain token list) around a memory section.
pub fn write_seq_file(version: u32, tokens: &[i32], section: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + 4 * tokens.len() + section.len());
    out.extend_from_slice(&SEQ_MAGIC.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for token in tokens {
        out.extend_from_slice(&token.to_le_bytes());
    }
    out.extend_from_slice(section);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const V3: &[u8] = include_bytes!("../../tests/fixtures/llama-cpp/lighthouse.v3.ggsq");
    const V4: &[u8] = include_bytes!("../../tests/fixtures/llama-cpp/lighthouse.v4.ggsq");

    #[test]
    fn both_fixture_headers_read_and_unwrap() {
        let v3 = parse_seq_file(V3).unwrap();
        assert_eq!((v3.version, v3.tokens.len(), v3.wrapped), (3, 49, true));
        assert_eq!(&v3.tokens[..3], &[2, 14946, 3324]);
        let v4 = parse_seq_file(V4).unwrap();
        assert_eq!((v4.version, v4.tokens.len(), v4.wrapped), (4, 50, false));
        let rebuilt = write_seq_file(4, &v4.tokens, &V4[v4.section_offset..]);
        assert_eq!(rebuilt, V4);
    }

    #[test]
    fn truncated_headers_are_errors() {
        for end in 0..200 {
            let _ = parse_seq_file(&V3[..end]);
        }
        assert!(parse_seq_file(&V4[..11]).is_err());
        assert!(parse_seq_file(&V4[..100]).is_err());
    }
}
