//! A sequence state cut into content-addressed pages, and put back together byte for byte.
//!
//! A page holds the rows of one cache for a run of consecutive positions `[first, end)`,
//! position by position: for each position, every layer's K row, then every layer's V row
//! (V by row whatever llama.cpp's layout: a transposed V is gathered on the way in and
//! scattered on the way out). Position-major rows make any sub-run of a page a contiguous slice
//! of it, so a page stays usable when a sliding window drops positions from its front.
//!
//! A page's id is blake3 over a salt and its bytes. The salt carries everything pages must
//! never be shared across (model, layout, compute profile, owner): identical rows of one owner
//! are stored once, and nothing is ever deduplicated across owners.
//!
//! A recurrent state (recurrent and hybrid models) has no positions: its rows — every recurrent
//! layer's r row, then every s row — are cut into pages by bytes, and a turn writes them anew
//! (its running state changed everywhere), unless they are the previous save's.
//!
//! What is not rows — the order of cells, their positions, sequence id and extensions — goes
//! into `PagedState`, which a manifest carries. `assemble` gives back exactly the normalised
//! section (one stream per cache) of the state `split` was given.

use serde::{Deserialize, Serialize};

use super::llama_state::{
    CELL_EXT_BYTES, CacheLayout, CacheState, RecurrentLayout, SequenceState, StateVersion,
    cache_section_bytes, cell_metadata_bytes, element_size, write_recurrent,
};
use super::{LayoutIdentity, ModelIdentity};

/// A page's id: blake3 of the salt and its bytes.
pub type PageId = [u8; 32];

/// Positions per page, unless a position's rows are so large that fewer keep a page under
/// `PAGE_BYTES_MAX`. For Gemma 3 270M in f16: 3 KiB a position in the full cache (192 KiB
/// pages), 15 KiB in the window cache (960 KiB pages).
pub const PAGE_POSITIONS: u32 = 64;

/// The largest page: just under 1 MiB, so the store gives each a 1 MiB page of its own
/// (`store::tables::CHUNK_BYTES`) and an object store gets objects of a sensible size.
pub const PAGE_BYTES_MAX: usize = (1 << 20) - 4096;

/// Where one page's rows lie: positions `[first, end)` of one cache, all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRef {
    pub first: u32,
    pub end: u32,
    #[serde(with = "serde_bytes")]
    pub id: PageId,
    /// `page_check` of the page's bytes, taken when the page was cut: a restore checks every
    /// page against it at a sixth of blake3's cost (measured: 13 MB in 0.7 ms against 4.1).
    /// Absent in manifests written before it existed; those pages are checked by their id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<u128>,
}

impl PageRef {
    /// Whether `other` names the same rows: the same positions and the same id.
    fn same_rows(&self, other: &PageRef) -> bool {
        (self.first, self.end, self.id) == (other.first, other.end, other.id)
    }
}

/// One cache of a paged state: its cells, and the pages that hold their rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedCache {
    /// The stream's positions in llama.cpp's cell order; empty when the cache holds none.
    pub positions: Vec<i32>,
    /// The sequence id every cell carries (llama.cpp writes the saving sequence's).
    pub seq_id: i32,
    /// Each cell's extension (`CELL_EXT_BYTES` each, cell order) for models that carry one;
    /// else empty.
    #[serde(with = "serde_bytes")]
    pub cell_ext: Vec<u8>,
    /// Ordered by `first`, not overlapping; together they cover every position in `positions`
    /// (and may cover more: a window cache keeps using a page after dropping its front).
    pub pages: Vec<PageRef>,
}

/// A recurrent state of a paged state: where it stands, and the pages of its rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedRecurrent {
    /// The position of the last token the state read; `None` when it read none (no rows).
    pub position: Option<i32>,
    /// In order; here a page's `first..end` are byte offsets within the rows, not positions.
    pub pages: Vec<PageRef>,
    /// The states of earlier turns' ends, oldest first (`keep_turn_states`): a running state
    /// cannot be cut back to a shorter history, so these are where the conversation can go
    /// back to without reading it again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<RecurrentAt>,
}

/// A recurrent state kept at an earlier turn's end: the position of the last token it read,
/// and its pages (as `PagedRecurrent::pages`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecurrentAt {
    pub position: i32,
    pub pages: Vec<PageRef>,
}

/// Keeps beside `paged`'s recurrent state up to `most` states of earlier turns' ends: the one
/// `previous` stood at and those it kept, as long as the tokens they read are still this
/// state's (positions below `unchanged_below`). Each costs no write (its pages are stored
/// already), only the room of one running state in the store while it is kept.
pub fn keep_turn_states(
    paged: &mut PagedState,
    previous: Option<&PagedState>,
    unchanged_below: u32,
    most: usize,
) {
    let (Some(now), Some(before)) = (
        paged.recurrent.as_mut(),
        previous.and_then(|p| p.recurrent.as_ref()),
    ) else {
        return;
    };
    let still_read = |position: i32| position >= 0 && (position as u32) < unchanged_below;
    let mut earlier: Vec<RecurrentAt> = before
        .earlier
        .iter()
        .filter(|e| still_read(e.position))
        .cloned()
        .collect();
    if let Some(position) = before.position.filter(|&p| still_read(p))
        && Some(position) != now.position
    {
        earlier.push(RecurrentAt {
            position,
            pages: before.pages.clone(),
        });
    }
    let extra = earlier.len().saturating_sub(most);
    earlier.drain(..extra);
    now.earlier = earlier;
}

/// A normalised memory section without its rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagedState {
    pub caches: Vec<PagedCache>,
    /// Left out of the encoding when absent, so manifests of other models stay as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrent: Option<PagedRecurrent>,
}

/// A page `split` found: its place, and its bytes unless an earlier state already had it.
#[derive(Debug, Clone)]
pub struct SplitPage {
    pub cache: usize,
    pub page: PageRef,
    /// `None` when the page is one the previous state referenced (nothing to write).
    pub bytes: Option<Vec<u8>>,
}

/// Why a state cannot be paged or assembled. Always a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PageError(pub String);

fn error(message: impl Into<String>) -> PageError {
    PageError(message.into())
}

/// The salt of every page a conversation with this identity and owner stores.
pub fn page_salt(model: &ModelIdentity, layout: &LayoutIdentity, owner: Option<&str>) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("kvsnap 2026 page salt v1");
    let mut field = |bytes: &[u8]| {
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(model.file_hash.as_bytes());
    field(layout.llama_build.as_bytes());
    field(layout.compute_profile.as_deref().unwrap_or("").as_bytes());
    field(&[
        u8::from(layout.flash_attention),
        u8::from(layout.cell_ext),
        u8::from(owner.is_some()),
    ]);
    field(&layout.n_swa.to_le_bytes());
    field(&layout.n_ubatch.to_le_bytes());
    field(&rmp_serde::to_vec(&layout.caches).expect("layouts always serialize"));
    field(owner.unwrap_or("").as_bytes());
    // Only when there is one, so the salts of models without a recurrent state stay as they were.
    if let Some(recurrent) = &layout.recurrent {
        field(&rmp_serde::to_vec(recurrent).expect("layouts always serialize"));
    }
    *hasher.finalize().as_bytes()
}

/// A page's fast checksum (xxh3-128): it tells a page damaged at rest from the page it was,
/// not one forged by whoever writes the store (the id, a cryptographic hash, does; and
/// whoever can write pages can write manifests too).
pub fn page_check(bytes: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// Whether `bytes` are the page `page` names: its recorded check when it has one, else (or if
/// that differs: a check is the manifest's claim, the id is the name) its id under `salt`.
pub fn page_matches(salt: &[u8; 32], page: &PageRef, bytes: &[u8]) -> bool {
    page.check == Some(page_check(bytes)) || page_id(salt, bytes) == page.id
}

/// A page's id under `salt`.
pub fn page_id(salt: &[u8; 32], bytes: &[u8]) -> PageId {
    let mut hasher = blake3::Hasher::new();
    hasher.update(salt);
    hasher.update(bytes);
    *hasher.finalize().as_bytes()
}

/// Where one cache's rows lie in a normalised v4 section.
struct CacheRows<'a> {
    layout: &'a CacheLayout,
    cells: usize,
    /// Per layer: where its K rows start.
    k_at: Vec<usize>,
    /// Per layer: where its V data starts.
    v_at: Vec<usize>,
    /// Bytes of one position in a page: every layer's K row and V row.
    position_bytes: usize,
}

impl<'a> CacheRows<'a> {
    fn locate(cache: &'a CacheState, cell_ext: bool) -> Option<Result<Self, PageError>> {
        let (Some(layout), Some(range)) = (&cache.layout, &cache.stream_range) else {
            return None;
        };
        let cells = cache.positions.len();
        let per_cell = cell_metadata_bytes(cell_ext);
        // cell_count, cells, v_trans, n_layer, n_rot_k, n_rot_v
        let mut at = range.start + 4 + cells * per_cell + 16;
        let mut k_at = Vec::with_capacity(layout.layers.len());
        for layer in &layout.layers {
            k_at.push(at + 12);
            at += 12 + cells * layer.k_row_size as usize;
        }
        let mut v_at = Vec::with_capacity(layout.layers.len());
        for layer in layout.layers.iter().filter(|_| layout.has_v) {
            v_at.push(at + 12);
            at += 12 + cells * layer.v_cell_size as usize;
        }
        if at != range.end {
            return Some(Err(error(
                "the state's rows do not add up to its stream (not a v4 section?)",
            )));
        }
        if layout.v_trans
            && layout.has_v
            && let Some(bad) = layout
                .layers
                .iter()
                .find(|l| element_size(l.v_type).is_none())
        {
            return Some(Err(error(format!(
                "V of type {} is stored transposed and cannot be paged",
                super::llama_state::ggml_type_name(bad.v_type)
            ))));
        }
        let position_bytes = layout
            .layers
            .iter()
            .map(|l| (l.k_row_size + l.v_cell_size) as usize)
            .sum();
        Some(Ok(CacheRows {
            layout,
            cells,
            k_at,
            v_at,
            position_bytes,
        }))
    }

    /// Fills `page` with the rows of `cells` (one cell per position of the page, in order),
    /// from `section`. A transposed V is read column by column, each column once and in order,
    /// and written down the page's rows: a whole page at a time, because element by element
    /// per position it was the slowest part of a save.
    fn fill_page(&self, section: &[u8], cells: &[usize], page: &mut [u8]) {
        let stride = self.position_bytes;
        let mut at = 0;
        for (layer, &k_at) in self.layout.layers.iter().zip(&self.k_at) {
            let row = layer.k_row_size as usize;
            for (k, &cell) in cells.iter().enumerate() {
                page[k * stride + at..][..row]
                    .copy_from_slice(&section[k_at + cell * row..][..row]);
            }
            at += row;
        }
        for (layer, &v_at) in self.layout.layers.iter().zip(&self.v_at) {
            let size = layer.v_cell_size as usize;
            if self.layout.v_trans {
                // V is `width × cells` elements: column j holds element j of every cell.
                let element = element_size(layer.v_type).expect("checked in locate") as usize;
                let v_part = &section[v_at..][..size * self.cells];
                match element {
                    2 => gather_columns::<2>(v_part, self.cells, cells, page, at, stride),
                    _ => gather_columns::<4>(v_part, self.cells, cells, page, at, stride),
                }
            } else {
                for (k, &cell) in cells.iter().enumerate() {
                    page[k * stride + at..][..size]
                        .copy_from_slice(&section[v_at + cell * size..][..size]);
                }
            }
            at += size;
        }
    }

    /// Positions per page for this cache.
    fn page_positions(&self) -> u32 {
        let fit = PAGE_BYTES_MAX / self.position_bytes.max(1);
        (fit as u32).clamp(1, PAGE_POSITIONS)
    }
}

/// Writes V of `cells` (one per page position) from a transposed `v_part` (`width × n_cells`
/// elements of `E` bytes) into the page's rows: element j of position k's row lands at
/// `at + j·E` of row k (rows `stride` bytes apart). Whole elements as `[u8; E]` values: a
/// byte-slice copy per element made this the slowest part of a save.
fn gather_columns<const E: usize>(
    v_part: &[u8],
    n_cells: usize,
    cells: &[usize],
    page: &mut [u8],
    at: usize,
    stride: usize,
) {
    let (columns, _) = v_part.as_chunks::<E>();
    let width = columns.len() / n_cells.max(1);
    for (k, &cell) in cells.iter().enumerate() {
        let (row, _) = page[k * stride + at..][..width * E].as_chunks_mut::<E>();
        for (j, slot) in row.iter_mut().enumerate() {
            *slot = columns[j * n_cells + cell];
        }
    }
}

/// The reverse: each cell's V row (`rows[c]`, `width` elements of `E` bytes) goes down column
/// c of `data` (`width × cells` elements). Moved in tiles of `CELLS` cells by `ELEMENTS`
/// elements: a tile's rows are read as whole runs and its columns written as whole runs, which
/// the compiler turns into vector loads, shuffles and stores. Tiles as wide as a cache line of
/// each column (64 cells of 2 bytes, 32 of 4) write whole lines; measured on Gemma 3's caches,
/// 2-byte elements moved 1.4x faster in 64 × 16 tiles than in 16 × 16, 2.2x faster than 8 × 8.
fn scatter_columns<const E: usize, const CELLS: usize, const ELEMENTS: usize>(
    rows: &[&[u8]],
    data: &mut [u8],
) {
    let cells = rows.len();
    let (out, _) = data.as_chunks_mut::<E>();
    let rows: Vec<&[[u8; E]]> = rows.iter().map(|r| r.as_chunks::<E>().0).collect();
    let width = rows.first().map_or(0, |r| r.len());
    let tiled_cells = cells / CELLS * CELLS;
    let tiled_width = width / ELEMENTS * ELEMENTS;
    for c in (0..tiled_cells).step_by(CELLS) {
        let tile_rows = &rows[c..c + CELLS];
        for j in (0..tiled_width).step_by(ELEMENTS) {
            let tile: [[[u8; E]; ELEMENTS]; CELLS] =
                std::array::from_fn(|i| tile_rows[i][j..j + ELEMENTS].try_into().expect("a tile"));
            for k in 0..ELEMENTS {
                let column: [[u8; E]; CELLS] = std::array::from_fn(|i| tile[i][k]);
                out[(j + k) * cells + c..][..CELLS].copy_from_slice(&column);
            }
        }
        for j in tiled_width..width {
            for (i, row) in tile_rows.iter().enumerate() {
                out[j * cells + c + i] = row[j];
            }
        }
    }
    for (c, row) in rows.iter().enumerate().skip(tiled_cells) {
        for (j, element) in row.iter().enumerate() {
            out[j * cells + c] = *element;
        }
    }
}

/// Cuts a v4 section into pages: normalised (one stream per cache, as snapshots keep it) or as
/// llama.cpp wrote it (one stream per context sequence, all but one empty).
///
/// `previous` is the state the conversation had before (its last manifest), if any: a page it
/// already references is not written again, and a page whose rows are a sub-run of one of its
/// pages (a window cache that dropped its front) reuses that page, after `read_page` gave its
/// bytes and they were compared. Positions below `unchanged_below` hold the same rows as in
/// `previous` (the engine knows: nothing there was trimmed or decoded again since), so a run of
/// them that a previous page covers takes that page without being copied, hashed or compared:
/// a save costs what is new, not the whole history again. Pages come back in manifest order.
pub fn split(
    state: &SequenceState,
    section: &[u8],
    cell_ext: bool,
    salt: &[u8; 32],
    previous: Option<&PagedState>,
    unchanged_below: u32,
    read_page: &mut dyn FnMut(&PageId) -> Option<Vec<u8>>,
) -> Result<(PagedState, Vec<SplitPage>), PageError> {
    if state.version != StateVersion::V4 {
        return Err(error("only v4 sections are paged"));
    }
    let mut paged = PagedState {
        caches: Vec::new(),
        recurrent: None,
    };
    let mut pages = Vec::new();
    for (index, cache) in state.caches.iter().enumerate() {
        let Some(rows) = CacheRows::locate(cache, cell_ext) else {
            paged.caches.push(PagedCache {
                positions: Vec::new(),
                seq_id: 0,
                cell_ext: Vec::new(),
                pages: Vec::new(),
            });
            continue;
        };
        let rows = rows?;
        let range = cache.stream_range.clone().expect("located");
        let (seq_id, ext) = cell_metadata(section, range.start + 4, rows.cells, cell_ext)?;
        let before = previous.and_then(|p| p.caches.get(index));
        let mut cache_pages = Vec::new();
        let cell_of = cell_index(&cache.positions);
        // One buffer for every page: most pages of a later save are unchanged and only
        // hashed, and fresh megabytes cost a page fault per 4 KiB. A new page is copied out.
        let mut bytes = Vec::new();
        for (first, end) in runs(&cache.positions, rows.page_positions()) {
            let unchanged = before
                .filter(|_| end <= unchanged_below)
                .and_then(|b| b.pages.iter().find(|p| p.first <= first && end <= p.end));
            if let Some(page) = unchanged {
                cache_pages.push(page.clone());
                pages.push(SplitPage {
                    cache: index,
                    page: page.clone(),
                    bytes: None,
                });
                continue;
            }
            bytes.clear();
            bytes.resize((end - first) as usize * rows.position_bytes, 0);
            let cells: Vec<usize> = (first..end).map(|p| cell_of[&(p as i32)]).collect();
            rows.fill_page(section, &cells, &mut bytes);
            let page = PageRef {
                first,
                end,
                id: page_id(salt, &bytes),
                check: Some(page_check(&bytes)),
            };
            let found = before
                .and_then(|b| reuse(b, &page, &bytes, rows.position_bytes, salt, &mut *read_page));
            let (page, bytes) = match found {
                Some(old) => (old, None),
                None => (page, Some(bytes.clone())),
            };
            cache_pages.push(page.clone());
            pages.push(SplitPage {
                cache: index,
                page,
                bytes,
            });
        }
        paged.caches.push(PagedCache {
            positions: cache.positions.clone(),
            seq_id,
            cell_ext: ext,
            pages: cache_pages,
        });
    }
    if let Some(recurrent) = &state.recurrent {
        let before = previous.and_then(|p| p.recurrent.as_ref());
        let rows = recurrent.rows(section);
        let mut refs = Vec::new();
        for (chunk, first) in rows
            .chunks(PAGE_BYTES_MAX)
            .zip((0..).step_by(PAGE_BYTES_MAX))
        {
            let page = PageRef {
                first: first as u32,
                end: (first + chunk.len()) as u32,
                id: page_id(salt, chunk),
                check: Some(page_check(chunk)),
            };
            let known = before.is_some_and(|b| b.pages.iter().any(|p| p.same_rows(&page)));
            refs.push(page.clone());
            pages.push(SplitPage {
                cache: state.caches.len(),
                page,
                bytes: (!known).then(|| chunk.to_vec()),
            });
        }
        paged.recurrent = Some(PagedRecurrent {
            position: recurrent.position,
            pages: refs,
            earlier: Vec::new(),
        });
    }
    Ok((paged, pages))
}

/// The previous page that holds exactly these rows: the same page, or one whose sub-run they
/// are (checked byte for byte against its stored bytes, which must match their own id).
fn reuse(
    before: &PagedCache,
    page: &PageRef,
    bytes: &[u8],
    position_bytes: usize,
    salt: &[u8; 32],
    read_page: &mut dyn FnMut(&PageId) -> Option<Vec<u8>>,
) -> Option<PageRef> {
    if before.pages.iter().any(|p| p.same_rows(page)) {
        return Some(page.clone());
    }
    let wider = before.pages.iter().find(|p| {
        p.first <= page.first && page.end <= p.end && (p.first, p.end) != (page.first, page.end)
    })?;
    let stored = read_page(&wider.id)?;
    if !page_matches(salt, wider, &stored) {
        return None;
    }
    let from = (page.first - wider.first) as usize * position_bytes;
    let to = (page.end - wider.first) as usize * position_bytes;
    (stored.get(from..to) == Some(bytes)).then(|| wider.clone())
}

/// Runs of consecutive positions, cut at multiples of `per_page`: one page each.
fn runs(positions: &[i32], per_page: u32) -> Vec<(u32, u32)> {
    let mut sorted: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
    sorted.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::new();
    for position in sorted {
        match out.last_mut() {
            Some((_, end)) if *end == position && position % per_page != 0 => *end += 1,
            _ => out.push((position, position + 1)),
        }
    }
    out
}

fn cell_index(positions: &[i32]) -> std::collections::HashMap<i32, usize> {
    positions
        .iter()
        .enumerate()
        .map(|(cell, &p)| (p, cell))
        .collect()
}

/// The sequence id all cells share, and their extensions.
fn cell_metadata(
    section: &[u8],
    at: usize,
    cells: usize,
    cell_ext: bool,
) -> Result<(i32, Vec<u8>), PageError> {
    let per_cell = cell_metadata_bytes(cell_ext);
    let word = |at: usize| i32::from_le_bytes(section[at..at + 4].try_into().expect("4 bytes"));
    let mut seq_id = None;
    let mut ext = Vec::new();
    for cell in 0..cells {
        let cell_at = at + cell * per_cell;
        if cell_ext {
            // After the position and the sequence count.
            ext.extend_from_slice(&section[cell_at + 8..cell_at + 8 + CELL_EXT_BYTES]);
        }
        let seq = word(cell_at + per_cell - 4);
        match seq_id {
            None => seq_id = Some(seq),
            Some(first) if first != seq => {
                return Err(error("the state's cells carry different sequence ids"));
            }
            Some(_) => {}
        }
    }
    Ok((seq_id.unwrap_or(0), ext))
}

/// Writes the normalised section `split` was given, from `paged`, the caches' layouts (the
/// snapshot's) and the pages (`page` gives a page's bytes, already checked against its id),
/// into `out` from byte `at` on: bytes before `at` are kept, and `out` ends where the section
/// ends. What lay in `out` from `at` on is overwritten, never cleared first: every byte of the
/// section is written, so a reused buffer costs no zero-filling pass.
pub fn assemble<'p>(
    paged: &PagedState,
    layouts: &[CacheLayout],
    recurrent: Option<&RecurrentLayout>,
    cell_ext: bool,
    page: &dyn Fn(&PageId) -> Option<&'p [u8]>,
    out: &mut Vec<u8>,
    at: usize,
) -> Result<(), PageError> {
    if paged.caches.len() != layouts.len() {
        return Err(error(format!(
            "the manifest describes {} caches, its layout {}",
            paged.caches.len(),
            layouts.len()
        )));
    }
    // Every cell's rows first, each a slice of a page found: the manifest may be a stranger's,
    // so the room reserved (at once: growing megabytes step by step copies them each time) is
    // what those pages hold, never what the manifest claims.
    let mut caches = Vec::with_capacity(paged.caches.len());
    let mut room = 0usize;
    for (index, (cache, layout)) in paged.caches.iter().zip(layouts).enumerate() {
        let rows = cell_rows(index, cache, layout, page)?;
        room = room.saturating_add(cache_section_bytes(
            rows.cells.len(),
            layout.layers.len(),
            rows.position_bytes,
            cell_ext,
        ));
        caches.push(rows);
    }
    out.reserve(at.saturating_add(room).saturating_sub(out.len()));
    let mut out = Overwriter { out, at };
    for (index, ((cache, layout), rows)) in paged.caches.iter().zip(layouts).zip(caches).enumerate()
    {
        let cell_rows = rows.cells;
        out.put(&1u32.to_le_bytes());
        let cells = cache.positions.len();
        out.put(&(cells as u32).to_le_bytes());
        if cells == 0 {
            continue;
        }
        if cell_ext && cache.cell_ext.len() != CELL_EXT_BYTES * cells {
            return Err(error(format!("cache {index} lacks its cells' extensions")));
        }
        for (cell, &position) in cache.positions.iter().enumerate() {
            out.put(&position.to_le_bytes());
            out.put(&1u32.to_le_bytes());
            if cell_ext {
                let at = CELL_EXT_BYTES * cell;
                out.put(&cache.cell_ext[at..at + CELL_EXT_BYTES]);
            }
            out.put(&cache.seq_id.to_le_bytes());
        }
        out.put(&u32::from(layout.v_trans).to_le_bytes());
        out.put(&(layout.layers.len() as u32).to_le_bytes());
        out.put(&layout.n_rot_k.to_le_bytes());
        out.put(&layout.n_rot_v.to_le_bytes());

        let mut offset = 0;
        for layer in &layout.layers {
            let row = layer.k_row_size as usize;
            out.put(&layer.k_type.to_le_bytes());
            out.put(&layer.k_row_size.to_le_bytes());
            for rows in &cell_rows {
                out.put(&rows[offset..offset + row]);
            }
            offset += row;
        }
        for layer in layout.layers.iter().filter(|_| layout.has_v) {
            let size = layer.v_cell_size as usize;
            out.put(&layer.v_type.to_le_bytes());
            if layout.v_trans {
                let element = element_size(layer.v_type).ok_or_else(|| {
                    error(format!("cache {index}: a transposed V of an unknown type"))
                })? as usize;
                let width = size / element;
                out.put(&(element as u32).to_le_bytes());
                out.put(&(width as u32).to_le_bytes());
                let data = out.next(width * cells * element);
                let rows_v: Vec<&[u8]> = cell_rows
                    .iter()
                    .map(|r| &r[offset..offset + size])
                    .collect();
                match element {
                    2 => scatter_columns::<2, 64, 16>(&rows_v, data),
                    _ => scatter_columns::<4, 32, 8>(&rows_v, data),
                }
            } else {
                out.put(&layer.v_cell_size.to_le_bytes());
                for rows in &cell_rows {
                    out.put(&rows[offset..offset + size]);
                }
            }
            offset += size;
        }
    }
    match (&paged.recurrent, recurrent) {
        (None, None) => {}
        (Some(state), Some(layout)) => {
            let rows = recurrent_rows(state, layout, page)?;
            write_recurrent(layout, state.position, &rows, &mut |piece| out.put(piece))
                .map_err(error)?;
        }
        _ => {
            return Err(error(
                "the manifest and its layout disagree on whether there is a recurrent state",
            ));
        }
    }
    let end = out.at;
    out.out.truncate(end);
    Ok(())
}

/// A recurrent state's rows, from its pages in order; each page must lie where it says, one
/// after another, and together they must be exactly the layout's rows. The manifest may be a
/// stranger's: the room reserved is what the pages found hold, never what it claims.
fn recurrent_rows<'p>(
    state: &PagedRecurrent,
    layout: &RecurrentLayout,
    page: &dyn Fn(&PageId) -> Option<&'p [u8]>,
) -> Result<Vec<u8>, PageError> {
    let expected = if state.position.is_some() {
        layout.row_bytes()
    } else {
        0
    };
    let mut found = Vec::with_capacity(state.pages.len());
    let mut at = 0u64;
    for reference in &state.pages {
        let bytes =
            page(&reference.id).ok_or_else(|| error("the recurrent state: a page is missing"))?;
        let end = at + bytes.len() as u64;
        if (u64::from(reference.first), u64::from(reference.end)) != (at, end) || end > expected {
            return Err(error(
                "the recurrent state: a page lies where it should not",
            ));
        }
        found.push(bytes);
        at = end;
    }
    if at != expected {
        return Err(error(format!(
            "the recurrent state's pages hold {at} bytes, its layout {expected}"
        )));
    }
    Ok(found.concat())
}

/// Writes forward through a buffer from `at`, over what lies there, growing it (zero-filled)
/// only where it ends.
struct Overwriter<'o> {
    out: &'o mut Vec<u8>,
    at: usize,
}

impl Overwriter<'_> {
    /// The next `n` bytes, to be written whole by the caller.
    fn next(&mut self, n: usize) -> &mut [u8] {
        let end = self.at + n;
        if self.out.len() < end {
            self.out.resize(end, 0);
        }
        let slice = &mut self.out[self.at..end];
        self.at = end;
        slice
    }

    fn put(&mut self, bytes: &[u8]) {
        self.next(bytes.len()).copy_from_slice(bytes);
    }
}

/// One cache's cells' rows, each a slice of the page that holds its position.
struct CellRows<'p> {
    /// Bytes of one position in a page: every layer's K row and V row.
    position_bytes: usize,
    cells: Vec<&'p [u8]>,
}

/// Finds every cell's rows in its page. The layout's row sizes are the manifest's claim: their
/// sum must be a real size, and each page must hold exactly that much per position, so every
/// row sliced out of a cell's rows afterwards lies within them.
fn cell_rows<'p>(
    index: usize,
    cache: &PagedCache,
    layout: &CacheLayout,
    page: &dyn Fn(&PageId) -> Option<&'p [u8]>,
) -> Result<CellRows<'p>, PageError> {
    let position_bytes = layout
        .layers
        .iter()
        .try_fold(0u64, |sum, l| {
            sum.checked_add(l.k_row_size)?.checked_add(l.v_cell_size)
        })
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| error(format!("cache {index}: its rows are too large to be real")))?;
    let mut cells = Vec::with_capacity(cache.positions.len());
    for &position in &cache.positions {
        let position = u32::try_from(position)
            .map_err(|_| error(format!("cache {index} holds a negative position")))?;
        let at = cache.pages.partition_point(|p| p.end <= position);
        let Some(holder) = cache.pages.get(at).filter(|p| p.first <= position) else {
            return Err(error(format!(
                "cache {index}: no page holds position {position}"
            )));
        };
        let bytes =
            page(&holder.id).ok_or_else(|| error(format!("cache {index}: a page is missing")))?;
        let expected = ((holder.end - holder.first) as usize).checked_mul(position_bytes);
        if expected != Some(bytes.len()) {
            return Err(error(format!("cache {index}: a page has the wrong size")));
        }
        let from = (position - holder.first) as usize * position_bytes;
        cells.push(&bytes[from..from + position_bytes]);
    }
    Ok(CellRows {
        position_bytes,
        cells,
    })
}

impl PagedState {
    /// Every page id the state references, once per reference.
    pub fn page_ids(&self) -> impl Iterator<Item = &PageId> {
        self.page_refs().map(|p| &p.id)
    }

    /// Every page reference, in manifest order: the state's own, then its kept turn ends'.
    pub fn page_refs(&self) -> impl Iterator<Item = &PageRef> {
        let earlier = self
            .recurrent
            .iter()
            .flat_map(|r| r.earlier.iter().flat_map(|e| e.pages.iter()));
        self.state_refs().chain(earlier)
    }

    /// The page references the state itself is assembled from: every cache's and the recurrent
    /// state's own, not those of the turn ends it keeps (`page_refs` has those too, as the store
    /// counts them). A restore reads and checks only these.
    pub fn state_refs(&self) -> impl Iterator<Item = &PageRef> {
        let recurrent = self.recurrent.iter().flat_map(|r| r.pages.iter());
        self.caches
            .iter()
            .flat_map(|c| c.pages.iter())
            .chain(recurrent)
    }

    /// The state as it stood at its latest kept turn end within the first `most` tokens
    /// (`PagedRecurrent::earlier`): each cache's cells before it, and that turn's running
    /// state. Returns it and how many tokens it holds; `None` when no kept turn end lies
    /// within them.
    pub fn at_turn_end(&self, most: usize) -> Option<(PagedState, usize)> {
        let recurrent = self.recurrent.as_ref()?;
        let at = recurrent
            .earlier
            .iter()
            .rposition(|e| e.position >= 0 && (e.position as usize) < most)?;
        let end = &recurrent.earlier[at];
        let tokens = end.position as usize + 1;
        let caches = self.caches.iter().map(|c| c.before(tokens)).collect();
        let state = PagedState {
            caches,
            recurrent: Some(PagedRecurrent {
                position: Some(end.position),
                pages: end.pages.clone(),
                earlier: recurrent.earlier[..at].to_vec(),
            }),
        };
        Some((state, tokens))
    }
}

impl PagedCache {
    /// The cache holding only its cells before position `end` (in the same order), and the
    /// pages that hold them.
    fn before(&self, end: usize) -> PagedCache {
        let keep: Vec<usize> = (0..self.positions.len())
            .filter(|&cell| (self.positions[cell].max(0) as usize) < end)
            .collect();
        // A manifest whose extensions are short assembles to an error, not a panic here.
        let ext = |cell: usize| {
            self.cell_ext
                .get(cell * CELL_EXT_BYTES..(cell + 1) * CELL_EXT_BYTES)
                .unwrap_or_default()
        };
        PagedCache {
            positions: keep.iter().map(|&cell| self.positions[cell]).collect(),
            seq_id: self.seq_id,
            cell_ext: keep.iter().flat_map(|&cell| ext(cell)).copied().collect(),
            pages: self
                .pages
                .iter()
                .filter(|p| (p.first as usize) < end)
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::super::llama_state::{self, LayerLayout, ParseOptions};
    use super::*;

    fn parse(bytes: &[u8], n_caches: usize) -> SequenceState {
        let options = ParseOptions {
            version: StateVersion::V4,
            shape: llama_state::Shape {
                n_caches,
                cell_ext: false,
                has_v: true,
                recurrent: false,
            },
            max_cells: 1 << 20,
        };
        llama_state::parse(bytes, options).expect("a well-formed section")
    }

    const V4: &[u8] = include_bytes!("../../tests/fixtures/llama-cpp/lighthouse.v4.ggsq");
    const SALT: [u8; 32] = [7; 32];

    /// One synthetic cache: its cells' positions in cell order, layers as (K row, V row) bytes.
    struct Cache {
        positions: Vec<i32>,
        layers: Vec<(u64, u64)>,
        v_trans: bool,
    }

    /// A byte of the row of (cache, layer, K or V, position): a position's rows never change.
    fn row_byte(cache: usize, layer: usize, v: bool, position: i32, at: usize) -> u8 {
        let mixed = (cache * 131 + layer * 31 + usize::from(v) * 17) as u64
            ^ (position as u64).wrapping_mul(0x9e37_79b9)
            ^ (at as u64).wrapping_mul(0x85eb_ca6b);
        (mixed ^ (mixed >> 13)) as u8
    }

    /// A normalised v4 section as llama.cpp writes it for these caches (f16 K and V).
    fn section(caches: &[Cache]) -> Vec<u8> {
        let mut out = Vec::new();
        let word = |out: &mut Vec<u8>, w: u32| out.extend_from_slice(&w.to_le_bytes());
        for (index, cache) in caches.iter().enumerate() {
            word(&mut out, 1);
            word(&mut out, cache.positions.len() as u32);
            if cache.positions.is_empty() {
                continue;
            }
            for &p in &cache.positions {
                word(&mut out, p as u32);
                word(&mut out, 1);
                word(&mut out, 3);
            }
            word(&mut out, u32::from(cache.v_trans));
            word(&mut out, cache.layers.len() as u32);
            word(&mut out, 256);
            word(&mut out, 256);
            for (layer, &(k_row, _)) in cache.layers.iter().enumerate() {
                word(&mut out, 1);
                out.extend_from_slice(&k_row.to_le_bytes());
                for &p in &cache.positions {
                    out.extend((0..k_row as usize).map(|at| row_byte(index, layer, false, p, at)));
                }
            }
            for (layer, &(_, v_row)) in cache.layers.iter().enumerate() {
                word(&mut out, 1);
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
                        out.extend(
                            (0..v_row as usize).map(|at| row_byte(index, layer, true, p, at)),
                        );
                    }
                }
            }
        }
        out
    }

    fn layouts(state: &SequenceState, template: &[CacheLayout]) -> Vec<CacheLayout> {
        state
            .caches
            .iter()
            .zip(template)
            .map(|(c, t)| c.layout.clone().unwrap_or_else(|| t.clone()))
            .collect()
    }

    /// `paged` assembled from the pages in `store`, with `layouts`.
    fn assembled(
        paged: &PagedState,
        layouts: &[CacheLayout],
        store: &HashMap<PageId, Vec<u8>>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        assemble(
            paged,
            layouts,
            None,
            false,
            &|id| store.get(id).map(Vec::as_slice),
            &mut out,
            0,
        )
        .expect("assembles");
        out
    }

    /// Splits and assembles again; returns the pages (all bytes kept) and the paged state.
    fn round_trip(bytes: &[u8], n_caches: usize) -> (PagedState, HashMap<PageId, Vec<u8>>) {
        let state = parse(bytes, n_caches);
        let (paged, pages) =
            split(&state, bytes, false, &SALT, None, 0, &mut |_| None).expect("pages");
        let store: HashMap<PageId, Vec<u8>> = pages
            .into_iter()
            .map(|p| (p.page.id, p.bytes.expect("a first split writes every page")))
            .collect();
        for (id, bytes) in &store {
            assert_eq!(page_id(&SALT, bytes), *id);
            assert!(bytes.len() <= PAGE_BYTES_MAX);
        }
        let template: Vec<CacheLayout> = state
            .caches
            .iter()
            .filter_map(|c| c.layout.clone())
            .collect();
        assert_eq!(
            assembled(&paged, &layouts(&state, &template), &store),
            bytes,
            "assembly gives back exactly the bytes split was given"
        );
        // Into a reused buffer (longer, full of other bytes), after a kept prefix: the prefix
        // stays, every byte of the section is written, and the buffer ends where it ends.
        for reused_len in [0, 5, bytes.len() / 2, bytes.len() + 100] {
            let mut reused = vec![0xee; reused_len.max(3)];
            reused[..3].copy_from_slice(b"pre");
            assemble(
                &paged,
                &layouts(&state, &template),
                None,
                false,
                &|id| store.get(id).map(Vec::as_slice),
                &mut reused,
                3,
            )
            .expect("assembles");
            assert_eq!(&reused[..3], b"pre");
            assert_eq!(&reused[3..], bytes, "reused buffer of {reused_len} bytes");
        }
        (paged, store)
    }

    fn fixture_section() -> &'static [u8] {
        let count = u32::from_le_bytes(V4[8..12].try_into().unwrap()) as usize;
        &V4[12 + 4 * count..]
    }

    #[test]
    fn llama_cpps_own_state_pages_and_assembles_byte_for_byte_by_row_and_transposed() {
        let by_row = fixture_section();
        let (paged, store) = round_trip(by_row, 2);
        // 50 positions: one page per cache.
        assert_eq!(paged.caches.iter().map(|c| c.pages.len()).sum::<usize>(), 2);
        let state = parse(by_row, 2);
        let transposed = state
            .to_v4_with_v_layout(by_row, &[(256, 256), (256, 256)], &[true, true])
            .unwrap();
        let (paged_t, store_t) = round_trip(&transposed, 2);
        // V by row in pages whatever the layout: the same rows, the same pages.
        assert_eq!(paged_t.caches[0].pages, paged.caches[0].pages);
        assert_eq!(store_t, store);
    }

    #[test]
    fn shuffled_cells_a_window_subset_and_holes_assemble_exactly() {
        let layers = vec![(512, 512), (512, 512), (64, 64)];
        for v_trans in [false, true] {
            // A full cache in cell order 0..300, a window cache holding 170..300 in ring order,
            // and an empty third cache.
            let ring: Vec<i32> = (250..300).chain(170..250).collect();
            let caches = [
                Cache {
                    positions: (0..300).collect(),
                    layers: layers.clone(),
                    v_trans,
                },
                Cache {
                    positions: ring,
                    layers: layers.clone(),
                    v_trans,
                },
                Cache {
                    positions: vec![5, 6, 7, 40, 41, 100],
                    layers: layers.clone(),
                    v_trans,
                },
            ];
            let bytes = section(&caches);
            let (paged, _) = round_trip(&bytes, 3);
            let runs: Vec<(u32, u32)> = paged.caches[1]
                .pages
                .iter()
                .map(|p| (p.first, p.end))
                .collect();
            assert_eq!(runs, [(170, 192), (192, 256), (256, 300)]);
            let holes: Vec<(u32, u32)> = paged.caches[2]
                .pages
                .iter()
                .map(|p| (p.first, p.end))
                .collect();
            assert_eq!(holes, [(5, 8), (40, 42), (100, 101)]);
        }
    }

    #[test]
    fn turn_ends_are_kept_while_their_tokens_are_and_a_state_goes_back_to_them() {
        let page = |first: u32, end: u32, n: u8| PageRef {
            first,
            end,
            id: [n; 32],
            check: None,
        };
        let turn = |position: i32, n: u8| PagedState {
            caches: vec![PagedCache {
                positions: (0..=position).collect(),
                seq_id: 0,
                cell_ext: Vec::new(),
                pages: vec![page(0, 64, 100), page(64, 128, 101)],
            }],
            recurrent: Some(PagedRecurrent {
                position: Some(position),
                pages: vec![page(0, 4, n)],
                earlier: Vec::new(),
            }),
        };
        let kept = |state: &PagedState| -> Vec<i32> {
            let earlier = &state.recurrent.as_ref().unwrap().earlier;
            earlier.iter().map(|e| e.position).collect()
        };
        // Turns continuing each other: the last two turn ends before each are kept.
        let mut t1 = turn(9, 1);
        keep_turn_states(&mut t1, None, 0, 2);
        let mut t2 = turn(39, 2);
        keep_turn_states(&mut t2, Some(&t1), 10, 2);
        let mut t3 = turn(99, 3);
        keep_turn_states(&mut t3, Some(&t2), 40, 2);
        let mut t4 = turn(119, 4);
        keep_turn_states(&mut t4, Some(&t3), 100, 2);
        assert_eq!(
            (kept(&t1), kept(&t2), kept(&t3)),
            (vec![], vec![9], vec![9, 39])
        );
        assert_eq!(kept(&t4), vec![39, 99]);
        assert!(
            t4.page_ids().any(|id| *id == [3; 32]),
            "kept states' pages are referenced"
        );
        assert!(
            !t4.state_refs().any(|p| p.id == [3; 32]),
            "but not read to assemble the state"
        );
        // A turn that rewrote the history from token 50 on keeps only the turn ends before.
        let mut rewritten = turn(109, 5);
        keep_turn_states(&mut rewritten, Some(&t4), 50, 2);
        assert_eq!(kept(&rewritten), vec![39]);

        // Going back: the latest kept turn end within the tokens, its cells and pages only.
        let (back, tokens) = t4.at_turn_end(100).unwrap();
        assert_eq!(tokens, 100);
        assert_eq!(back.caches[0].positions, (0..100).collect::<Vec<_>>());
        assert_eq!(back.caches[0].pages.len(), 2);
        let recurrent = back.recurrent.as_ref().unwrap();
        assert_eq!(
            (recurrent.position, recurrent.pages[0].id),
            (Some(99), [3; 32])
        );
        assert_eq!(kept(&back), vec![39]);
        let (back, tokens) = t4.at_turn_end(99).unwrap();
        assert_eq!((tokens, back.caches[0].pages.len()), (40, 1));
        assert!(t4.at_turn_end(39).is_none());
    }

    /// A hybrid's section: one cache, then a recurrent state whose rows span several pages.
    #[test]
    fn a_recurrent_state_pages_by_bytes_and_a_repeated_save_writes_nothing_new() {
        let mut bytes = section(&[Cache {
            positions: (0..70).collect(),
            layers: vec![(64, 64)],
            v_trans: false,
        }]);
        let rows = 700_000u64;
        let word = |out: &mut Vec<u8>, w: u32| out.extend_from_slice(&w.to_le_bytes());
        for w in [1, 69, 0, 0, 3] {
            word(&mut bytes, w);
        }
        for (layer, row) in [(0u8, rows), (1, rows), (2, 16), (3, 16)] {
            word(&mut bytes, 0);
            bytes.extend_from_slice(&row.to_le_bytes());
            bytes.extend((0..row).map(|at| (at as u8) ^ layer));
        }
        let options = ParseOptions {
            version: StateVersion::V4,
            shape: llama_state::Shape {
                n_caches: 1,
                cell_ext: false,
                has_v: true,
                recurrent: true,
            },
            max_cells: 1 << 20,
        };
        let state = llama_state::parse(&bytes, options).unwrap();
        let recurrent = state.recurrent.as_ref().unwrap();
        let (paged, pages) = split(&state, &bytes, false, &SALT, None, 0, &mut |_| None).unwrap();
        let store: HashMap<PageId, Vec<u8>> = pages
            .iter()
            .map(|p| (p.page.id, p.bytes.clone().unwrap()))
            .collect();
        let recurrent_pages = &paged.recurrent.as_ref().unwrap().pages;
        assert_eq!(
            recurrent_pages.len(),
            2,
            "1.4 MB of rows in pages under 1 MiB"
        );
        assert!(store.values().all(|p| p.len() <= PAGE_BYTES_MAX));
        let layouts = vec![state.caches[0].layout.clone().unwrap()];
        let mut out = Vec::new();
        let found = |id: &PageId| store.get(id).map(Vec::as_slice);
        assemble(
            &paged,
            &layouts,
            Some(&recurrent.layout),
            false,
            &found,
            &mut out,
            0,
        )
        .unwrap();
        assert_eq!(out, bytes);
        // Without its recurrent layout, or with pages out of order, it does not assemble.
        assert!(assemble(&paged, &layouts, None, false, &found, &mut out, 0).is_err());
        let mut swapped = paged.clone();
        swapped.recurrent.as_mut().unwrap().pages.swap(0, 1);
        assert!(
            assemble(
                &swapped,
                &layouts,
                Some(&recurrent.layout),
                false,
                &found,
                &mut out,
                0
            )
            .is_err()
        );

        // The same state saved again references the same pages and writes none.
        let (again, pages) = split(&state, &bytes, false, &SALT, Some(&paged), 70, &mut |_| {
            None
        })
        .unwrap();
        assert_eq!(again, paged);
        assert!(pages.iter().all(|p| p.bytes.is_none()));
    }

    #[test]
    fn an_empty_cache_pages_to_nothing_and_back() {
        let caches = [
            Cache {
                positions: (0..10).collect(),
                layers: vec![(64, 64)],
                v_trans: true,
            },
            Cache {
                positions: Vec::new(),
                layers: vec![(64, 64)],
                v_trans: true,
            },
        ];
        let bytes = section(&caches);
        let state = parse(&bytes, 2);
        let (paged, pages) = split(&state, &bytes, false, &SALT, None, 0, &mut |_| None).unwrap();
        assert!(paged.caches[1].pages.is_empty());
        let store: HashMap<PageId, Vec<u8>> = pages
            .into_iter()
            .map(|p| (p.page.id, p.bytes.unwrap()))
            .collect();
        let layout = state.caches[0].layout.clone().unwrap();
        assert_eq!(assembled(&paged, &[layout.clone(), layout], &store), bytes);
    }

    #[test]
    fn a_later_state_writes_only_the_pages_its_new_tokens_touched() {
        let layers = vec![(512, 512), (512, 512)];
        let at = |n: i32| {
            let window_start = (n - 300).max(0);
            section(&[
                Cache {
                    positions: (0..n).collect(),
                    layers: layers.clone(),
                    v_trans: true,
                },
                Cache {
                    positions: (window_start..n).collect(),
                    layers: layers.clone(),
                    v_trans: true,
                },
            ])
        };
        let before_bytes = at(1000);
        let (before, store) = round_trip(&before_bytes, 2);
        let after_bytes = at(1064);
        let after_state = parse(&after_bytes, 2);
        let mut reads = 0;
        let (after, pages) = split(
            &after_state,
            &after_bytes,
            false,
            &SALT,
            Some(&before),
            0,
            &mut |id| {
                reads += 1;
                store.get(id).cloned()
            },
        )
        .unwrap();
        let written: Vec<(usize, u32, u32)> = pages
            .iter()
            .filter(|p| p.bytes.is_some())
            .map(|p| (p.cache, p.page.first, p.page.end))
            .collect();
        // The full cache rewrites its last, partial page (960..1000 became 960..1024) and adds
        // 1024..1064. The window (the last 300 positions) dropped 700..764 from its front:
        // 764..768 is the tail of a page it had, reused once its stored bytes were compared;
        // the pages in between are the same; it adds the same new ranges as the full cache.
        assert_eq!(
            written,
            [
                (0, 960, 1024),
                (0, 1024, 1064),
                (1, 960, 1024),
                (1, 1024, 1064)
            ]
        );
        assert_eq!(reads, 1, "one wider page was read to be compared");
        let kept = &after.caches[1].pages[0];
        assert_eq!(
            (kept.first, kept.end),
            (704, 768),
            "the window's front page is reused"
        );
        // And it all assembles to the later state exactly.
        let mut all = store.clone();
        for page in pages {
            if let Some(bytes) = page.bytes {
                all.insert(page.page.id, bytes);
            }
        }
        let layout = after_state.caches[0].layout.clone().unwrap();
        assert_eq!(
            assembled(&after, &[layout.clone(), layout], &all),
            after_bytes
        );

        // Told that positions below 1000 are unchanged, the same save reads nothing back and
        // gathers nothing it need not, and comes to the same pages.
        let mut reads = 0;
        let (told, told_pages) = split(
            &after_state,
            &after_bytes,
            false,
            &SALT,
            Some(&before),
            1000,
            &mut |id| {
                reads += 1;
                store.get(id).cloned()
            },
        )
        .unwrap();
        assert_eq!(reads, 0, "nothing below the mark is read back");
        assert_eq!(told, after);
        let told_written: Vec<(usize, u32, u32)> = told_pages
            .iter()
            .filter(|p| p.bytes.is_some())
            .map(|p| (p.cache, p.page.first, p.page.end))
            .collect();
        assert_eq!(told_written, written);
    }

    #[test]
    fn tiled_scatter_moves_every_element_to_its_column_whatever_the_shape() {
        fn check<const E: usize, const CELLS: usize, const ELEMENTS: usize>(
            cells: usize,
            width: usize,
        ) {
            let source: Vec<Vec<u8>> = (0..cells)
                .map(|c| (0..width * E).map(|b| (c * 31 + b * 7) as u8).collect())
                .collect();
            let rows: Vec<&[u8]> = source.iter().map(Vec::as_slice).collect();
            let mut data = vec![0u8; cells * width * E];
            super::scatter_columns::<E, CELLS, ELEMENTS>(&rows, &mut data);
            for (c, row) in source.iter().enumerate() {
                for j in 0..width {
                    let at = (j * cells + c) * E;
                    assert_eq!(
                        data[at..at + E],
                        row[j * E..j * E + E],
                        "cell {c}, element {j}"
                    );
                }
            }
        }
        for (cells, width) in [
            (1, 1),
            (7, 9),
            (8, 8),
            (13, 11),
            (17, 33),
            (64, 256),
            (70, 3),
        ] {
            check::<2, 64, 16>(cells, width);
            check::<4, 32, 8>(cells, width);
            check::<2, 4, 4>(cells, width);
        }
    }

    #[test]
    fn a_page_that_differs_is_never_reused_and_salts_keep_owners_apart() {
        let layers = vec![(64, 64)];
        let bytes = section(&[Cache {
            positions: (0..100).collect(),
            layers,
            v_trans: false,
        }]);
        let state = parse(&bytes, 1);
        let (first, _) = split(&state, &bytes, false, &SALT, None, 0, &mut |_| None).unwrap();
        let other_salt = [8; 32];
        let (second, _) =
            split(&state, &bytes, false, &other_salt, None, 0, &mut |_| None).unwrap();
        assert_ne!(first.caches[0].pages[0].id, second.caches[0].pages[0].id);
        // A wider previous page whose stored bytes do not match is not reused.
        let mut wider = first.clone();
        wider.caches[0].pages[0].first = 0;
        wider.caches[0].pages[0].end = 64;
        wider.caches[0].pages[0].id = page_id(&SALT, &[0; 64 * 128]);
        let window = section(&[Cache {
            positions: (10..100).collect(),
            layers: vec![(64, 64)],
            v_trans: false,
        }]);
        let window_state = parse(&window, 1);
        let (_, pages) = split(
            &window_state,
            &window,
            false,
            &SALT,
            Some(&wider),
            0,
            &mut |_| Some(vec![0; 64 * 128]),
        )
        .unwrap();
        assert_eq!((pages[0].page.first, pages[0].page.end), (10, 64));
        assert!(pages[0].bytes.is_some(), "written, not reused");
        assert!(
            pages[1].bytes.is_none(),
            "64..100 is the same page as before"
        );
    }

    #[test]
    fn a_page_matches_its_check_or_else_its_id_and_damage_matches_neither() {
        let bytes = vec![3u8; 4096];
        let mut page = PageRef {
            first: 0,
            end: 4,
            id: page_id(&SALT, &bytes),
            check: Some(page_check(&bytes)),
        };
        assert!(page_matches(&SALT, &page, &bytes));
        let mut damaged = bytes.clone();
        damaged[1000] ^= 1;
        assert!(!page_matches(&SALT, &page, &damaged));
        // A manifest from before checks, or one whose check is wrong: the id decides.
        for check in [None, Some(0)] {
            page.check = check;
            assert!(page_matches(&SALT, &page, &bytes));
            assert!(!page_matches(&SALT, &page, &damaged));
        }
        // A split records every page's check.
        let (paged, _) = round_trip(fixture_section(), 2);
        assert!(paged.page_refs().all(|p| p.check.is_some()));
    }

    #[test]
    fn missing_or_wrong_sized_pages_are_errors_not_panics() {
        let bytes = section(&[Cache {
            positions: (0..70).collect(),
            layers: vec![(64, 64)],
            v_trans: true,
        }]);
        let state = parse(&bytes, 1);
        let (paged, pages) = split(&state, &bytes, false, &SALT, None, 0, &mut |_| None).unwrap();
        let layout = vec![state.caches[0].layout.clone().unwrap()];
        let mut out = Vec::new();
        assert!(assemble(&paged, &layout, None, false, &|_| None, &mut out, 0).is_err());
        let short = vec![0u8; 10];
        assert!(assemble(&paged, &layout, None, false, &|_| Some(&short), &mut out, 0).is_err());
        let first = pages[0].bytes.clone().unwrap();
        assert!(assemble(&paged, &layout, None, false, &|_| Some(&first), &mut out, 0).is_err());
        let mut three = paged.clone();
        three.caches.push(paged.caches[0].clone());
        assert!(assemble(&three, &layout, None, false, &|_| None, &mut out, 0).is_err());
        let _ = LayerLayout {
            k_type: 1,
            k_row_size: 64,
            v_type: 1,
            v_cell_size: 64,
        };
    }
}
