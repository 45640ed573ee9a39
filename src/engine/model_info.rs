//! Facts about the loaded model and context, read once at load.

use std::path::Path;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::state_io;
use crate::snapshot::llama_state::{
    self, CacheLayout, ParseOptions, RecurrentLayout, StateVersion,
};

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
    /// Window size of windowed attention layers, 0 when the model has none.
    pub n_swa: u32,
    /// How that window limits what a token sees.
    pub window_kind: WindowKind,
    /// Recurrent or hybrid models cannot remove cells from a sequence's tail.
    pub recurrent: bool,
    /// The chat template in use: the model's own (Jinja source), or the name of llama.cpp's
    /// built-in one chosen for it; empty when there is none.
    pub chat_template: String,
    /// The text of the model's beginning- and end-of-sequence tokens.
    pub bos_token: String,
    pub eos_token: String,
    /// Every token that ends a generation (llama.cpp's end-of-generation set): `ignore_eos`
    /// bans them, as llama-server does.
    #[serde(skip)]
    pub eog_tokens: Vec<i32>,
    /// Replies may call tools as `<tool_call>{…}</tool_call>`: `--jinja` with a template that
    /// teaches that form (`http/tool_calls.rs` reads them out).
    pub hermes_tool_calls: bool,
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

/// How a model's windowed attention layers limit what a token sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// The last `n_swa` positions (Gemma 3).
    Sliding,
    /// The positions since the last multiple of `n_swa` (Llama 4's chunked attention).
    Chunked,
}

/// The window of windowed attention layers as llama.cpp sets it: the GGUF key, except for
/// Llama 4, whose chunked attention llama.cpp sets in code (`models/llama4.cpp`): chunks of
/// 8,192 unless the file has the key and it is 0.
pub(super) fn attention_window(model: &LlamaModel, architecture: &str) -> (u32, WindowKind) {
    let key: Option<u32> =
        arch_meta(model, architecture, "attention.sliding_window").and_then(|v| v.parse().ok());
    match (architecture, key) {
        ("llama4", Some(0)) => (0, WindowKind::Sliding),
        ("llama4", _) => (8192, WindowKind::Chunked),
        (_, key) => (key.unwrap_or(0), WindowKind::Sliding),
    }
}

/// The first position a token at `position` attends to in a window of `n_swa` (0: none).
/// llama.cpp masks cell `p` for query `q` when `q - p >= n_swa` (sliding), or when `p` lies
/// before `q`'s chunk, `q / n_swa · n_swa` (chunked).
pub(super) fn first_needed_position(position: usize, n_swa: u32, kind: WindowKind) -> usize {
    let n_swa = n_swa as usize;
    match kind {
        _ if n_swa == 0 => 0,
        WindowKind::Sliding => (position + 1).saturating_sub(n_swa),
        WindowKind::Chunked => position / n_swa * n_swa,
    }
}

/// The `"{arch}.{key}"` metadata value, if present.
fn arch_meta(model: &LlamaModel, architecture: &str, key: &str) -> Option<String> {
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

/// What the start-up probe learnt of this context's memory section.
pub(super) struct ProbedLayout {
    pub caches: Vec<CacheLayout>,
    pub cell_ext: bool,
    pub recurrent: Option<RecurrentLayout>,
}

/// The memory layout of this context, learnt by saving a one-token sequence and parsing it;
/// `Err` says why this model's state is not one kvsnap keeps (a layout the parser does not
/// know, such as a hybrid with an indexer cache or a recurrent state with a second row).
pub(super) fn probe_layout(
    model: &LlamaModel,
    ctx: &mut LlamaContext<'_>,
    max_cells: u32,
    architecture: &str,
) -> Result<ProbedLayout, String> {
    // Recurrent and hybrid memory ends in a recurrent section; a KV cache alone never does.
    let recurrent = model.is_recurrent() || model.is_hybrid();
    let kind = if model.is_hybrid() {
        "a hybrid model (KV caches and a recurrent state)"
    } else if model.is_recurrent() {
        "a recurrent model"
    } else {
        "a model"
    };
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
    for shape in llama_state::KNOWN_SHAPES
        .into_iter()
        .filter(|s| s.recurrent == recurrent)
    {
        let options = ParseOptions {
            version: StateVersion::V4,
            shape,
            max_cells,
        };
        match llama_state::parse(bytes, options) {
            Ok(state)
                if state.caches.iter().all(|c| c.positions == [0])
                    && state
                        .recurrent
                        .as_ref()
                        .is_none_or(|r| r.position == Some(0)) =>
            {
                return Ok(ProbedLayout {
                    caches: state.caches.into_iter().filter_map(|c| c.layout).collect(),
                    cell_ext: shape.cell_ext,
                    recurrent: state.recurrent.map(|r| r.layout),
                });
            }
            Ok(_) => last_error = "a one-token state parsed with other positions".into(),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(format!(
        "{architecture} is {kind} whose state is not a layout kvsnap knows ({last_error})"
    ))
}
