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
    /// What snapshots must match here; `None` when the model's state cannot be parsed.
    #[serde(skip)]
    pub live: Option<crate::snapshot::LiveIdentity>,
}

impl ModelInfo {
    /// What snapshots must match here; `Incompatible` when this model's state cannot be
    /// snapshotted at all.
    pub fn snapshot_identity(&self) -> Result<&crate::snapshot::LiveIdentity, super::EngineError> {
        self.live.as_ref().ok_or_else(|| {
            super::EngineError::Incompatible(
                "this model's state cannot be snapshotted (its memory is not a KV cache)".into(),
            )
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

/// The cache layout of this context, learnt by saving a one-token sequence and parsing it.
/// `None` for memory this format does not cover (recurrent models).
pub(super) fn probe_layout(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    max_cells: u32,
) -> Option<(Vec<CacheLayout>, bool)> {
    let mut batch = LlamaBatch::new(1, 1);
    let token = model.vocab().bos();
    let token = if token.0 < 0 { LlamaToken(0) } else { token };
    batch.add(token, 0, &[0], true).ok()?;
    ctx.decode(&mut batch).ok()?;
    let mut buffer = Vec::new();
    let read = state_io::read_sequence(ctx, 0, &mut buffer).is_some();
    let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    if !read {
        return None;
    }
    let bytes = &buffer[8..];
    for n_caches in [1, 2] {
        for cell_ext in [false, true] {
            let options = ParseOptions {
                version: StateVersion::V4,
                n_caches,
                cell_ext,
                max_cells,
            };
            if let Ok(state) = llama_state::parse(bytes, options)
                && state.caches.iter().all(|c| c.positions == [0])
            {
                let layouts = state.caches.into_iter().filter_map(|c| c.layout).collect();
                return Some((layouts, cell_ext));
            }
        }
    }
    None
}
