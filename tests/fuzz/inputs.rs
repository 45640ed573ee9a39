//! Valid inputs for the decoders, built in code: llama.cpp memory sections of any shape, and
//! kvsnap snapshots around them. tests/decoders.rs draws shapes from them for its properties;
//! the fuzz targets' seeds (`seeds.rs`) are a few of them, small so that fuzzing runs fast.
//!
//! The section layout is llama.cpp's (`kvsnap::snapshot::llama_state` documents it). Every
//! row byte depends on its cache, layer, K or V, position and offset, so a row put back in
//! the wrong place shows in a comparison.

use std::borrow::Cow;

use kvsnap::sampling::RngState;
use kvsnap::snapshot::llama_state::{
    self, CELL_EXT_BYTES, CacheLayout, LayerLayout, ParseOptions, RecurrentLayer, RecurrentLayout,
    StateVersion,
};
use kvsnap::snapshot::{FORMAT_VERSION, LayoutIdentity, LiveIdentity, ModelIdentity, Snapshot};
use kvsnap::store::records::{RECORD_VERSION, SessionRecord};

/// The rotation dimensions a v4 section records (v3 has none).
pub const ROTATION: (u32, u32) = (32, 32);
/// ggml's f16: the type every K and V row here has (V must be f16 or f32 to be transposed).
const F16: i32 = 1;

/// One cache of a section.
#[derive(Debug, Clone)]
pub struct Cache {
    /// The sequence's cells' positions, in cell order; empty for a cache without cells.
    pub positions: Vec<i32>,
    /// Per layer: the bytes of one cell's K row and of its V row (even: V is f16).
    pub layers: Vec<(u64, u64)>,
    /// V stored transposed (element by element across cells) instead of by row.
    pub v_trans: bool,
}

/// A recurrent section after the caches, as recurrent and hybrid models write it.
#[derive(Debug, Clone)]
pub struct Recurrent {
    /// Where the running state stands; `None` for a sequence that has read nothing.
    pub position: Option<i32>,
    /// The model's layer count as written (at least as many as `layers`).
    pub n_layer: u32,
    /// Per recurrent layer: the bytes of its r row and of its s row (f32: multiples of 4).
    pub layers: Vec<(u64, u64)>,
}

/// ggml's f32: the type of every recurrent row here, as llama.cpp keeps them.
const F32: i32 = 0;

/// A whole memory section, as one sequence of a llama.cpp context writes it.
#[derive(Debug, Clone)]
pub struct Shape {
    pub version: StateVersion,
    /// Each cell carries an 8-byte extension (M-RoPE models).
    pub cell_ext: bool,
    /// Streams per cache; the sequence's cells are in the last, the others are empty.
    pub n_stream: u32,
    /// The sequence id every cell carries.
    pub seq_id: i32,
    pub caches: Vec<Cache>,
    pub recurrent: Option<Recurrent>,
}

impl Shape {
    /// What a reader must be told to parse this section.
    pub fn options(&self) -> ParseOptions {
        ParseOptions {
            version: self.version,
            shape: llama_state::Shape {
                n_caches: self.caches.len(),
                cell_ext: self.cell_ext,
                has_v: true,
                recurrent: self.recurrent.is_some(),
            },
            max_cells: 1 << 16,
        }
    }

    /// The recurrent section's layout as the state records it.
    pub fn recurrent_layout(&self) -> Option<RecurrentLayout> {
        self.recurrent.as_ref().map(|r| RecurrentLayout {
            n_layer: r.n_layer,
            layers: r
                .layers
                .iter()
                .map(|&(r_row, s_row)| RecurrentLayer {
                    r_type: F32,
                    r_row_size: r_row,
                    s_type: F32,
                    s_row_size: s_row,
                })
                .collect(),
        })
    }

    /// Each cache's layout as the state records it (what a live context would have).
    pub fn layouts(&self) -> Vec<CacheLayout> {
        let (n_rot_k, n_rot_v) = match self.version {
            StateVersion::V4 => ROTATION,
            StateVersion::V3 => (0, 0),
        };
        self.caches
            .iter()
            .map(|cache| CacheLayout {
                v_trans: cache.v_trans,
                n_rot_k,
                n_rot_v,
                layers: cache
                    .layers
                    .iter()
                    .map(|&(k_row, v_row)| LayerLayout {
                        k_type: F16,
                        k_row_size: k_row,
                        v_type: F16,
                        v_cell_size: v_row,
                    })
                    .collect(),
                has_v: true,
            })
            .collect()
    }
}

/// A byte of the row of (cache, layer, K or V, position), at `at`.
fn row_byte(cache: usize, layer: usize, v: bool, position: i32, at: usize) -> u8 {
    let mixed = (cache as u64 * 131 + layer as u64 * 31 + u64::from(v) * 17)
        ^ (position as u64).wrapping_mul(0x9e37_79b9)
        ^ (at as u64).wrapping_mul(0x85eb_ca6b);
    (mixed ^ (mixed >> 13)) as u8
}

fn word(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// The section `shape` describes, byte for byte as llama.cpp writes it.
pub fn section(shape: &Shape) -> Vec<u8> {
    let mut out = Vec::new();
    for (index, cache) in shape.caches.iter().enumerate() {
        word(&mut out, shape.n_stream);
        for _ in 1..shape.n_stream {
            word(&mut out, 0);
        }
        word(&mut out, cache.positions.len() as u32);
        if cache.positions.is_empty() {
            continue;
        }
        for (cell, &position) in cache.positions.iter().enumerate() {
            word(&mut out, position as u32);
            word(&mut out, 1);
            if shape.cell_ext {
                out.extend((0..CELL_EXT_BYTES).map(|k| (cell * 7 + k) as u8));
            }
            word(&mut out, shape.seq_id as u32);
        }
        word(&mut out, u32::from(cache.v_trans));
        word(&mut out, cache.layers.len() as u32);
        if shape.version == StateVersion::V4 {
            word(&mut out, ROTATION.0);
            word(&mut out, ROTATION.1);
        }
        for (layer, &(k_row, _)) in cache.layers.iter().enumerate() {
            word(&mut out, F16 as u32);
            out.extend_from_slice(&k_row.to_le_bytes());
            for &p in &cache.positions {
                out.extend((0..k_row as usize).map(|at| row_byte(index, layer, false, p, at)));
            }
        }
        for (layer, &(_, v_row)) in cache.layers.iter().enumerate() {
            word(&mut out, F16 as u32);
            if cache.v_trans {
                word(&mut out, 2);
                word(&mut out, (v_row / 2) as u32);
                for j in 0..(v_row / 2) as usize {
                    for &p in &cache.positions {
                        out.push(row_byte(index, layer, true, p, 2 * j));
                        out.push(row_byte(index, layer, true, p, 2 * j + 1));
                    }
                }
            } else {
                out.extend_from_slice(&v_row.to_le_bytes());
                for &p in &cache.positions {
                    out.extend((0..v_row as usize).map(|at| row_byte(index, layer, true, p, at)));
                }
            }
        }
    }
    if let Some(recurrent) = &shape.recurrent {
        recurrent_section(recurrent, shape.caches.len(), &mut out);
    }
    out
}

/// A recurrent section as `llama_memory_recurrent::state_write` writes one sequence's.
fn recurrent_section(recurrent: &Recurrent, cache: usize, out: &mut Vec<u8>) {
    word(out, u32::from(recurrent.position.is_some()));
    if let Some(position) = recurrent.position {
        word(out, position as u32);
        word(out, 0);
    }
    word(out, 0);
    word(out, recurrent.n_layer);
    let cells = usize::from(recurrent.position.is_some());
    let position = recurrent.position.unwrap_or(0);
    for s_rows in [false, true] {
        for (layer, &(r_row, s_row)) in recurrent.layers.iter().enumerate() {
            let row = if s_rows { s_row } else { r_row };
            word(out, F32 as u32);
            out.extend_from_slice(&row.to_le_bytes());
            out.extend(
                (0..row as usize * cells).map(|at| row_byte(cache, layer, s_rows, position, at)),
            );
        }
    }
}

/// The memory section of a `ggsq` file written by `llama_state_seq_save_file` (plain token
/// list): after magic, version, count and `count` tokens.
pub fn memory_section(file: &[u8]) -> &[u8] {
    let count = u32::from_le_bytes(file[8..12].try_into().expect("a ggsq header")) as usize;
    &file[12 + 4 * count..]
}

/// A server that runs a model whose state has these layouts.
pub fn identity(layouts: Vec<CacheLayout>, cell_ext: bool) -> LiveIdentity {
    LiveIdentity {
        model: ModelIdentity {
            file_hash: "ab".repeat(32),
            architecture: "gemma3".into(),
            n_layer: layouts.iter().map(|c| c.layers.len() as u32).sum(),
            n_embd: 640,
            n_vocab: 1000,
        },
        layout: LayoutIdentity {
            flash_attention: false,
            n_ctx_per_sequence: 4096,
            n_swa: 512,
            n_ubatch: 512,
            llama_build: "fuzz".into(),
            cell_ext,
            caches: layouts,
            compute_profile: Some("avx512".into()),
            recurrent: None,
        },
    }
}

/// A snapshot `live` accepts, around `state` (a v4 section, one stream per cache, whose full
/// cache holds positions `0..n_tokens`).
pub fn snapshot<'a>(live: &LiveIdentity, n_tokens: usize, state: &'a [u8]) -> Snapshot<'a> {
    Snapshot {
        format_version: FORMAT_VERSION,
        model: live.model.clone(),
        layout: live.layout.clone(),
        tokens: (0..n_tokens).map(|i| (i * 37 % 1000) as i32).collect(),
        sampling: None,
        rng: RngState::from_seed(9),
        pending_token: Some(17),
        created_unix_ms: 1,
        sequence_state: Cow::Borrowed(state),
    }
}

/// A small section a snapshot can hold: a full cache of positions `0..n_tokens` (shuffled a
/// little, as a ring buffer leaves them) and a window cache of the last few, two layers each.
pub fn small_shape(n_tokens: i32, v_trans: bool, cell_ext: bool) -> Shape {
    let full: Vec<i32> = (n_tokens / 2..n_tokens).chain(0..n_tokens / 2).collect();
    let window: Vec<i32> = ((n_tokens - 3).max(0)..n_tokens).collect();
    let layers = vec![(8, 4), (4, 6)];
    Shape {
        version: StateVersion::V4,
        cell_ext,
        n_stream: 1,
        seq_id: 0,
        caches: vec![
            Cache {
                positions: full,
                layers: layers.clone(),
                v_trans,
            },
            Cache {
                positions: window,
                layers,
                v_trans,
            },
        ],
        recurrent: None,
    }
}

/// The snapshot file of `small_shape(6, false, false)`, and the identity that accepts it.
pub fn small_snapshot_file() -> (LiveIdentity, Vec<u8>) {
    let shape = small_shape(6, false, false);
    let live = identity(shape.layouts(), false);
    let section = section(&shape);
    let file = snapshot(&live, 6, &section).encode().expect("it fits");
    (live, file)
}

/// A conversation's record as the store writes one.
pub fn session_record() -> SessionRecord {
    SessionRecord {
        record_version: RECORD_VERSION,
        owner: Some("ab".repeat(32)),
        created_ms: 1,
        last_used_ms: 2,
        tokens: 50,
        bytes: 1000,
        chunks: 1,
        checksum: "cd".repeat(32),
        model: "ef".repeat(32),
        damaged: None,
        compute_profile: Some("avx512".into()),
        saves: 0,
    }
}
