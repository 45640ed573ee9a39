//! Facts about the loaded model and context, read once at load.

use std::path::Path;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::state_io;
use crate::snapshot::llama_state::{self, CacheLayout, ParseOptions, StateVersion};

/// What the rest of the program may know about the model without touching llama.cpp.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    /// The model file's name, used as the model id in the API.
    pub id: String,
    /// blake3 of the GGUF file's bytes: the model's identity in snapshots.
    pub file_hash: String,
    pub file_bytes: u64,
    pub architecture: String,
    pub n_layer: u32,
    pub n_embd: i32,
    pub n_vocab: i32,
    pub n_ctx_train: u32,
    /// The whole context, as llama.cpp sized it.
    pub n_ctx: u32,
    /// What one conversation may hold: `n_ctx / parallel`.
    pub n_ctx_per_sequence: u32,
    pub parallel: usize,
    /// Sliding-window size, 0 when the model has none.
    pub n_swa: u32,
    /// Recurrent or hybrid models cannot remove cells from a sequence's tail.
    pub recurrent: bool,
    /// The chat template in use: the model's own (Jinja source), or the name of llama.cpp's
    /// built-in one chosen for it; empty when there is none.
    pub chat_template: String,
    /// The text of the model's beginning- and end-of-sequence tokens.
    pub bos_token: String,
    pub eos_token: String,
    /// What snapshots must match here, or why this model's state cannot be kept (a sentence
    /// for the 409 every save then answers).
    #[serde(skip)]
    pub live: Result<crate::snapshot::LiveIdentity, String>,
}

impl ModelInfo {
    /// What snapshots must match here; `Incompatible` when this model's state cannot be
    /// snapshotted at all.
    pub fn snapshot_identity(&self) -> Result<&crate::snapshot::LiveIdentity, super::EngineError> {
        self.live.as_ref().map_err(|reason| {
            super::EngineError::Incompatible(format!("this model's state cannot be kept: {reason}"))
        })
    }
}

/// The `"{arch}.{key}"` metadata value, if present.
pub(super) fn arch_meta(model: &LlamaModel, architecture: &str, key: &str) -> Option<String> {
    model.meta_val_str(&format!("{architecture}.{key}")).ok()
}

/// Hashes the model file so a snapshot can name exactly which weights wrote it.
pub(super) fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path)?;
    let bytes = std::fs::metadata(path)?.len();
    Ok((hasher.finalize().to_hex().to_string(), bytes))
}

/// The llama.cpp build, as the crate that vendors it: numerics belong to one build.
pub(super) const LLAMA_BUILD: &str = "llama-cpp-sys-2 0.1.161";

/// The cache layout of this context, learnt by saving a one-token sequence and parsing it;
/// `Err` says why this model's state is not one kvsnap keeps (recurrent and hybrid memory, a
/// layout the parser does not know).
pub(super) fn probe_layout(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    max_cells: u32,
    architecture: &str,
) -> Result<(Vec<CacheLayout>, bool), String> {
    // Said first: these states would not parse as KV caches, and the kind is the reason.
    if model.is_hybrid() {
        return Err(format!(
            "{architecture} is a hybrid model: its memory is KV caches and a recurrent state, \
             and kvsnap does not keep recurrent states yet"
        ));
    }
    if model.is_recurrent() {
        return Err(format!(
            "{architecture} is a recurrent model: its memory is a running state, not a KV \
             cache, and kvsnap does not keep recurrent states yet"
        ));
    }
    let mut batch = LlamaBatch::new(1, 1);
    let token = model.vocab().bos();
    let token = if token.0 < 0 { LlamaToken(0) } else { token };
    let unreadable =
        |e: &dyn std::fmt::Display| format!("a one-token state could not be made: {e}");
    batch
        .add(token, 0, &[0], true)
        .map_err(|e| unreadable(&e))?;
    ctx.decode(&mut batch).map_err(|e| unreadable(&e))?;
    let mut buffer = Vec::new();
    let read = state_io::read_sequence(ctx, 0, &mut buffer).is_some();
    let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    if !read {
        return Err("llama.cpp returned no state for a one-token sequence".into());
    }
    let bytes = &buffer[8..];
    let mut last_error = String::new();
    for (n_caches, cell_ext, has_v) in llama_state::KNOWN_SHAPES {
        let options = ParseOptions {
            version: StateVersion::V4,
            n_caches,
            cell_ext,
            max_cells,
            has_v,
        };
        match llama_state::parse(bytes, options) {
            Ok(state) if state.caches.iter().all(|c| c.positions == [0]) => {
                let layouts = state.caches.into_iter().filter_map(|c| c.layout).collect();
                return Ok((layouts, cell_ext));
            }
            Ok(_) => last_error = "a one-token state parsed with other positions".into(),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(format!(
        "its state is not one or two KV caches kvsnap knows ({last_error})"
    ))
}
