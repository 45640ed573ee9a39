//! What must hold for any bytes handed to a decoder, shared by the fuzz targets and the
//! property tests (tests/decoders.rs): no decoder panics, and whatever a decoder accepts, the
//! code after it (what the daemon does next with the result) handles without panicking and,
//! where there is an exact answer, gives it. Each function takes arbitrary bytes; the
//! `*_input` ones take a fuzz target's input, some of whose bytes choose how to read the rest.
//! Whoever includes this module includes `inputs.rs` beside it as `inputs`.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use kvsnap::inspect::inspect;
use kvsnap::snapshot::llama_file::{self, parse_seq_file, write_seq_file};
use kvsnap::snapshot::llama_state::{self, CacheLayout, ParseOptions, SequenceState, StateVersion};
use kvsnap::snapshot::manifest::{MANIFEST_MAGIC, Manifest};
use kvsnap::snapshot::pages::{self, PAGE_BYTES_MAX, PageId};
use kvsnap::snapshot::{LiveIdentity, MAGIC, MAGIC_V1, Snapshot};
use kvsnap::store::records::{AuditRecord, ForwardRecord, IncomingRecord, SessionRecord};
use kvsnap::store::remote::RemoteConversation;

const SALT: [u8; 32] = [7; 32];

/// A fuzz input for the state parser: the first byte chooses the parse options
/// (`options_from`), the rest is the section.
pub fn llama_state_input(data: &[u8]) {
    if let Some((&options, section)) = data.split_first() {
        llama_state(section, options_from(options));
    }
}

/// The server the snapshot target checks files against: the seeds' snapshots fit it.
pub fn live() -> LiveIdentity {
    let shape = crate::inputs::small_shape(6, false, false);
    crate::inputs::identity(shape.layouts(), shape.cell_ext)
}

/// A fuzz input for snapshots: the first byte chooses what the rest is, a whole file or a
/// body framed here with a valid checksum in either layout. Damage is caught by the checksum;
/// framing lets the fuzzer past it, as a hostile peer computing a valid one would get.
pub fn snapshot_input(data: &[u8], live: &LiveIdentity) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let head = [&MAGIC[..], rest].concat();
            [&head[..], blake3::hash(&head).as_bytes()].concat()
        }
        _ => [&MAGIC_V1[..], blake3::hash(rest).as_bytes(), rest].concat(),
    };
    snapshot(&file, live);
}

/// A fuzz input for manifests: the first byte chooses whether the rest is a whole manifest or
/// a body framed here with a valid checksum (what a peer or the fleet bucket could send).
pub fn manifest_input(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        manifest(rest);
    } else {
        let head = [&MANIFEST_MAGIC[..], rest].concat();
        manifest(&[&head[..], blake3::hash(&head).as_bytes()].concat());
    }
}

/// Parse options from one byte, so a fuzzer chooses them along with the bytes.
pub fn options_from(byte: u8) -> ParseOptions {
    ParseOptions {
        version: if byte & 1 == 0 {
            StateVersion::V4
        } else {
            StateVersion::V3
        },
        shape: llama_state::Shape {
            n_caches: usize::from((byte >> 1) & 3),
            cell_ext: byte & 8 != 0,
            has_v: true,
            recurrent: byte & 32 != 0,
        },
        max_cells: if byte & 16 != 0 { u32::MAX } else { 64 },
    }
}

/// `llama_state::parse`, and when it accepts, every rewrite the engine and the page store make
/// of a parsed section: each parses back to the same cells, and paging it and assembling the
/// pages gives back exactly the normalised section.
pub fn llama_state(bytes: &[u8], options: ParseOptions) {
    let Ok(state) = llama_state::parse(bytes, options) else {
        return;
    };
    assert_eq!(state.caches.len(), options.shape.n_caches);
    assert_eq!(state.recurrent.is_some(), options.shape.recurrent);
    let reparse = |bytes: &[u8], version| {
        let options = ParseOptions { version, ..options };
        llama_state::parse(bytes, options).expect("a rewritten section parses")
    };
    let normal = state.encode_for(bytes, 1);
    assert_eq!(state.normalised_pieces(bytes).concat(), normal);
    for n_stream in 1..=3 {
        let written = state.encode_for(bytes, n_stream);
        let again = reparse(&written, options.version);
        assert_eq!(again.encode_for(&written, 1), normal, "{n_stream} streams");
        assert_eq!(positions(&again), positions(&state));
    }

    // A restore frames the normalised section in place, between a header and a trailer.
    let normal_state = reparse(&normal, options.version);
    let header = *b"HEADER!!";
    for n_stream in [1, 3] {
        let mut buf = [&[0xee; 8][..], &normal, &[0xdd; 16]].concat();
        let range = normal_state
            .frame_in_place(&mut buf, 8, header, n_stream)
            .expect("a normalised section frames in place");
        let expected = [&header[..], &normal_state.encode_for(&normal, n_stream)].concat();
        assert_eq!(&buf[range], expected.as_slice());
    }

    let live = own_layouts(&state);
    let recurrent = state.recurrent.as_ref().map(|r| &r.layout);
    assert_eq!(state.check_layout(&live, recurrent), Ok(()));
    let rotations = vec![(16, 16); state.caches.len()];
    let v4 = state.to_v4(bytes, &rotations);
    let v4_state = reparse(&v4, StateVersion::V4);
    assert_eq!(positions(&v4_state), positions(&state));
    // V the other way round, and back: the same section when both are possible.
    let flipped: Vec<bool> = live.iter().map(|l| !l.v_trans).collect();
    if let Ok(other) = state.to_v4_with_v_layout(bytes, &rotations, &flipped) {
        let other_state = reparse(&other, StateVersion::V4);
        assert_eq!(positions(&other_state), positions(&state));
        let back: Vec<bool> = live.iter().map(|l| l.v_trans).collect();
        if let Ok(again) = other_state.to_v4_with_v_layout(&other, &[], &back) {
            assert_eq!(again, v4, "V transposed and back");
        }
    }

    pages_round_trip(&v4_state, &v4, options.shape.cell_ext);
}

/// Each cache's layout as the state records it; an empty cache gets an empty description.
pub fn own_layouts(state: &SequenceState) -> Vec<CacheLayout> {
    state
        .caches
        .iter()
        .map(|c| {
            c.layout.clone().unwrap_or(CacheLayout {
                v_trans: false,
                n_rot_k: 0,
                n_rot_v: 0,
                layers: Vec::new(),
                has_v: true,
            })
        })
        .collect()
}

/// Every cache's positions, and where the recurrent state stands (as a last list).
fn positions(state: &SequenceState) -> Vec<Vec<i32>> {
    let recurrent = state
        .recurrent
        .as_ref()
        .map(|r| r.position.into_iter().collect());
    state
        .caches
        .iter()
        .map(|c| c.positions.clone())
        .chain(recurrent)
        .collect()
}

/// Cuts a parsed normalised v4 `section` into pages and assembles them: exactly `section`
/// again, unless a cache holds a position twice (which `verify` refuses before any save).
pub fn pages_round_trip(state: &SequenceState, section: &[u8], cell_ext: bool) {
    // What the parser accepts, the pager must page: a refusal there used to travel as an
    // internal error (a 500) instead of the parser's 422 with a sentence.
    let (paged, split) = pages::split(state, section, cell_ext, &SALT, None, 0, &mut |_| None)
        .unwrap_or_else(|e| panic!("the parser accepted a state the pager refuses: {e}"));
    let mut store: HashMap<PageId, Vec<u8>> = HashMap::new();
    for page in split {
        let bytes = page.bytes.expect("a first split writes every page");
        assert_eq!(pages::page_id(&SALT, &bytes), page.page.id);
        let positions = (page.page.end - page.page.first) as usize;
        assert!(positions == 1 || bytes.len() <= PAGE_BYTES_MAX);
        store.insert(page.page.id, bytes);
    }
    let mut out = Vec::new();
    let assembled = pages::assemble(
        &paged,
        &own_layouts(state),
        state.recurrent.as_ref().map(|r| &r.layout),
        cell_ext,
        &|id| store.get(id).map(Vec::as_slice),
        &mut out,
        0,
    );
    let unique = state.caches.iter().all(|c| {
        let set: HashSet<&i32> = c.positions.iter().collect();
        set.len() == c.positions.len()
    });
    if unique {
        assert_eq!(assembled, Ok(()));
        assert!(
            out == section,
            "assembled pages differ from the section split"
        );
    }
}

/// A snapshot file: decoded, verified against `live`, cut into pages and put back together.
/// What decodes encodes canonically to bytes that decode to the same; a file that was already
/// canonical and normalised comes back from its pages byte for byte.
pub fn snapshot(bytes: &[u8], live: &LiveIdentity) {
    let _ = kvsnap::snapshot::is_snapshot(bytes);
    let Ok(decoded) = Snapshot::decode(bytes) else {
        assert!(Snapshot::decode_with_checksum(bytes).is_err());
        return;
    };
    let (_, checksum) = Snapshot::decode_with_checksum(bytes).expect("it decoded once");
    assert_eq!(checksum, blake3::hash(bytes));
    // A state stored as MessagePack bin is borrowed from the file, where a restore frames it;
    // one stored otherwise (an array of small integers, which serde_bytes also reads) is a
    // copy, and has no place in the file.
    match (&decoded.sequence_state, decoded.state_range_in(bytes)) {
        (Cow::Borrowed(state), Some(range)) => assert_eq!(&bytes[range], *state),
        (Cow::Owned(_), None) => {}
        (_, range) => panic!("a state's place in its file is {range:?}"),
    }
    let canonical = decoded.encode().expect("a decoded state fits");
    let again = Snapshot::decode(&canonical).expect("an encoded snapshot decodes");
    assert_eq!(again.encode().expect("it fits"), canonical);

    if let Ok(state) = decoded.verify(live) {
        let section: &[u8] = &decoded.sequence_state;
        let _ = state.encode_for(section, 2);
    }
    let Ok((manifest, page_bytes)) = Manifest::cut_file(bytes, None) else {
        return;
    };
    let store: HashMap<PageId, Vec<u8>> = page_bytes.into_iter().collect();
    let encoded = manifest.encode();
    assert_eq!(
        Manifest::decode(&encoded).expect("it decodes").encode(),
        encoded
    );
    let mut state = Vec::new();
    let assembled = manifest.assemble_state(&|id| store.get(id).map(Vec::as_slice), &mut state, 0);
    let section: &[u8] = &decoded.sequence_state;
    let layout = &decoded.layout;
    let options = layout.parse_options(StateVersion::V4, u32::MAX);
    let parsed = llama_state::parse(section, options).expect("cut_file parsed it");
    let exact = canonical == bytes
        && parsed.encode_for(section, 1) == section
        && parsed.caches.iter().all(|c| {
            let set: HashSet<&i32> = c.positions.iter().collect();
            set.len() == c.positions.len()
        });
    if exact {
        assert_eq!(assembled, Ok(()));
        let file = manifest.snapshot(&state).encode().expect("it fits");
        assert!(file == bytes, "the file assembled from its pages differs");
    }
}

/// A manifest: decoded, re-encoded canonically, and assembled from pages of the sizes its
/// layout implies (made up: only their sizes matter to assembly). A hostile peer makes pages
/// of any size it likes, so sizes are computed the way an unwary reader would, wrapping
/// around; a page too large for that is found empty.
pub fn manifest(bytes: &[u8]) {
    let Ok(manifest) = Manifest::decode(bytes) else {
        return;
    };
    let encoded = manifest.encode();
    assert_eq!(
        Manifest::decode(&encoded).expect("it decodes").encode(),
        encoded
    );
    let _ = manifest.page_ids();
    let _ = manifest.salt(None);
    let mut store: HashMap<PageId, Vec<u8>> = HashMap::new();
    for (index, cache) in manifest.state.caches.iter().enumerate() {
        let Some(layout) = manifest.layout.caches.get(index) else {
            continue;
        };
        let position_bytes = layout.layers.iter().fold(0u64, |sum, l| {
            sum.wrapping_add(l.k_row_size).wrapping_add(l.v_cell_size)
        });
        for page in &cache.pages {
            let positions = u64::from(page.end.wrapping_sub(page.first));
            // Small pages: a manifest of a few KB repeating a position or a page can ask
            // for many copies of it, and the state it assembles is that large.
            let size = Some(positions.wrapping_mul(position_bytes)).filter(|&s| s <= 4096);
            store
                .entry(page.id)
                .or_insert_with(|| (0..size.unwrap_or(0)).map(|i| i as u8).collect());
        }
    }
    let mut state = Vec::new();
    if manifest
        .assemble_state(&|id| store.get(id).map(Vec::as_slice), &mut state, 0)
        .is_ok()
    {
        let _ = manifest.snapshot(&state).encode();
    }
}

/// A `ggsq` header: what it accepts lies within the file, and a plain token list is written
/// back byte for byte.
pub fn seq_file(bytes: &[u8]) {
    let _ = llama_file::magic(bytes);
    let Ok(file) = parse_seq_file(bytes) else {
        return;
    };
    assert!(file.section_offset <= bytes.len());
    let _ = file.state_version();
    if !file.wrapped {
        let rebuilt = write_seq_file(file.version, &file.tokens, &bytes[file.section_offset..]);
        assert!(rebuilt == bytes, "a ggsq header written back differs");
    }
}

/// `kvsnap inspect`: a report or a sentence, never a panic.
pub fn inspect_file(bytes: &[u8]) {
    if let Err(message) = inspect(bytes) {
        assert!(!message.is_empty());
    }
}

/// Every stored record, and the fleet bucket's conversation object, from MessagePack: what
/// decodes encodes to bytes that decode to the same.
pub fn records(bytes: &[u8]) {
    if let Ok(record) = SessionRecord::decode(bytes) {
        assert_eq!(SessionRecord::decode(&record.encode()).ok(), Some(record));
    }
    if let Ok(record) = ForwardRecord::decode(bytes) {
        assert_eq!(ForwardRecord::decode(&record.encode()).ok(), Some(record));
    }
    if let Ok(record) = IncomingRecord::decode(bytes) {
        assert_eq!(IncomingRecord::decode(&record.encode()).ok(), Some(record));
    }
    if let Ok(record) = AuditRecord::decode(bytes) {
        assert_eq!(AuditRecord::decode(&record.encode()).ok(), Some(record));
    }
    // The bucket's object behind its magic and checksum (which `Remote` checks first).
    if let Ok(object) = rmp_serde::from_slice::<RemoteConversation>(bytes) {
        let encoded = rmp_serde::to_vec_named(&object).expect("it serializes");
        let again: RemoteConversation = rmp_serde::from_slice(&encoded).expect("it decodes");
        assert_eq!(again, object);
        let _ = object.page_ids();
    }
}

/// A key ring with fixed keys, so seeds sealed by `seeds.rs` open here and mutations of them
/// reach past the header.
pub fn fixed_ring() -> &'static kvsnap::keys::KeyRing {
    static RING: std::sync::OnceLock<kvsnap::keys::KeyRing> = std::sync::OnceLock::new();
    RING.get_or_init(|| {
        let mut keys = std::collections::BTreeMap::new();
        keys.insert("k1".to_string(), zeroize::Zeroizing::new([2u8; 32]));
        let file = kvsnap::keys::KeyFile {
            page_ids: zeroize::Zeroizing::new([1u8; 32]),
            current: "k1".into(),
            keys,
        };
        kvsnap::keys::KeyRing::new(&file).expect("a ring from fixed keys")
    })
}

/// The place seeds' sealed blobs are bound to.
pub const SEALED_PLACE: &[u8] = b"fuzz";

/// A sealed blob or a sealed snapshot file: what opens seals and opens back to itself; nothing
/// panics, and `inspect` answers.
pub fn sealed(bytes: &[u8]) {
    let ring = fixed_ring();
    let _ = kvsnap::keys::sealed_key_id(bytes);
    if let Ok(plain) = ring.open(SEALED_PLACE, bytes) {
        let again = ring.seal(SEALED_PLACE, &plain);
        assert_eq!(ring.open(SEALED_PLACE, &again).ok(), Some(plain));
    }
    if let Ok((file, owner)) = kvsnap::keys::open_sealed_file(ring, bytes) {
        let owner = owner.flatten();
        let again = kvsnap::keys::sealed_file(ring, &file, owner.as_deref());
        assert_eq!(
            kvsnap::keys::open_sealed_file(ring, &again).ok(),
            Some((file, Some(owner)))
        );
    }
    inspect_file(bytes);
}
