//! Buffers the engine reuses for every save and restore.
//!
//! A snapshot is megabytes, and fresh memory costs a page fault per 4 KiB on first touch:
//! measured here, 13.7 MB takes 8 ms to copy into a fresh buffer and under 2 ms into one
//! already mapped. So the state read from llama.cpp (which a save's file borrows,
//! `EncodedSnapshot`) and the frame handed to llama.cpp each live in a buffer kept between
//! calls — up to `KEEP_BYTES` each, so a rare
//! huge conversation does not pin its size for good.

/// Largest buffer kept after use.
pub(super) const KEEP_BYTES: usize = 256 << 20;

/// Most of the restore frame mapped at start (`Scratch::with_frame_mapped`).
const MAP_AT_START_BYTES: usize = 64 << 20;

#[derive(Default)]
pub(super) struct Scratch {
    /// A sequence's state as llama.cpp wrote it.
    pub raw: Vec<u8>,
    /// The state framed for llama.cpp: a restore assembles its pages here and frames them in
    /// place; `/slots` restores copy a verified file's state here.
    pub frame: Vec<u8>,
}

impl Scratch {
    /// Buffers whose restore frame already has `bytes` (at most `MAP_AT_START_BYTES`) of
    /// touched memory: the first restore after a start meets mapped memory instead of a fault
    /// per 4 KiB (measured: 13 MB assembled in 11 ms into fresh memory, 3.5 ms into mapped).
    pub fn with_frame_mapped(bytes: usize) -> Self {
        // Not zeros: a zeroed allocation may be handed out as untouched pages (calloc). Left
        // at its length: a restore assembles over what lies there (`pages::assemble`).
        Scratch {
            raw: Vec::new(),
            frame: vec![0xa5; bytes.min(MAP_AT_START_BYTES)],
        }
    }

    /// The same buffers, minus any grown beyond `KEEP_BYTES`.
    pub fn recycled(mut self) -> Self {
        for buffer in [&mut self.raw, &mut self.frame] {
            if buffer.capacity() > KEEP_BYTES {
                *buffer = Vec::new();
            }
        }
        self
    }
}
