//! Property tests of every decoder of outside bytes: snapshot files (both layouts), llama.cpp's
//! memory section and its `ggsq`/`ggsn` files, manifests, the pages a state is cut into, the
//! store's records, sealed blobs and sealed snapshot files, and `kvsnap inspect`.
//!
//! For each: arbitrary bytes never panic; valid inputs, damaged (bits flipped, truncated,
//! spliced, a length field set huge), never panic, never allocate what a length field claims
//! before the bytes are there, and fail wherever a checksum covers them; what encodes decodes
//! back to itself. The checks after a decode are the fuzz targets' own (tests/fuzz/checks.rs:
//! `make fuzz` runs them ten million times each); here proptest runs a bounded number of cases
//! on stable Rust, in seconds. Every input a fuzzer found failing is kept in
//! tests/fixtures/fuzz/TARGET/ and runs here too.
//!
//! HTTP request bodies are not here: their types are private to `http/`, and what validates
//! them runs in the handlers (the server's tests cover those).

#[path = "fuzz/checks.rs"]
mod checks;
#[path = "fuzz/inputs.rs"]
mod inputs;

use std::path::Path;

use inputs::{Cache, Shape};
use kvsnap::sampling::RngState;
use kvsnap::snapshot::llama_file::{self, CONTEXT_MAGIC, SEQ_MAGIC};
use kvsnap::snapshot::llama_state::{self, StateVersion};
use kvsnap::snapshot::manifest::{MANIFEST_MAGIC, Manifest};
use kvsnap::snapshot::pages::{self, PageRef, PagedCache, PagedRecurrent, PagedState, RecurrentAt};
use kvsnap::snapshot::{
    FORMAT_VERSION, LayoutIdentity, MAGIC, MAGIC_V1, ModelIdentity, Snapshot, StoredSampling,
};
use kvsnap::store::records::{ForwardRecord, IncomingRecord, SessionRecord};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config;

const V3: &[u8] = include_bytes!("fixtures/llama-cpp/lighthouse.v3.ggsq");
const V4: &[u8] = include_bytes!("fixtures/llama-cpp/lighthouse.v4.ggsq");

/// `cases` cases, and no failure files written into the source tree: a failing case is
/// printed, and belongs in tests/fixtures/fuzz/ or in a test of its own.
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// --- strategies -------------------------------------------------------------------------

/// One cache: a run of positions with holes, in shuffled cell order; one to three layers.
/// Now and then a layer's rows are large, so that a page holds fewer than 64 positions.
fn cache() -> impl Strategy<Value = Cache> {
    let row = prop_oneof![
        9 => (0u64..24, (0u64..12).prop_map(|v| 2 * v)),
        1 => Just((30_000u64, 4_000u64)),
    ];
    let positions =
        (0i32..200, prop::collection::vec(any::<bool>(), 0..24)).prop_flat_map(|(start, keep)| {
            let positions: Vec<i32> = keep
                .iter()
                .enumerate()
                .filter(|(_, kept)| **kept)
                .map(|(i, _)| start + i as i32)
                .collect();
            Just(positions).prop_shuffle()
        });
    (positions, prop::collection::vec(row, 1..=3), any::<bool>()).prop_map(
        |(positions, layers, v_trans)| Cache {
            positions,
            layers,
            v_trans,
        },
    )
}

fn shape() -> impl Strategy<Value = Shape> {
    (
        prop_oneof![Just(StateVersion::V4), Just(StateVersion::V3)],
        any::<bool>(),
        1u32..=3,
        0i32..4,
        prop::collection::vec(cache(), 0..=3),
        prop::option::of(recurrent()),
    )
        .prop_filter(
            "a section holds a cache or a recurrent state",
            |(.., caches, recurrent)| !caches.is_empty() || recurrent.is_some(),
        )
        .prop_map(
            |(version, cell_ext, n_stream, seq_id, caches, recurrent)| Shape {
                version,
                cell_ext,
                n_stream,
                seq_id,
                caches,
                recurrent,
            },
        )
}

/// A recurrent section: empty or one cell, rows of f32 (an s row may be empty, as LFM2's).
fn recurrent() -> impl Strategy<Value = inputs::Recurrent> {
    (
        prop::option::of(0i32..100),
        prop::collection::vec((0u64..6, 0u64..6), 1..=3),
        0u32..2,
    )
        .prop_map(|(position, layers, more)| inputs::Recurrent {
            position,
            n_layer: layers.len() as u32 + more,
            layers: layers.into_iter().map(|(r, s)| (4 * r, 4 * s)).collect(),
        })
}

/// A shape a snapshot holds: v4, one stream, a full cache of positions `0..n`.
fn snapshot_shape() -> impl Strategy<Value = Shape> {
    (1i32..40, any::<bool>(), any::<bool>())
        .prop_map(|(n, v_trans, cell_ext)| inputs::small_shape(n, v_trans, cell_ext))
}

/// Damage to bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    /// Copies `len` bytes from one place over another.
    Splice(Index, Index, usize),
    /// Writes a little-endian word that, read as a length or count, is huge.
    Huge(Index, u64),
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let huge = prop_oneof![
        Just(u64::from(u32::MAX)),
        Just(1u64 << 40),
        Just(u64::MAX),
        Just(1u64 << 31),
    ];
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>(), 1usize..64)
            .prop_map(|(from, to, len)| Mutation::Splice(from, to, len)),
        2 => (any::<Index>(), huge).prop_map(|(at, value)| Mutation::Huge(at, value)),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..4)
}

fn mutate(bytes: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for mutation in mutations {
        if out.is_empty() {
            break;
        }
        match mutation {
            Mutation::Flip(at, bit) => {
                let at = at.index(out.len());
                out[at] ^= 1 << bit;
            }
            Mutation::Truncate(at) => out.truncate(at.index(out.len())),
            Mutation::Splice(from, to, len) => {
                let from = from.index(out.len());
                let to = to.index(out.len());
                let len = (*len).min(out.len() - from).min(out.len() - to);
                out.copy_within(from..from + len, to);
            }
            Mutation::Huge(at, value) => {
                let at = at.index(out.len());
                let word = value.to_le_bytes();
                let len = if *value > u64::from(u32::MAX) { 8 } else { 4 };
                let len = len.min(out.len() - at);
                out[at..at + len].copy_from_slice(&word[..len]);
            }
            Mutation::Append(tail) => out.extend_from_slice(tail),
        }
    }
    out
}

/// The body of a file framed as magic, body, blake3 of both.
fn body(file: &[u8]) -> &[u8] {
    &file[MAGIC.len()..file.len() - 32]
}

fn reseal(magic: &[u8], body: &[u8]) -> Vec<u8> {
    let head = [magic, body].concat();
    [&head[..], blake3::hash(&head).as_bytes()].concat()
}

// --- llama.cpp's memory section and pages -----------------------------------------------

proptest! {
    #![proptest_config(config(1024))]

    /// Any section llama.cpp could write parses to exactly its cells and layouts, and every
    /// rewrite of it (stream counts, v3 to v4, V transposed or not, framing) holds.
    #[test]
    fn generated_sections_parse_to_what_was_written(shape in shape()) {
        let section = inputs::section(&shape);
        let state = llama_state::parse(&section, shape.options()).expect("a valid section");
        let layouts = shape.layouts();
        for ((parsed, cache), layout) in state.caches.iter().zip(&shape.caches).zip(&layouts) {
            prop_assert_eq!(&parsed.positions, &cache.positions);
            prop_assert_eq!(parsed.n_stream, shape.n_stream);
            if !cache.positions.is_empty() {
                prop_assert_eq!(parsed.layout.as_ref(), Some(layout));
            }
        }
        let recurrent = state.recurrent.as_ref();
        let expected = shape.recurrent_layout();
        prop_assert_eq!(recurrent.map(|r| &r.layout), expected.as_ref());
        let position = shape.recurrent.as_ref().and_then(|r| r.position);
        prop_assert_eq!(recurrent.and_then(|r| r.position), position);
        checks::llama_state(&section, shape.options());
    }

    /// `pages::split` then `pages::assemble` gives back the exact bytes split was given.
    #[test]
    fn split_then_assemble_gives_back_the_exact_bytes(mut shape in shape()) {
        shape.version = StateVersion::V4;
        shape.n_stream = 1;
        let section = inputs::section(&shape);
        let state = llama_state::parse(&section, shape.options()).expect("a valid section");
        let salt = [0; 32];
        let split = pages::split(&state, &section, shape.cell_ext, &salt, None, 0, &mut |_| None);
        prop_assert!(split.is_ok(), "{:?}", split.err());
        // The check asserts the exact bytes for states whose positions are unique, as here.
        checks::pages_round_trip(&state, &section, shape.cell_ext);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_state_parser(
        options in any::<u8>(),
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        checks::llama_state(&bytes, checks::options_from(options));
    }

    #[test]
    fn damaged_sections_never_panic_the_state_parser(
        shape in shape(),
        mutations in mutations(),
    ) {
        let section = mutate(&inputs::section(&shape), &mutations);
        checks::llama_state(&section, shape.options());
        // And read as the other version, with or without cell extensions.
        for byte in [0u8, 1, 8, 9] {
            let mut options = checks::options_from(byte);
            options.shape.n_caches = shape.caches.len();
            options.shape.recurrent = shape.recurrent.is_some();
            checks::llama_state(&section, options);
        }
    }

    /// Every count and size field set to a huge value is refused: nothing is allocated or
    /// sliced on its word (an allocation of 2^40 bytes would abort the test).
    #[test]
    fn huge_length_fields_in_a_section_are_refused(shape in shape()) {
        let section = inputs::section(&shape);
        let state = llama_state::parse(&section, shape.options()).expect("a valid section");
        for (at, width) in length_fields(&shape, &state) {
            let values: &[u64] = if width == 4 {
                &[u32::MAX as u64, 1 << 31]
            } else {
                &[u32::MAX as u64, 1 << 40, u64::MAX]
            };
            for &value in values {
                let mut damaged = section.clone();
                damaged[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
                prop_assert!(
                    llama_state::parse(&damaged, shape.options()).is_err(),
                    "a field of {} bytes at {} set to {}", width, at, value
                );
            }
        }
    }
}

/// Where a section's counts and sizes lie, and their widths: per cache with cells, its cell
/// count, its layer count, and every layer's K row size, V row size (or V element size and
/// width, when transposed).
fn length_fields(shape: &Shape, state: &llama_state::SequenceState) -> Vec<(usize, usize)> {
    let mut fields = Vec::new();
    for (cache, parsed) in shape.caches.iter().zip(&state.caches) {
        let (Some(range), Some(rotation_at), Some(v_at)) = (
            &parsed.stream_range,
            parsed.rotation_offset,
            parsed.v_offset,
        ) else {
            continue;
        };
        let cells = cache.positions.len();
        fields.push((range.start, 4));
        fields.push((rotation_at - 4, 4));
        // v4 has n_rot_k and n_rot_v there; the layers follow.
        let rotation_len = if shape.version == StateVersion::V4 {
            8
        } else {
            0
        };
        let mut at = rotation_at + rotation_len;
        for &(k_row, _) in &cache.layers {
            fields.push((at + 4, 8));
            at += 12 + cells * k_row as usize;
        }
        assert_eq!(at, v_at);
        for &(_, v_row) in &cache.layers {
            if cache.v_trans {
                fields.push((at + 4, 4));
                fields.push((at + 8, 4));
            } else {
                fields.push((at + 4, 8));
            }
            at += 12 + cells * v_row as usize;
        }
    }
    fields
}

proptest! {
    #![proptest_config(config(32))]

    /// llama.cpp's own v4 and v3 states (900 KB each), damaged.
    #[test]
    fn damaged_llama_cpp_states_never_panic(mutations in mutations(), v3 in any::<bool>()) {
        let (file, options) = if v3 { (V3, 5u8) } else { (V4, 4u8) };
        let section = mutate(inputs::memory_section(file), &mutations);
        checks::llama_state(&section, checks::options_from(options | 16));
        checks::seq_file(&mutate(file, &mutations));
        checks::inspect_file(&mutate(file, &mutations));
    }
}

/// A state whose cells name different sequences is the parser's to refuse (422 with its
/// sentence): the pager keeps one sequence id per cache, and its refusal used to surface as an
/// internal error (500) on an import.
#[test]
fn cells_of_different_sequences_are_refused_by_the_parser() {
    let section = inputs::memory_section(V4);
    let options = checks::options_from(4 | 16);
    let state = llama_state::parse(section, options).expect("llama.cpp's own state");
    for (index, cache) in state.caches.iter().enumerate() {
        let start = cache.stream_range.clone().expect("cells").start;
        for cell in [0, 1, cache.positions.len() - 1] {
            let seq_at = start + 4 + cell * 12 + 8;
            let mut damaged = section.to_vec();
            damaged[seq_at] ^= 1;
            let refused = llama_state::parse(&damaged, options);
            assert!(refused.is_err(), "cache {index}, cell {cell}: accepted");
            checks::llama_state(&damaged, options);
        }
    }
}

#[test]
fn llama_cpps_own_states_survive_every_check() {
    // V4 with 2 caches (byte 4), v3 likewise (byte 5), any number of cells (16).
    checks::llama_state(inputs::memory_section(V4), checks::options_from(4 | 16));
    checks::llama_state(inputs::memory_section(V3), checks::options_from(5 | 16));
    checks::seq_file(V3);
    checks::seq_file(V4);
    checks::inspect_file(V3);
    checks::inspect_file(V4);
}

// --- ggsq and ggsn files ----------------------------------------------------------------

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn seq_files_round_trip(
        version in 0u32..6,
        tokens in prop::collection::vec(0i32..300_000, 0..64),
        section in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let file = llama_file::write_seq_file(version, &tokens, &section);
        let parsed = llama_file::parse_seq_file(&file).expect("a file it wrote");
        prop_assert_eq!(parsed.version, version);
        prop_assert_eq!(&parsed.tokens, &tokens);
        prop_assert!(!parsed.wrapped);
        prop_assert_eq!(&file[parsed.section_offset..], section.as_slice());
        checks::seq_file(&file);
        checks::inspect_file(&file);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_file_readers(
        magic in prop_oneof![Just(SEQ_MAGIC), Just(CONTEXT_MAGIC), any::<u32>()],
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let file = [&magic.to_le_bytes()[..], &rest].concat();
        checks::seq_file(&file);
        checks::inspect_file(&file);
        checks::seq_file(&rest);
        checks::inspect_file(&rest);
    }

    #[test]
    fn damaged_seq_files_never_panic(shape in shape(), mutations in mutations()) {
        let version = if shape.version == StateVersion::V4 { 4 } else { 3 };
        let file = llama_file::write_seq_file(version, &[1, 2, 3], &inputs::section(&shape));
        let damaged = mutate(&file, &mutations);
        checks::seq_file(&damaged);
        checks::inspect_file(&damaged);
    }
}

#[test]
fn a_huge_token_count_in_a_file_header_is_refused() {
    for file in [V3, V4] {
        for count in [u32::MAX, 1 << 30, 1 << 20] {
            let mut damaged = file[..4096].to_vec();
            damaged[8..12].copy_from_slice(&count.to_le_bytes());
            assert!(llama_file::parse_seq_file(&damaged).is_err());
            assert!(kvsnap::inspect::inspect(&damaged).is_err());
            damaged[..4].copy_from_slice(&CONTEXT_MAGIC.to_le_bytes());
            assert!(kvsnap::inspect::inspect(&damaged).is_err());
        }
    }
}

// --- snapshot files ---------------------------------------------------------------------

/// A finite float: NaN is never equal to itself, and a round trip is checked with `==`.
fn finite() -> impl Strategy<Value = f32> {
    -1.0e6f32..1.0e6
}

fn arbitrary_snapshot() -> impl Strategy<Value = Snapshot<'static>> {
    let model = (
        ".{0,24}",
        ".{0,12}",
        any::<u32>(),
        any::<i32>(),
        any::<i32>(),
    )
        .prop_map(
            |(file_hash, architecture, n_layer, n_embd, n_vocab)| ModelIdentity {
                file_hash,
                architecture,
                n_layer,
                n_embd,
                n_vocab,
            },
        );
    let layout = (
        any::<bool>(),
        any::<(u32, u32, u32)>(),
        ".{0,12}",
        any::<bool>(),
        shape(),
        prop::option::of(".{0,8}"),
    )
        .prop_map(
            |(flash_attention, (n_ctx, n_swa, n_ubatch), llama_build, cell_ext, shape, profile)| {
                LayoutIdentity {
                    flash_attention,
                    n_ctx_per_sequence: n_ctx,
                    n_swa,
                    n_ubatch,
                    llama_build,
                    cell_ext,
                    caches: shape.layouts(),
                    compute_profile: profile,
                    recurrent: shape.recurrent_layout(),
                }
            },
        );
    let sampling = prop::option::of(
        (
            (finite(), any::<u64>(), finite(), finite()),
            (finite(), finite(), finite(), any::<u64>()),
        )
            .prop_map(
                |((temperature, top_k, top_p, min_p), (repeat, frequency, presence, last_n))| {
                    StoredSampling {
                        temperature,
                        top_k,
                        top_p,
                        min_p,
                        repeat_penalty: repeat,
                        frequency_penalty: frequency,
                        presence_penalty: presence,
                        penalty_last_n: last_n,
                    }
                },
            ),
    );
    (
        model,
        layout,
        prop::collection::vec(any::<i32>(), 0..64),
        sampling,
        (any::<u64>(), any::<u128>()),
        prop::option::of(any::<i32>()),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |(model, layout, tokens, sampling, (seed, word_pos), pending_token, created, state)| {
                Snapshot {
                    format_version: FORMAT_VERSION,
                    model,
                    layout,
                    tokens,
                    sampling,
                    rng: RngState { seed, word_pos },
                    pending_token,
                    created_unix_ms: created,
                    sequence_state: state.into(),
                }
            },
        )
}

proptest! {
    #![proptest_config(config(512))]

    /// encode then decode is the identity, in both layouts; the checksum decode returns is
    /// the whole file's.
    #[test]
    fn snapshots_round_trip(snapshot in arbitrary_snapshot()) {
        let file = snapshot.encode().expect("it fits");
        let back = Snapshot::decode(&file).expect("a file it wrote");
        prop_assert_eq!(&back, &snapshot);
        let (_, checksum) = Snapshot::decode_with_checksum(&file).expect("a file it wrote");
        prop_assert_eq!(checksum, blake3::hash(&file));
        let old = rmp_serde::to_vec_named(&snapshot).expect("it serializes");
        let v1 = [&MAGIC_V1[..], blake3::hash(&old).as_bytes(), &old].concat();
        prop_assert_eq!(Snapshot::decode(&v1).expect("a first-layout file"), snapshot);
    }

    /// The checksum covers every byte: any damage at all is refused, in either layout.
    #[test]
    fn damaged_snapshots_are_refused(shape in snapshot_shape(), mutations in mutations()) {
        let live = inputs::identity(shape.layouts(), shape.cell_ext);
        let section = inputs::section(&shape);
        let snapshot = inputs::snapshot(&live, shape.caches[0].positions.len(), &section);
        let file = snapshot.encode().expect("it fits");
        snapshot.verify(&live).expect("a snapshot that fits");
        let damaged = mutate(&file, &mutations);
        if damaged != file {
            prop_assert!(Snapshot::decode(&damaged).is_err());
        }
        let old = rmp_serde::to_vec_named(&snapshot).expect("it serializes");
        let v1 = [&MAGIC_V1[..], blake3::hash(&old).as_bytes(), &old].concat();
        let damaged = mutate(&v1, &mutations);
        if damaged != v1 {
            prop_assert!(Snapshot::decode(&damaged).is_err());
        }
    }

    /// Bodies damaged and framed again with a valid checksum (a hostile peer's files): decode,
    /// verify, cutting into pages and assembling them never panic. An undamaged one comes back
    /// from its pages byte for byte.
    #[test]
    fn resealed_snapshots_never_panic(shape in snapshot_shape(), mutations in mutations()) {
        let live = inputs::identity(shape.layouts(), shape.cell_ext);
        let section = inputs::section(&shape);
        let file = inputs::snapshot(&live, shape.caches[0].positions.len(), &section)
            .encode()
            .expect("it fits");
        checks::snapshot(&file, &live);
        let damaged = mutate(body(&file), &mutations);
        checks::snapshot(&reseal(&MAGIC, &damaged), &live);
        checks::snapshot(&reseal(&MAGIC, &damaged), &checks::live());
        let v1 = [&MAGIC_V1[..], blake3::hash(&damaged).as_bytes(), &damaged].concat();
        checks::snapshot(&v1, &live);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_snapshot_reader(
        mode in 0u8..3,
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        checks::snapshot_input(&[&[mode][..], &bytes].concat(), &checks::live());
        checks::inspect_file(&bytes);
    }
}

/// A MessagePack length in a snapshot's body claiming 4 GiB is refused, not allocated.
#[test]
fn a_huge_length_in_a_snapshot_body_is_refused() {
    let (live, file) = inputs::small_snapshot_file();
    let body = body(&file);
    // The state's bin header after its field name (`c4`, `c5` or `c6` and a length of 1, 2
    // or 4 bytes), and the tokens' array header (`96`: six tokens) after theirs.
    let state_at = find(body, b"sequence_state") + b"sequence_state".len();
    let state_header = match body[state_at] {
        0xc4 => 2,
        0xc5 => 3,
        _ => 5,
    };
    let tokens_at = find(body, b"tokens") + b"tokens".len();
    for (at, old_len, huge) in [
        (state_at, state_header, &[0xc6, 0xff, 0xff, 0xff, 0xff][..]),
        (tokens_at, 1, &[0xdd, 0xff, 0xff, 0xff, 0xff][..]),
        (tokens_at, 1, &[0xdd, 0x10, 0x00, 0x00, 0x00][..]),
    ] {
        let damaged = [&body[..at], huge, &body[at + old_len..]].concat();
        let file = reseal(&MAGIC, &damaged);
        assert!(Snapshot::decode(&file).is_err());
        checks::snapshot(&file, &live);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the field is there")
}

#[test]
fn a_snapshot_of_llama_cpps_own_state_survives_every_check() {
    let section = inputs::memory_section(V4);
    let options = checks::options_from(4 | 16);
    let state = llama_state::parse(section, options).expect("llama.cpp's own state");
    let live = inputs::identity(checks::own_layouts(&state), false);
    let file = inputs::snapshot(&live, 50, section)
        .encode()
        .expect("it fits");
    checks::snapshot(&file, &live);
    checks::inspect_file(&file);
}

// --- manifests --------------------------------------------------------------------------

fn paged_state() -> impl Strategy<Value = PagedState> {
    let page = || {
        (
            any::<u32>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            any::<Option<u128>>(),
        )
            .prop_map(|(first, end, id, check)| PageRef {
                first,
                end,
                id,
                check,
            })
    };
    let cache = (
        prop::collection::vec(any::<i32>(), 0..16),
        any::<i32>(),
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec(page(), 0..4),
    )
        .prop_map(|(positions, seq_id, cell_ext, pages)| PagedCache {
            positions,
            seq_id,
            cell_ext,
            pages,
        });
    let earlier = (any::<i32>(), prop::collection::vec(page(), 0..2))
        .prop_map(|(position, pages)| RecurrentAt { position, pages });
    let recurrent = (
        any::<Option<i32>>(),
        prop::collection::vec(page(), 0..3),
        prop::collection::vec(earlier, 0..3),
    )
        .prop_map(|(position, pages, earlier)| PagedRecurrent {
            position,
            pages,
            earlier,
        });
    (
        prop::collection::vec(cache, 0..3),
        prop::option::of(recurrent),
    )
        .prop_map(|(caches, recurrent)| PagedState { caches, recurrent })
}

fn arbitrary_manifest() -> impl Strategy<Value = Manifest> {
    (arbitrary_snapshot(), paged_state()).prop_map(|(snapshot, state)| Manifest {
        format_version: snapshot.format_version,
        model: snapshot.model,
        layout: snapshot.layout,
        tokens: snapshot.tokens,
        sampling: snapshot.sampling,
        rng: snapshot.rng,
        pending_token: snapshot.pending_token,
        created_unix_ms: snapshot.created_unix_ms,
        state,
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn manifests_round_trip(manifest in arbitrary_manifest()) {
        let encoded = manifest.encode();
        prop_assert_eq!(Manifest::decode(&encoded).expect("one it wrote"), manifest);
    }

    /// A snapshot cut into a manifest and pages: the manifest round-trips, and the pages
    /// assemble into the snapshot's file byte for byte (`checks::snapshot` asserts it).
    #[test]
    fn cut_snapshots_come_back_from_their_pages(shape in snapshot_shape()) {
        let live = inputs::identity(shape.layouts(), shape.cell_ext);
        let section = inputs::section(&shape);
        let file = inputs::snapshot(&live, shape.caches[0].positions.len(), &section)
            .encode()
            .expect("it fits");
        let (manifest, _) = Manifest::cut_file(&file, None).expect("it cuts");
        prop_assert_eq!(Manifest::decode(&manifest.encode()).expect("it decodes"), manifest);
        checks::snapshot(&file, &live);
    }

    #[test]
    fn damaged_manifests_are_refused(manifest in arbitrary_manifest(), mutations in mutations()) {
        let encoded = manifest.encode();
        let damaged = mutate(&encoded, &mutations);
        if damaged != encoded {
            prop_assert!(Manifest::decode(&damaged).is_err());
        }
    }

    /// Manifests damaged and framed again with a valid checksum, and made-up ones: decoding and
    /// assembling a state from them never panic.
    #[test]
    fn resealed_manifests_never_panic(
        manifest in arbitrary_manifest(),
        shape in snapshot_shape(),
        mutations in mutations(),
    ) {
        checks::manifest(&manifest.encode());
        let live = inputs::identity(shape.layouts(), shape.cell_ext);
        let section = inputs::section(&shape);
        let file = inputs::snapshot(&live, shape.caches[0].positions.len(), &section)
            .encode()
            .expect("it fits");
        let (cut, _) = Manifest::cut_file(&file, None).expect("it cuts");
        for encoded in [manifest.encode(), cut.encode()] {
            let damaged = mutate(body(&encoded), &mutations);
            checks::manifest(&reseal(&MANIFEST_MAGIC, &damaged));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_manifest_reader(
        mode in 0u8..2,
        bytes in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        checks::manifest_input(&[&[mode][..], &bytes].concat());
    }
}

// --- the store's records ----------------------------------------------------------------

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn records_round_trip(
        numbers in any::<(u32, u64, u64, u64, u64, u32)>(),
        words in (".{0,16}", ".{0,16}", prop::option::of(".{0,16}"), prop::option::of(".{0,8}")),
        blob in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let (version, created, used, tokens, bytes, chunks) = numbers;
        let (checksum, model, damaged, owner) = words;
        let session = SessionRecord {
            record_version: version,
            owner: owner.clone(),
            created_ms: created,
            last_used_ms: used,
            tokens,
            bytes,
            chunks,
            checksum: checksum.clone(),
            model: model.clone(),
            damaged,
            compute_profile: owner.clone(),
            saves: 0,
        };
        prop_assert_eq!(SessionRecord::decode(&session.encode()).ok(), Some(session));
        let forward = ForwardRecord { record_version: version, target: model, moved_ms: used };
        prop_assert_eq!(ForwardRecord::decode(&forward.encode()).ok(), Some(forward));
        let incoming = IncomingRecord {
            record_version: version,
            owner,
            created_ms: created,
            checksum,
            manifest: blob,
            offered_ms: used,
        };
        prop_assert_eq!(IncomingRecord::decode(&incoming.encode()).ok(), Some(incoming));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_record_readers(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        checks::records(&bytes);
    }

    #[test]
    fn damaged_records_never_panic(mutations in mutations()) {
        let session = inputs::session_record();
        checks::records(&mutate(&session.encode(), &mutations));
    }
}

/// MessagePack headers claiming 4 GiB of string, bytes or elements are refused.
#[test]
fn huge_lengths_in_a_record_are_refused() {
    for header in [
        &[0xdb, 0xff, 0xff, 0xff, 0xff][..],
        &[0xc6, 0xff, 0xff, 0xff, 0xff],
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
    ] {
        assert!(SessionRecord::decode(header).is_err());
        checks::records(header);
        checks::records(&[&[0x81, 0xa5][..], b"owner", header].concat());
    }
}

// --- what the fuzzers found -------------------------------------------------------------

/// Every input a fuzz target failed on, kept under tests/fixtures/fuzz/TARGET/ once fixed,
/// goes through that target's checks again.
#[test]
fn every_input_a_fuzzer_found_is_handled() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let live = checks::live();
    let mut seen = 0;
    for target in std::fs::read_dir(&root).expect("tests/fixtures/fuzz exists") {
        let target = target.expect("a folder entry");
        let name = target.file_name().into_string().expect("a target's name");
        for input in std::fs::read_dir(target.path()).expect("a target's folder") {
            let path = input.expect("a file entry").path();
            let data = std::fs::read(&path).expect("a regression input");
            eprintln!("{}", path.display());
            match name.as_str() {
                "llama_state" => checks::llama_state_input(&data),
                "snapshot" => checks::snapshot_input(&data, &live),
                "manifest" => checks::manifest_input(&data),
                "seq_file" => checks::seq_file(&data),
                "records" => checks::records(&data),
                "inspect" => checks::inspect_file(&data),
                other => panic!("tests/fixtures/fuzz/{other} is no fuzz target"),
            }
            seen += 1;
        }
    }
    assert!(seen > 0, "the regression inputs are there");
}

/// A manifest whose layout claims rows too large to add up, or pages larger than memory, is
/// refused: nothing is sliced or allocated on the claim, whatever pages are found.
#[test]
fn a_manifest_claiming_huge_rows_is_refused() {
    let (_, file) = inputs::small_snapshot_file();
    let (manifest, pages) = Manifest::cut_file(&file, None).expect("it cuts");
    let empty: &[u8] = &[];
    // The layers hold K/V rows of 8/4 and 4/6 bytes: 22 a position. Claims that wrap around
    // to those 22 bytes (so the real pages fit them) or to none (an empty page fits), and
    // claims merely huge.
    for (k_row, v_row) in [
        ((1 << 63) + 8, (1 << 63) + 6),
        (0u64.wrapping_sub(14), 6),
        (u64::MAX, u64::MAX),
        (1 << 40, 6),
        (u64::MAX / 64, 6),
    ] {
        let mut damaged = manifest.clone();
        damaged.layout.caches[0].layers[0].k_row_size = k_row;
        damaged.layout.caches[0].layers[1].v_cell_size = v_row;
        let mut out = Vec::new();
        let found = |id: &pages::PageId| {
            let page = pages.iter().find(|(page, _)| page == id);
            Some(page.map_or(empty, |(_, bytes)| bytes.as_slice()))
        };
        assert!(damaged.assemble_state(&found, &mut out, 0).is_err());
        assert!(
            damaged
                .assemble_state(&|_| Some(empty), &mut out, 0)
                .is_err()
        );
        checks::manifest(&damaged.encode());
    }
}

// --- sealed blobs and sealed snapshot files ----------------------------------------------

proptest! {
    #![proptest_config(config(256))]

    /// Uploads may be sealed files: whatever arrives opens only if it is exactly what was
    /// sealed, and never panics.
    #[test]
    fn sealed_files_open_only_unchanged(
        file in prop::collection::vec(any::<u8>(), 0..512),
        mutations in mutations(),
    ) {
        let ring = checks::fixed_ring();
        let sealed = kvsnap::keys::sealed_file(ring, &file, Some("owner"));
        let (opened, owner) = kvsnap::keys::open_sealed_file(ring, &sealed).unwrap();
        prop_assert_eq!(opened, file);
        prop_assert_eq!(owner, Some(Some("owner".to_string())));
        let damaged = mutate(&sealed, &mutations);
        if damaged != sealed {
            prop_assert!(kvsnap::keys::open_sealed_file(ring, &damaged).is_err());
        }
        checks::sealed(&damaged);
    }

    #[test]
    fn arbitrary_bytes_never_open_as_sealed(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let ring = checks::fixed_ring();
        let _ = kvsnap::keys::sealed_key_id(&bytes);
        prop_assert!(ring.open(b"anywhere", &bytes).is_err());
        let file = [&kvsnap::keys::SEALED_FILE_MAGIC[..], &bytes].concat();
        prop_assert!(kvsnap::keys::open_sealed_file(ring, &file).is_err());
        checks::sealed(&file);
    }
}
