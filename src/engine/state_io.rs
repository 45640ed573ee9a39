//! Reading a sequence's llama.cpp state out, and writing verified state back in.
//!
//! The program's `unsafe` blocks live here: the two llama.cpp calls and the length of the
//! buffer the first one fills. llama-cpp-2's safe `state_seq_get` returns an opaque value that
//! cannot be stored, so saving uses the raw buffer API; restoring bytes from a store has no safe
//! API at all.
//!
//! llama.cpp frames an in-memory sequence state as `io_magic u32, seq_id i32`, then the memory
//! section that `snapshot::llama_state` parses. Snapshots store only the memory section,
//! normalised to one stream per cache.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::session::LlamaStateSeqFlags;

use crate::snapshot::llama_state::SequenceState;

/// `io_magic` in llama-context.cpp: the first word of every in-memory sequence state.
const IO_MAGIC: u32 = 0xaf14_3cd8;
pub(super) const HEADER: usize = 8;

/// Copies sequence `seq`'s state out of the context into `buffer` (reused: its pages stay
/// mapped between saves) and returns the memory section, without llama.cpp's in-memory header.
/// `None` if llama.cpp reports nothing to copy.
///
/// The caller must not call this for an empty sequence: llama.cpp crashes saving one (#14434).
pub(super) fn read_sequence<'b>(
    ctx: &LlamaContext<'_>,
    seq: i32,
    buffer: &'b mut Vec<u8>,
) -> Option<&'b [u8]> {
    let size = ctx.state_seq_get_size_ext(seq, LlamaStateSeqFlags::empty());
    if size <= HEADER {
        return None;
    }
    // Not zero-filled first: llama.cpp overwrites every byte, and a memset of megabytes on
    // every save is a whole extra pass over the state.
    buffer.clear();
    buffer.reserve(size);
    // SAFETY: `buffer` has capacity for at least `state_seq_get_size_ext(seq)` bytes, the size
    // llama.cpp reported for this sequence a moment ago on this same thread (nothing decodes in
    // between, the engine thread is the only user of the context). llama-cpp-2 passes
    // `usize::MAX` as the capacity, so the bound rests on that size: llama.cpp writes the same
    // layout it measured.
    let written = unsafe {
        ctx.state_seq_get_data_ext(buffer.as_mut_ptr(), seq, LlamaStateSeqFlags::empty())
    };
    if written != size {
        return None;
    }
    // SAFETY: llama.cpp's writer (`llama_io_write_host`) fills the buffer contiguously from its
    // start: plain fields at once, tensor rows in its destructor, which runs before the call
    // returns. It throws (and the call returns 0) rather than skip a byte, so a count equal to
    // `size` means the first `size` bytes are initialised, all within the reserved capacity.
    unsafe { buffer.set_len(written) };
    Some(section(buffer))
}

/// The memory section of a state `read_sequence` wrote into `buffer`: all but llama.cpp's
/// in-memory header.
pub(super) fn section(buffer: &[u8]) -> &[u8] {
    buffer.get(HEADER..).unwrap_or_default()
}

/// Writes a verified state into sequence `seq`, expanded to the context's stream count.
/// Returns false if llama.cpp refused it; the caller then clears the sequence (a failed restore
/// may leave cells behind, #27068). `framed` is scratch space the caller keeps between calls:
/// fresh megabytes cost a page fault per 4 KiB on every restore.
pub(super) fn write_sequence(
    ctx: &mut LlamaContext<'_>,
    seq: i32,
    state: &SequenceState,
    source: &[u8],
    n_stream: u32,
    framed: &mut Vec<u8>,
) -> bool {
    framed.clear();
    framed.reserve(HEADER + source.len() + 4 * n_stream as usize);
    framed.extend_from_slice(&header(seq));
    state.write_for(source, n_stream, framed);
    set_verified(ctx, seq, framed)
}

/// `write_sequence` for a state that lies in `file` at `range` (the snapshot file it was
/// verified in): framed right there when it can be (`SequenceState::frame_in_place`; the bytes
/// of `file` around the state are overwritten), else copied into `framed` as usual.
pub(super) fn write_sequence_from_file(
    ctx: &mut LlamaContext<'_>,
    seq: i32,
    state: &SequenceState,
    file: &mut Vec<u8>,
    range: std::ops::Range<usize>,
    n_stream: u32,
    framed: &mut Vec<u8>,
) -> bool {
    match state.frame_in_place(file, range.start, header(seq), n_stream) {
        Some(frame) => set_verified(ctx, seq, &file[frame]),
        None => write_sequence(ctx, seq, state, &file[range], n_stream, framed),
    }
}

/// llama.cpp's in-memory header of a sequence state.
fn header(seq: i32) -> [u8; HEADER] {
    let mut header = [0; HEADER];
    header[..4].copy_from_slice(&IO_MAGIC.to_le_bytes());
    header[4..].copy_from_slice(&seq.to_le_bytes());
    header
}

/// Hands a framed state to llama.cpp. Only for frames made by the callers above, from a
/// state `Snapshot::verify` returned.
fn set_verified(ctx: &mut LlamaContext<'_>, seq: i32, framed: &[u8]) -> bool {
    // SAFETY: `framed` is llama.cpp's header followed by a state that `Snapshot::verify`
    // returned for the bytes it was parsed from: the checksum matched, the model hash and every
    // layout field (cache count, V layout, layer count, rotation, per-layer K/V types and row
    // sizes) equal this context's probed layout, every count and byte range was walked within
    // bounds, each cell belongs to one sequence, and positions are unique and below the
    // per-sequence context. Framing (`write_for`, or `frame_in_place`, tested to give the same
    // bytes) only rewrites each cache's stream count to this context's own and adds its empty
    // streams. The slice outlives the call, and the engine thread is the context's only user.
    // These are the conditions under which llama.cpp's reader stays in bounds and reaches
    // none of its assertions.
    unsafe { ctx.state_seq_set_data_ext(framed, seq, LlamaStateSeqFlags::empty()) }
}
