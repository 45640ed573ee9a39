//! A bounds-checked reader of llama.cpp's per-sequence memory section.
//!
//! llama.cpp checks little of what it restores, and some bad inputs reach `GGML_ASSERT`, which
//! aborts the process. So before the engine hands bytes to `llama_state_seq_set_data_ext`, this
//! parser walks them completely — every count, type, row size and byte range — and the result is
//! compared with the live context's own layout (see `CacheLayout`).
//!
//! The section, as `llama_kv_cache::state_write` writes it (one per cache; sliding-window models
//! write the full cache, then the window cache):
//!
//! ```text
//! n_stream u32, then per stream: cell_count u32, and when cell_count > 0:
//!   cell_count × { pos i32, n_seq_id u32, [ext 8 bytes], seq_id i32 × n_seq_id }
//!   v_trans u32, n_layer u32, [v4: n_rot_k u32, n_rot_v u32]
//!   n_layer × { k_type i32, k_row_size u64, k_row_size × cell_count bytes }
//!   v_trans = 0: n_layer × { v_type i32, v_row_size u64, v_row_size × cell_count bytes }
//!   v_trans = 1: n_layer × { v_type i32, v_el_size u32, n_embd_v u32, v_el_size × n_embd_v × cell_count bytes }
//! ```
//!
//! Recurrent models (Mamba, RWKV) write a recurrent section instead, and hybrid ones (LFM2,
//! Granite 4, Qwen3-Next) their KV caches and then one, as `llama_memory_recurrent::state_write`
//! writes it. No stream count; a sequence's running state is one cell, written without
//! sequence ids; its layer count is the model's, but only recurrent layers have rows:
//!
//! ```text
//! cell_count u32 (0 or 1), cell_count × { pos i32, n_seq_id u32 = 0 }
//! s_trans u32 = 0, n_layer u32
//! per recurrent layer: { r_type i32, r_row_size u64, r_row_size × cell_count bytes }
//! per recurrent layer: { s_type i32, s_row_size u64, s_row_size × cell_count bytes }
//! ```

use std::fmt;

/// Which llama.cpp sequence-state version the bytes follow. v4 added `n_rot_k`, `n_rot_v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StateVersion {
    V3,
    V4,
}

/// What one cache's layer looks like: the part of a layout that must match exactly.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerLayout {
    pub k_type: i32,
    pub k_row_size: u64,
    pub v_type: i32,
    /// Bytes per cell of V: the row size, or element size × embedding width when transposed.
    pub v_cell_size: u64,
}

/// The shape of one cache (full, or sliding-window) as a state records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheLayout {
    pub v_trans: bool,
    pub n_rot_k: u32,
    pub n_rot_v: u32,
    pub layers: Vec<LayerLayout>,
    /// False for multi-head latent attention (DeepSeek 2/3, Kimi): llama.cpp keeps no V and
    /// writes no V blocks (each layer's `v_type` and `v_cell_size` are then 0). Left out of
    /// the encoding when true, so layouts written before it existed, and the page salts made
    /// from them, stay byte for byte the same.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub has_v: bool,
}

fn yes() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// One recurrent layer's rows as a state records them: its convolution (r) and its running
/// state (s). llama.cpp keeps both in f32 unless told otherwise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecurrentLayer {
    pub r_type: i32,
    pub r_row_size: u64,
    pub s_type: i32,
    pub s_row_size: u64,
}

/// The shape of a recurrent section: the model's layer count as written, and the recurrent
/// layers among them (a hybrid model's attention layers have none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecurrentLayout {
    pub n_layer: u32,
    pub layers: Vec<RecurrentLayer>,
}

impl RecurrentLayout {
    /// Bytes of one state's rows: every layer's r row, then every layer's s row. Row sizes
    /// are bounded by the parser (`MAX_RECURRENT_ROW`), so the sum cannot overflow.
    pub fn row_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.r_row_size.saturating_add(l.s_row_size))
            .fold(0, u64::saturating_add)
    }

    /// Bytes of the section when it holds the one cell of a sequence.
    pub fn section_bytes(&self) -> usize {
        // cell_count, the cell (pos, n_seq_id), s_trans, n_layer, a type and size per row.
        let fixed = 4 + 8 + 8 + 24 * self.layers.len() as u64;
        usize::try_from(self.row_bytes().saturating_add(fixed)).unwrap_or(usize::MAX)
    }
}

/// A sequence's recurrent section: where the running state stands and what it looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct RecurrentState {
    /// The position of the last token the state has read; `None` when it has read none.
    pub position: Option<i32>,
    pub layout: RecurrentLayout,
    /// Where the section (its cell count onwards) lies in the parsed bytes.
    pub range: std::ops::Range<usize>,
    /// Per recurrent layer: where its r rows begin, then where its s rows begin.
    pub r_at: Vec<usize>,
    pub s_at: Vec<usize>,
}

impl RecurrentState {
    /// The state's rows as one buffer: every layer's r row, then every layer's s row (what
    /// pages hold). Empty when it holds no cell.
    pub fn rows(&self, source: &[u8]) -> Vec<u8> {
        if self.position.is_none() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.layout.row_bytes() as usize);
        for (at, layer) in self.r_at.iter().zip(&self.layout.layers) {
            out.extend_from_slice(&source[*at..*at + layer.r_row_size as usize]);
        }
        for (at, layer) in self.s_at.iter().zip(&self.layout.layers) {
            out.extend_from_slice(&source[*at..*at + layer.s_row_size as usize]);
        }
        out
    }
}

/// Writes a recurrent section holding `rows` (as `RecurrentState::rows` gives them) for the
/// cell at `position`, or no cell when `position` is `None` (then `rows` must be empty), piece
/// by piece through `out` (an assembly writes it straight into its frame).
pub fn write_recurrent(
    layout: &RecurrentLayout,
    position: Option<i32>,
    rows: &[u8],
    out: &mut dyn FnMut(&[u8]),
) -> Result<(), String> {
    let cells = u64::from(position.is_some());
    if rows.len() as u64 != cells * layout.row_bytes() {
        return Err(format!(
            "the recurrent state's rows are {} bytes, its layout says {}",
            rows.len(),
            cells * layout.row_bytes()
        ));
    }
    out(&(cells as u32).to_le_bytes());
    if let Some(position) = position {
        out(&position.to_le_bytes());
        out(&0u32.to_le_bytes());
    }
    out(&0u32.to_le_bytes());
    out(&layout.n_layer.to_le_bytes());
    let blocks = layout.layers.iter().map(|l| (l.r_type, l.r_row_size));
    let blocks = blocks.chain(layout.layers.iter().map(|l| (l.s_type, l.s_row_size)));
    let mut at = 0;
    for (ggml_type, row) in blocks {
        out(&ggml_type.to_le_bytes());
        out(&row.to_le_bytes());
        let size = (row * cells) as usize;
        out(&rows[at..at + size]);
        at += size;
    }
    Ok(())
}

/// One cache's content for the sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheState {
    pub n_stream: u32,
    /// Positions of the sequence's cells, in stored order.
    pub positions: Vec<i32>,
    /// `None` when the sequence has no cells in this cache.
    pub layout: Option<CacheLayout>,
    /// Where the one non-empty stream (its `cell_count` onwards) lies in the parsed bytes, so
    /// the section can be rewritten for a context with another stream count.
    pub stream_range: Option<std::ops::Range<usize>>,
    /// Where the stream's data begins after `n_layer`: where v4 has `n_rot_k`, `n_rot_v`.
    pub rotation_offset: Option<usize>,
    /// Where the stream's V part begins (after every layer's K rows).
    pub v_offset: Option<usize>,
}

/// A parsed memory section.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceState {
    pub version: StateVersion,
    pub caches: Vec<CacheState>,
    /// The recurrent section of recurrent and hybrid models, after the caches.
    pub recurrent: Option<RecurrentState>,
}

/// Why bytes are not a sequence state this parser accepts. Always a sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// What a memory section's own bytes do not say about its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// How many KV caches come first (2 for sliding-window models, 0 for recurrent ones).
    pub n_caches: usize,
    /// Whether each cell carries llama.cpp's extension (`CELL_EXT_BYTES`; M-RoPE models).
    pub cell_ext: bool,
    /// Whether the caches hold V (false for multi-head latent attention).
    pub has_v: bool,
    /// Whether a recurrent section follows the caches (recurrent and hybrid models).
    pub recurrent: bool,
}

const fn shape(n_caches: usize, cell_ext: bool, has_v: bool, recurrent: bool) -> Shape {
    Shape {
        n_caches,
        cell_ext,
        has_v,
        recurrent,
    }
}

/// Every shape of memory section the parser reads, plain first, so a reader without a live
/// layout (the start-up probe, `kvsnap inspect` of a llama.cpp file) tries each.
pub const KNOWN_SHAPES: [Shape; 10] = [
    shape(1, false, true, false),
    shape(1, true, true, false),
    shape(2, false, true, false),
    shape(2, true, true, false),
    shape(1, false, false, false),
    shape(2, false, false, false),
    shape(0, false, true, true),
    shape(1, false, true, true),
    shape(2, false, true, true),
    shape(1, true, true, true),
];

/// What the reader must know that the bytes do not say.
#[derive(Debug, Clone, Copy)]
pub struct ParseOptions {
    pub version: StateVersion,
    pub shape: Shape,
    /// A sanity bound on cells per stream; protects against absurd counts before any slicing.
    pub max_cells: u32,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ParseError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let slice = &self.bytes[self.at..end];
                self.at = end;
                Ok(slice)
            }
            None => Err(ParseError(format!(
                "the state ends at byte {} while reading {what} ({n} bytes needed)",
                self.bytes.len()
            ))),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, ParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, ParseError> {
        Ok(self.u32(what)? as i32)
    }

    fn u64(&mut self, what: &str) -> Result<u64, ParseError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("took 8 bytes")))
    }
}

fn sized(count: u64, each: u64, what: &str) -> Result<usize, ParseError> {
    count
        .checked_mul(each)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ParseError(format!("{what} is too large to be real")))
}

/// Parses a whole memory section; every byte must be accounted for.
pub fn parse(bytes: &[u8], options: ParseOptions) -> Result<SequenceState, ParseError> {
    let mut reader = Reader { bytes, at: 0 };
    let mut caches = Vec::with_capacity(options.shape.n_caches);
    for cache in 0..options.shape.n_caches {
        caches.push(parse_cache(&mut reader, options, cache)?);
    }
    let recurrent = if options.shape.recurrent {
        Some(parse_recurrent(&mut reader)?)
    } else {
        None
    };
    if reader.at != bytes.len() {
        return Err(ParseError(format!(
            "{} bytes follow the end of the state",
            bytes.len() - reader.at
        )));
    }
    Ok(SequenceState {
        version: options.version,
        caches,
        recurrent,
    })
}

/// The largest recurrent row the parser accepts: 1 GiB, far above any model's (the largest
/// Mamba 2 keeps a few MiB per layer).
pub const MAX_RECURRENT_ROW: u64 = 1 << 30;

/// Reads a recurrent section to the end of the bytes (it is always last). How many of the
/// model's layers are recurrent the bytes do not say; each has an r block and an s block, the r
/// blocks first, so the blocks found are split in half.
fn parse_recurrent(reader: &mut Reader<'_>) -> Result<RecurrentState, ParseError> {
    let start = reader.at;
    let cells = reader.u32("the recurrent cell count")?;
    if cells > 1 {
        return Err(ParseError(format!(
            "the recurrent state claims {cells} cells; a sequence's running state is one"
        )));
    }
    let mut position = None;
    if cells == 1 {
        let pos = reader.i32("the recurrent cell's position")?;
        let n_seq = reader.u32("the recurrent cell's sequence count")?;
        if pos < 0 || n_seq != 0 {
            return Err(ParseError(format!(
                "the recurrent cell has position {pos} and {n_seq} sequence ids; llama.cpp \
                 writes a sequence's cell at a position and without ids"
            )));
        }
        position = Some(pos);
    }
    let s_trans = reader.u32("the S layout flag")?;
    if s_trans != 0 {
        return Err(ParseError(format!(
            "the recurrent state has S layout flag {s_trans}; llama.cpp reads only 0"
        )));
    }
    let n_layer = reader.u32("the recurrent layer count")?;
    if n_layer == 0 || n_layer > 1024 {
        return Err(ParseError(format!(
            "the recurrent state claims {n_layer} layers"
        )));
    }
    let mut blocks = Vec::new();
    while reader.at < reader.bytes.len() {
        // Refused as soon as there are more than two per layer, not after reading megabytes of
        // empty blocks into a list.
        if blocks.len() == 2 * n_layer as usize {
            return Err(ParseError(format!(
                "the recurrent state has more row blocks than two for each of its {n_layer} \
                 layers"
            )));
        }
        let ggml_type = reader.i32("a recurrent row type")?;
        check_type(ggml_type, 0, blocks.len() as u32, "recurrent")?;
        let row = reader.u64("a recurrent row size")?;
        // Checked even without a cell, when no rows follow: sizes are summed and sized later.
        if row > MAX_RECURRENT_ROW {
            return Err(ParseError(format!(
                "a recurrent row claims {row} bytes, more than a real one holds"
            )));
        }
        let at = reader.at;
        reader.take(
            sized(u64::from(cells), row, "a recurrent row")?,
            "recurrent rows",
        )?;
        blocks.push((ggml_type, row, at));
    }
    let half = blocks.len() / 2;
    if blocks.is_empty() || blocks.len() % 2 != 0 || half > n_layer as usize {
        return Err(ParseError(format!(
            "the recurrent state has {} row blocks; llama.cpp writes an r and an s block for \
             each of at most {n_layer} layers",
            blocks.len()
        )));
    }
    let (r, s) = blocks.split_at(half);
    let layers = r
        .iter()
        .zip(s)
        .map(|(r, s)| RecurrentLayer {
            r_type: r.0,
            r_row_size: r.1,
            s_type: s.0,
            s_row_size: s.1,
        })
        .collect();
    Ok(RecurrentState {
        position,
        layout: RecurrentLayout { n_layer, layers },
        range: start..reader.at,
        r_at: r.iter().map(|b| b.2).collect(),
        s_at: s.iter().map(|b| b.2).collect(),
    })
}

fn parse_cache(
    reader: &mut Reader<'_>,
    options: ParseOptions,
    cache: usize,
) -> Result<CacheState, ParseError> {
    let n_stream = reader.u32("the stream count")?;
    if n_stream == 0 || n_stream > 256 {
        return Err(ParseError(format!(
            "cache {cache} claims {n_stream} streams; llama.cpp writes 1 to 256"
        )));
    }
    let mut state = CacheState {
        n_stream,
        positions: Vec::new(),
        layout: None,
        stream_range: None,
        rotation_offset: None,
        v_offset: None,
    };
    for stream in 0..n_stream {
        let start = reader.at;
        let cell_count = reader.u32("a cell count")?;
        if cell_count == 0 {
            continue;
        }
        if state.layout.is_some() {
            return Err(ParseError(format!(
                "cache {cache} holds cells in more than one stream; a sequence state has one"
            )));
        }
        if cell_count > options.max_cells {
            return Err(ParseError(format!(
                "cache {cache} stream {stream} claims {cell_count} cells, more than the \
                 {} a conversation can hold",
                options.max_cells
            )));
        }
        // A sequence's state names one sequence; the pager keeps one id per cache, so a state
        // whose cells disagree is refused here, as damage, not later as a paging failure.
        let mut stream_seq = None;
        for cell in 0..cell_count {
            let pos = reader.i32("a cell position")?;
            let n_seq = reader.u32("a cell's sequence count")?;
            if n_seq != 1 {
                return Err(ParseError(format!(
                    "cell {cell} of cache {cache} belongs to {n_seq} sequences; a sequence \
                     state's cells belong to exactly one"
                )));
            }
            if options.shape.cell_ext {
                reader.take(CELL_EXT_BYTES, "a cell extension")?;
            }
            let seq = reader.i32("a cell's sequence id")?;
            if pos < 0 || seq < 0 {
                return Err(ParseError(format!(
                    "cell {cell} of cache {cache} has position {pos} and sequence {seq}"
                )));
            }
            match stream_seq {
                None => stream_seq = Some(seq),
                Some(first) if first != seq => {
                    return Err(ParseError(format!(
                        "cell {cell} of cache {cache} belongs to sequence {seq}, cell 0 to \
                         sequence {first}; a sequence state's cells belong to one sequence"
                    )));
                }
                Some(_) => {}
            }
            state.positions.push(pos);
        }
        let (layout, rotation_offset, v_offset) = parse_data(reader, options, cache, cell_count)?;
        state.layout = Some(layout);
        state.rotation_offset = Some(rotation_offset);
        state.v_offset = Some(v_offset);
        state.stream_range = Some(start..reader.at);
    }
    Ok(state)
}

/// Bytes of a cell's extension in this llama.cpp (`llama_kv_cell_ext`: the 2D position x, y
/// of M-RoPE and the token id, 4 bytes each; earlier builds wrote only x and y). A snapshot
/// names its llama.cpp build, so it never meets a build that writes another size.
pub const CELL_EXT_BYTES: usize = 12;

/// Bytes of one cell's metadata in a cache stream: its position, sequence count and sequence
/// id, and with `cell_ext` llama.cpp's extension.
pub fn cell_metadata_bytes(cell_ext: bool) -> usize {
    12 + if cell_ext { CELL_EXT_BYTES } else { 0 }
}

/// Bytes of a normalised cache section holding `cells` cells of `row_bytes` each (every layer's
/// K row and V row): the stream count, cell count, V layout flag, layer count and rotations
/// (24), every cell's metadata and rows, and each layer's K and V type and size (12 each).
pub fn cache_section_bytes(cells: usize, layers: usize, row_bytes: usize, cell_ext: bool) -> usize {
    cells
        .saturating_mul(cell_metadata_bytes(cell_ext).saturating_add(row_bytes))
        .saturating_add(24 + 12 * 2 * layers)
}

/// Returns the layout, the offset just after `n_layer`, and where V begins.
fn parse_data(
    reader: &mut Reader<'_>,
    options: ParseOptions,
    cache: usize,
    cells: u32,
) -> Result<(CacheLayout, usize, usize), ParseError> {
    let v_trans = match reader.u32("the V layout flag")? {
        0 => false,
        1 => true,
        other => {
            return Err(ParseError(format!(
                "cache {cache} has V layout flag {other}; llama.cpp writes 0 or 1"
            )));
        }
    };
    let n_layer = reader.u32("the layer count")?;
    if n_layer == 0 {
        // llama.cpp writes one when every attention layer is windowed (LFM2 with a window).
        return Err(ParseError(format!(
            "cache {cache} has cells but no layers, which kvsnap does not keep yet"
        )));
    }
    if n_layer > 1024 {
        return Err(ParseError(format!("cache {cache} claims {n_layer} layers")));
    }
    let rotation_offset = reader.at;
    let (n_rot_k, n_rot_v) = match options.version {
        StateVersion::V4 => (reader.u32("n_rot_k")?, reader.u32("n_rot_v")?),
        StateVersion::V3 => (0, 0),
    };
    let cells = u64::from(cells);
    let mut layers = Vec::with_capacity(n_layer as usize);
    for layer in 0..n_layer {
        let k_type = reader.i32("a K type")?;
        let k_row_size = reader.u64("a K row size")?;
        check_type(k_type, cache, layer, "K")?;
        let size = sized(cells, k_row_size, "a layer's K")?;
        reader.take(size, "K rows")?;
        layers.push(LayerLayout {
            k_type,
            k_row_size,
            v_type: 0,
            v_cell_size: 0,
        });
    }
    let v_offset = reader.at;
    let v_layers = if options.shape.has_v { layers.len() } else { 0 };
    for (index, layer) in layers.iter_mut().take(v_layers).enumerate() {
        let v_type = reader.i32("a V type")?;
        check_type(v_type, cache, index as u32, "V")?;
        let cell_size = if v_trans {
            let element = u64::from(reader.u32("a V element size")?);
            let width = u64::from(reader.u32("a V width")?);
            // llama.cpp writes the type's own size, and transposes only types of whole
            // elements (f32, f16, bf16: a quantized V needs flash attention, which stores V by
            // row). Transposing and paging take the element size from the type, so a section
            // that says otherwise would come back altered, or not at all.
            let Some(expected) = element_size(v_type) else {
                return Err(ParseError(format!(
                    "cache {cache} layer {index} stores V of type {} transposed, which llama.cpp \
                     never writes",
                    ggml_type_name(v_type)
                )));
            };
            if element != expected {
                return Err(ParseError(format!(
                    "cache {cache} layer {index} stores V of type {} in elements of \
                     {element} bytes",
                    ggml_type_name(v_type)
                )));
            }
            element
                .checked_mul(width)
                .ok_or_else(|| ParseError("a V row is too large to be real".into()))?
        } else {
            reader.u64("a V row size")?
        };
        let size = sized(cells, cell_size, "a layer's V")?;
        reader.take(size, "V rows")?;
        layer.v_type = v_type;
        layer.v_cell_size = cell_size;
    }
    Ok((
        CacheLayout {
            v_trans,
            n_rot_k,
            n_rot_v,
            layers,
            has_v: options.shape.has_v,
        },
        rotation_offset,
        v_offset,
    ))
}

fn check_type(ggml_type: i32, cache: usize, layer: u32, which: &str) -> Result<(), ParseError> {
    // ggml's type ids run from 0 to well under 64.
    if !(0..64).contains(&ggml_type) {
        return Err(ParseError(format!(
            "cache {cache} layer {layer} has {which} type {ggml_type}, which is no ggml type"
        )));
    }
    Ok(())
}

/// A readable name for the ggml types a KV cache uses.
pub fn ggml_type_name(ggml_type: i32) -> String {
    match ggml_type {
        0 => "f32".into(),
        1 => "f16".into(),
        2 => "q4_0".into(),
        3 => "q4_1".into(),
        6 => "q5_0".into(),
        7 => "q5_1".into(),
        8 => "q8_0".into(),
        30 => "bf16".into(),
        other => format!("ggml type {other}"),
    }
}

impl SequenceState {
    /// Rewrites the section for a context with `n_stream` streams: the sequence's one stream
    /// first, empty streams after it. llama.cpp places the cells by the destination sequence,
    /// not by the stream index, so this only has to match the count.
    /// `source` must be the bytes this state was parsed from.
    pub fn encode_for(&self, source: &[u8], n_stream: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(source.len() + 4 * n_stream as usize);
        self.write_for(source, n_stream, &mut out);
        out
    }

    /// Like `encode_for`, appending to `out` (so a caller can frame it without another copy).
    pub fn write_for(&self, source: &[u8], n_stream: u32, out: &mut Vec<u8>) {
        for cache in &self.caches {
            out.extend_from_slice(&n_stream.to_le_bytes());
            let mut written = 0;
            if let Some(range) = &cache.stream_range {
                out.extend_from_slice(&source[range.clone()]);
                written = 1;
            }
            for _ in written..n_stream {
                out.extend_from_slice(&0u32.to_le_bytes());
            }
        }
        if let Some(recurrent) = &self.recurrent {
            out.extend_from_slice(&source[recurrent.range.clone()]);
        }
    }

    /// `write_for(source, 1)` as pieces that concatenate to it, borrowing the streams from
    /// `source` instead of copying them: a save hands these straight to the snapshot encoder.
    pub fn normalised_pieces<'s>(&self, source: &'s [u8]) -> Vec<&'s [u8]> {
        const ONE_STREAM: &[u8] = &1u32.to_le_bytes();
        const ONE_EMPTY_STREAM: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0];
        let mut pieces = Vec::with_capacity(2 * self.caches.len());
        for cache in &self.caches {
            match &cache.stream_range {
                Some(range) => {
                    pieces.push(ONE_STREAM);
                    pieces.push(&source[range.clone()]);
                }
                None => pieces.push(ONE_EMPTY_STREAM),
            }
        }
        if let Some(recurrent) = &self.recurrent {
            pieces.push(&source[recurrent.range.clone()]);
        }
        pieces
    }

    /// Whether every cache has exactly one stream, as snapshots store it.
    fn is_normalised(&self) -> bool {
        self.caches.iter().all(|c| c.n_stream == 1)
    }

    /// `write_for` inside `buf`, where the parsed section lies at `at..` (normalised: one
    /// stream per cache), with llama.cpp's 8-byte `header` in front: what a restore hands to
    /// llama.cpp, without copying megabytes into a second buffer. The header overwrites the 8
    /// bytes before `at`, the frame grows into the bytes after the section (`buf` grows if
    /// needed): the caller must need neither any more. Each cache after the first moves by 4
    /// bytes per added stream, so only those bytes are moved. Returns the frame's range, or
    /// `None` (and leaves `buf` alone) when the section is not normalised or `at < 8`.
    pub fn frame_in_place(
        &self,
        buf: &mut Vec<u8>,
        at: usize,
        header: [u8; 8],
        n_stream: u32,
    ) -> Option<std::ops::Range<usize>> {
        let n_stream = n_stream.max(1);
        if at < header.len() || !self.is_normalised() {
            return None;
        }
        // Where each cache's one stream (from its cell count on) lies, in `buf`.
        let mut streams = Vec::with_capacity(self.caches.len());
        let mut source = at;
        for cache in &self.caches {
            let stream_len = match &cache.stream_range {
                Some(range) if range.start + at == source + 4 => range.len(),
                Some(_) => return None,
                None => 4, // one empty stream: its zero cell count
            };
            streams.push(source + 4..source + 4 + stream_len);
            source += 4 + stream_len;
        }
        // The recurrent section, which has no stream count, follows the caches unchanged.
        let recurrent = match &self.recurrent {
            Some(r) if r.range.start + at == source => source..source + r.range.len(),
            Some(_) => return None,
            None => source..source,
        };
        let added = 4 * (n_stream as usize - 1);
        let end = recurrent.end + added * self.caches.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        if added > 0 && !recurrent.is_empty() {
            buf.copy_within(
                recurrent.clone(),
                recurrent.start + added * self.caches.len(),
            );
        }
        // Last cache first: each moves right by `added` per cache before it, onto bytes the
        // caches after it have already left.
        for (index, stream) in streams.iter().enumerate().rev() {
            let shift = added * index;
            let count_at = stream.start - 4 + shift;
            if shift > 0 {
                buf.copy_within(stream.clone(), stream.start + shift);
            }
            buf[count_at..count_at + 4].copy_from_slice(&n_stream.to_le_bytes());
            let empties = stream.end + shift..stream.end + shift + added;
            buf[empties].fill(0);
        }
        buf[at - header.len()..at].copy_from_slice(&header);
        Some(at - header.len()..end)
    }

    /// The section in format v4 with one stream per cache. A v3 section gains the two fields v4
    /// added after `n_layer`, taken from `rotations` (the live context's, per cache); nothing
    /// else differs between the versions (llama-kv-cache.cpp).
    pub fn to_v4(&self, source: &[u8], rotations: &[(u32, u32)]) -> Vec<u8> {
        self.to_v4_with_v_layout(source, rotations, &[])
            .expect("no transposition asked, nothing can fail")
    }

    /// Like `to_v4`, and stores V transposed or by row as `v_trans` (per cache) asks: a pure
    /// rearrangement of elements, possible for f32, f16 and bf16 V.
    pub fn to_v4_with_v_layout(
        &self,
        source: &[u8],
        rotations: &[(u32, u32)],
        v_trans: &[bool],
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(source.len() + 16 * self.caches.len());
        for (index, cache) in self.caches.iter().enumerate() {
            out.extend_from_slice(&1u32.to_le_bytes());
            let (Some(range), Some(rot_at), Some(v_at), Some(layout)) = (
                &cache.stream_range,
                cache.rotation_offset,
                cache.v_offset,
                &cache.layout,
            ) else {
                out.extend_from_slice(&0u32.to_le_bytes());
                continue;
            };
            out.extend_from_slice(&source[range.start..rot_at]);
            let after_rotation = match self.version {
                StateVersion::V4 => rot_at + 8,
                StateVersion::V3 => rot_at,
            };
            match self.version {
                StateVersion::V4 => out.extend_from_slice(&source[rot_at..after_rotation]),
                StateVersion::V3 => {
                    let (rot_k, rot_v) = rotations.get(index).copied().unwrap_or((0, 0));
                    out.extend_from_slice(&rot_k.to_le_bytes());
                    out.extend_from_slice(&rot_v.to_le_bytes());
                }
            }
            let want_trans = v_trans.get(index).copied().unwrap_or(layout.v_trans);
            // v_trans is the word before n_layer, just ahead of the rotation fields.
            let flag_at = out.len() - 16;
            out[flag_at..flag_at + 4].copy_from_slice(&u32::from(want_trans).to_le_bytes());
            out.extend_from_slice(&source[after_rotation..v_at]);
            let v_part = &source[v_at..range.end];
            // Without V, the flag is all there is to change.
            if want_trans == layout.v_trans || !layout.has_v {
                out.extend_from_slice(v_part);
            } else {
                let cells = cache.positions.len();
                transpose_v(v_part, &layout.layers, cells, want_trans, &mut out)
                    .map_err(|e| format!("cache {index}: {e}"))?;
            }
        }
        // The recurrent section is the same in both versions and has no V.
        if let Some(recurrent) = &self.recurrent {
            out.extend_from_slice(&source[recurrent.range.clone()]);
        }
        Ok(out)
    }

    /// Compares with the live context's layouts; the error names the first difference.
    pub fn check_layout(
        &self,
        live: &[CacheLayout],
        live_recurrent: Option<&RecurrentLayout>,
    ) -> Result<(), String> {
        let mine = self.recurrent.as_ref().map(|r| &r.layout);
        if let Some(difference) = recurrent_difference(mine, live_recurrent) {
            return Err(difference);
        }
        if self.caches.len() != live.len() {
            return Err(format!(
                "the state holds {} caches, this context {}",
                self.caches.len(),
                live.len()
            ));
        }
        for (index, (cache, live)) in self.caches.iter().zip(live).enumerate() {
            if let Some(layout) = &cache.layout
                && let Some(difference) =
                    cache_difference(index, layout, live, self.version == StateVersion::V4)
            {
                return Err(difference);
            }
        }
        Ok(())
    }
}

/// Bytes per element of the ggml types V can be transposed in.
pub(crate) fn element_size(ggml_type: i32) -> Option<u64> {
    match ggml_type {
        0 => Some(4),      // f32
        1 | 30 => Some(2), // f16, bf16
        _ => None,
    }
}

/// Rewrites every layer's V between by-row (`cell × width`) and transposed (`width × cell`).
fn transpose_v(
    v_part: &[u8],
    layers: &[LayerLayout],
    cells: usize,
    to_transposed: bool,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let mut at = 0usize;
    for (index, layer) in layers.iter().enumerate() {
        let element = element_size(layer.v_type).ok_or_else(|| {
            format!(
                "layer {index} stores V as {}, which cannot be transposed",
                ggml_type_name(layer.v_type)
            )
        })? as usize;
        let row = layer.v_cell_size as usize;
        if !row.is_multiple_of(element) {
            return Err(format!(
                "layer {index}: V rows of {row} bytes are not whole elements"
            ));
        }
        let width = row / element;
        // Either header is 12 bytes: by row, type i32 + row u64; transposed, type i32 +
        // element u32 + width u32.
        let header_in = 12;
        let data = &v_part[at + header_in..at + header_in + cells * row];
        out.extend_from_slice(&layer.v_type.to_le_bytes());
        if to_transposed {
            out.extend_from_slice(&(element as u32).to_le_bytes());
            out.extend_from_slice(&(width as u32).to_le_bytes());
            for j in 0..width {
                for c in 0..cells {
                    let from = c * row + j * element;
                    out.extend_from_slice(&data[from..from + element]);
                }
            }
        } else {
            out.extend_from_slice(&(row as u64).to_le_bytes());
            for c in 0..cells {
                for j in 0..width {
                    let from = (j * cells + c) * element;
                    out.extend_from_slice(&data[from..from + element]);
                }
            }
        }
        at += header_in + cells * row;
    }
    Ok(())
}

/// The first difference between two recurrent sections' shapes, as a sentence.
pub fn recurrent_difference(
    mine: Option<&RecurrentLayout>,
    live: Option<&RecurrentLayout>,
) -> Option<String> {
    match (mine, live) {
        (None, None) => None,
        (Some(_), None) => Some("it holds a recurrent state, this context none".into()),
        (None, Some(_)) => Some("it holds no recurrent state, this context does".into()),
        (Some(a), Some(b)) if a.n_layer != b.n_layer || a.layers.len() != b.layers.len() => {
            Some(format!(
                "its recurrent state has {} of {} layers, this context {} of {}",
                a.layers.len(),
                a.n_layer,
                b.layers.len(),
                b.n_layer
            ))
        }
        (Some(a), Some(b)) => {
            a.layers
                .iter()
                .zip(&b.layers)
                .enumerate()
                .find_map(|(index, (x, y))| {
                    (x != y).then(|| {
                    format!(
                        "recurrent layer {index} keeps r/s as {} of {} bytes and {} of {}, this \
                         context {} of {} and {} of {}",
                        ggml_type_name(x.r_type),
                        x.r_row_size,
                        ggml_type_name(x.s_type),
                        x.s_row_size,
                        ggml_type_name(y.r_type),
                        y.r_row_size,
                        ggml_type_name(y.s_type),
                        y.s_row_size
                    )
                })
                })
        }
    }
}

/// The first difference between two descriptions of whole layouts, if any.
pub fn layout_difference(mine: &[CacheLayout], live: &[CacheLayout]) -> Option<String> {
    if mine.len() != live.len() {
        return Some(format!(
            "it describes {} caches, this context has {}",
            mine.len(),
            live.len()
        ));
    }
    mine.iter()
        .zip(live)
        .enumerate()
        .find_map(|(index, (a, b))| cache_difference(index, a, b, true))
}

/// The first difference between two descriptions of one cache, as a sentence.
fn cache_difference(
    index: usize,
    layout: &CacheLayout,
    live: &CacheLayout,
    check_rotation: bool,
) -> Option<String> {
    if layout.has_v != live.has_v {
        let name = |v: bool| {
            if v {
                "K and V"
            } else {
                "K only (latent attention)"
            }
        };
        return Some(format!(
            "cache {index} holds {}, this context {}",
            name(layout.has_v),
            name(live.has_v)
        ));
    }
    if layout.v_trans != live.v_trans {
        let name = |t: bool| if t { "transposed" } else { "by row" };
        return Some(format!(
            "cache {index} stores V {}, this context {}",
            name(layout.v_trans),
            name(live.v_trans)
        ));
    }
    if layout.layers.len() != live.layers.len() {
        return Some(format!(
            "cache {index} has {} layers, this context {}",
            layout.layers.len(),
            live.layers.len()
        ));
    }
    if check_rotation && (layout.n_rot_k, layout.n_rot_v) != (live.n_rot_k, live.n_rot_v) {
        return Some(format!(
            "cache {index} rotates {}/{} dimensions, this context {}/{}",
            layout.n_rot_k, layout.n_rot_v, live.n_rot_k, live.n_rot_v
        ));
    }
    for (layer, (a, b)) in layout.layers.iter().zip(&live.layers).enumerate() {
        if a.k_type != b.k_type || a.v_type != b.v_type {
            return Some(format!(
                "layer {layer} of cache {index} stores K/V as {}/{}, this context as {}/{}",
                ggml_type_name(a.k_type),
                ggml_type_name(a.v_type),
                ggml_type_name(b.k_type),
                ggml_type_name(b.v_type)
            ));
        }
        if a.k_row_size != b.k_row_size || a.v_cell_size != b.v_cell_size {
            return Some(format!(
                "layer {layer} of cache {index} has rows of {}/{} bytes, this context {}/{}",
                a.k_row_size, a.v_cell_size, b.k_row_size, b.v_cell_size
            ));
        }
    }
    None
}
