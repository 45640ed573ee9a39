//! The format against llama.cpp's own files (tests/fixtures/llama-cpp/) and against damage.

use super::llama_state::{self, ParseOptions, StateVersion};
use super::*;

const V4: &[u8] = include_bytes!("../../tests/fixtures/llama-cpp/lighthouse.v4.ggsq");
const V3: &[u8] = include_bytes!("../../tests/fixtures/llama-cpp/lighthouse.v3.ggsq");

/// The memory section of a `ggsq` file: after magic, version, count and `count` words.
fn memory_section(file: &[u8]) -> &[u8] {
    let count = u32::from_le_bytes(file[8..12].try_into().unwrap()) as usize;
    &file[12 + 4 * count..]
}

fn options(version: StateVersion) -> ParseOptions {
    ParseOptions {
        version,
        shape: llama_state::Shape {
            n_caches: 2,
            cell_ext: false,
            has_v: true,
            recurrent: false,
        },
        max_cells: 8192,
    }
}

#[test]
fn llama_cpps_own_v4_state_parses_completely() {
    let state = llama_state::parse(memory_section(V4), options(StateVersion::V4)).unwrap();
    assert_eq!(
        state.caches.len(),
        2,
        "Gemma 3 writes its full cache, then its window cache"
    );
    let full = &state.caches[0];
    assert_eq!(full.positions, (0..50).collect::<Vec<_>>());
    let layers = |i: usize| state.caches[i].layout.as_ref().unwrap().layers.len();
    assert_eq!(layers(0) + layers(1), 18, "Gemma 3 270M has 18 layers");
    assert_eq!(layers(0), 3, "3 of them attend to the whole history");
}

#[test]
fn llama_servers_v3_state_parses_without_the_v4_fields() {
    let state = llama_state::parse(memory_section(V3), options(StateVersion::V3)).unwrap();
    assert_eq!(state.caches[0].positions.len(), 49);
    assert!(llama_state::parse(memory_section(V3), options(StateVersion::V4)).is_err());
}

#[test]
fn every_truncation_of_the_state_is_an_error_not_a_panic() {
    let section = memory_section(V4);
    // Every offset in the metadata and the first rows, then a stride through the bulk.
    let offsets = (0..4096).chain((4096..section.len()).step_by(97));
    for end in offsets {
        assert!(llama_state::parse(&section[..end], options(StateVersion::V4)).is_err());
    }
}

#[test]
fn a_rewritten_section_has_the_live_stream_count_and_parses_back() {
    let section = memory_section(V4);
    let state = llama_state::parse(section, options(StateVersion::V4)).unwrap();
    let four = state.encode_for(section, 4);
    let again = llama_state::parse(&four, options(StateVersion::V4)).unwrap();
    assert_eq!(again.caches[0].n_stream, 4);
    assert_eq!(again.caches[0].positions, state.caches[0].positions);
    assert_eq!(again.encode_for(&four, 1), section);
}

fn sample_snapshot() -> (Snapshot<'static>, LiveIdentity) {
    let section = memory_section(V4);
    let state = llama_state::parse(section, options(StateVersion::V4)).unwrap();
    let caches: Vec<_> = state
        .caches
        .iter()
        .map(|c| c.layout.clone().unwrap())
        .collect();
    let model = ModelIdentity {
        file_hash: "ab".repeat(32),
        architecture: "gemma3".into(),
        n_layer: 18,
        n_embd: 640,
        n_vocab: 262_144,
    };
    let layout = LayoutIdentity {
        flash_attention: false,
        n_ctx_per_sequence: 4096,
        n_swa: 512,
        n_ubatch: 512,
        llama_build: "test".into(),
        cell_ext: false,
        caches,
        compute_profile: Some("avx512".into()),
        recurrent: None,
    };
    let tokens: Vec<i32> = (0..50).map(|i| 1000 + i).collect();
    let snapshot = Snapshot {
        format_version: FORMAT_VERSION,
        model: model.clone(),
        layout: layout.clone(),
        tokens,
        sampling: None,
        rng: RngState::from_seed(9),
        pending_token: Some(17),
        sequence_state: section.to_vec().into(),
        created_unix_ms: 1,
    };
    (snapshot, LiveIdentity { model, layout })
}

#[test]
fn a_snapshot_round_trips_and_verifies() {
    let (snapshot, live) = sample_snapshot();
    let bytes = snapshot.encode().unwrap();
    let back = Snapshot::decode(&bytes).unwrap();
    assert_eq!(back, snapshot);
    back.verify(&live).unwrap();
}

#[test]
fn the_pieces_are_the_file_rmp_serde_would_write() {
    let (snapshot, _) = sample_snapshot();
    let parts = snapshot.encode_parts().unwrap();
    let file = parts.to_vec();
    let body = rmp_serde::to_vec_named(&snapshot).unwrap();
    assert_eq!(&file[..MAGIC.len()], MAGIC);
    assert_eq!(&file[MAGIC.len()..file.len() - 32], body.as_slice());
    assert_eq!(
        &parts.trailer,
        blake3::hash(&file[..file.len() - 32]).as_bytes()
    );
    assert_eq!(parts.file_checksum, blake3::hash(&file));
    let (_, checksum) = Snapshot::decode_with_checksum(&file).unwrap();
    assert_eq!(checksum, blake3::hash(&file));
    assert_eq!(parts.len(), file.len());
    // Small states get the short bin headers.
    for len in [0, 1, 255, 256, 65_535, 65_536] {
        let mut small = snapshot.clone();
        small.sequence_state = vec![7u8; len].into();
        let file = small.encode().unwrap();
        let body = rmp_serde::to_vec_named(&small).unwrap();
        assert_eq!(
            &file[MAGIC.len()..file.len() - 32],
            body.as_slice(),
            "{len}"
        );
        assert_eq!(Snapshot::decode(&file).unwrap(), small);
    }
}

#[test]
fn files_of_the_first_layout_still_read() {
    let (snapshot, live) = sample_snapshot();
    // Magic, blake3 of the body, body: how the first kvsnap wrote snapshots.
    let body = rmp_serde::to_vec_named(&snapshot).unwrap();
    let v1 = [&MAGIC_V1[..], blake3::hash(&body).as_bytes(), &body].concat();
    let back = Snapshot::decode(&v1).unwrap();
    assert_eq!(back, snapshot);
    let (_, checksum) = Snapshot::decode_with_checksum(&v1).unwrap();
    assert_eq!(checksum, blake3::hash(&v1));
    back.verify(&live).unwrap();
    for at in [0, 9, 60, v1.len() / 2, v1.len() - 1] {
        let mut flipped = v1.clone();
        flipped[at] ^= 0x10;
        assert!(Snapshot::decode(&flipped).is_err(), "bit flip at {at}");
    }
    assert!(Snapshot::decode(&v1[..39]).is_err());
    // A layout from a newer kvsnap is named as such, not called damage.
    let mut newer = snapshot.encode().unwrap();
    newer[7] = 9;
    assert_eq!(
        Snapshot::decode(&newer),
        Err(SnapshotError::UnknownLayout(9))
    );
}

#[test]
fn damage_is_detected_before_anything_is_parsed() {
    let (snapshot, _) = sample_snapshot();
    let bytes = snapshot.encode().unwrap();
    for at in [0, 9, 60, bytes.len() / 2, bytes.len() - 33, bytes.len() - 1] {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x10;
        assert!(Snapshot::decode(&flipped).is_err(), "bit flip at {at}");
    }
    for end in [0, 5, 8, 39, 40, 100, bytes.len() - 1] {
        assert!(
            Snapshot::decode(&bytes[..end]).is_err(),
            "truncated at {end}"
        );
    }
}

#[test]
fn a_mismatch_names_what_differs() {
    let (snapshot, live) = sample_snapshot();
    let mut other_model = live.clone();
    other_model.model.file_hash = "cd".repeat(32);
    let message = snapshot.verify(&other_model).unwrap_err().to_string();
    assert!(message.contains("another model"), "{message}");

    let mut other_types = live.clone();
    other_types.layout.caches[0].layers[0].k_type = 8;
    let message = snapshot.verify(&other_types).unwrap_err().to_string();
    assert!(message.contains("q8_0"), "{message}");

    let mut smaller = live.clone();
    smaller.layout.n_ctx_per_sequence = 32;
    let message = snapshot.verify(&smaller).unwrap_err().to_string();
    assert!(message.contains("holds at most 32"), "{message}");
    // Exactly full fits: a conversation stops generating when it fills its sequence.
    let mut exact = live.clone();
    exact.layout.n_ctx_per_sequence = 50;
    assert!(snapshot.verify(&exact).is_ok());

    let mut flash = live;
    flash.layout.flash_attention = true;
    assert!(matches!(
        snapshot.verify(&flash),
        Err(SnapshotError::Incompatible(_))
    ));
}

#[test]
fn a_v3_state_translates_to_a_v4_state_that_parses() {
    let section = memory_section(V3);
    let v3 = llama_state::parse(section, options(StateVersion::V3)).unwrap();
    let v4 = v3.to_v4(section, &[(0, 0), (0, 0)]);
    assert_eq!(v4.len(), section.len() + 2 * 8);
    let again = llama_state::parse(&v4, options(StateVersion::V4)).unwrap();
    assert_eq!(again.caches[0].positions, v3.caches[0].positions);
    assert_eq!(
        again.caches[1].layout.as_ref().unwrap().layers,
        v3.caches[1].layout.as_ref().unwrap().layers
    );
}

#[test]
fn v_translates_between_row_and_transposed_and_back() {
    let section = memory_section(V4);
    let state = llama_state::parse(section, options(StateVersion::V4)).unwrap();
    assert!(
        !state.caches[0].layout.as_ref().unwrap().v_trans,
        "the fixture stores V by row"
    );
    let transposed = state
        .to_v4_with_v_layout(section, &[], &[true, true])
        .unwrap();
    let parsed = llama_state::parse(&transposed, options(StateVersion::V4)).unwrap();
    assert!(parsed.caches[0].layout.as_ref().unwrap().v_trans);
    assert_ne!(transposed, section);
    let back = parsed
        .to_v4_with_v_layout(&transposed, &[], &[false, false])
        .unwrap();
    assert_eq!(back, section, "row -> transposed -> row is the identity");
}

#[test]
fn framing_in_place_gives_the_bytes_write_for_gives() {
    let section = memory_section(V4);
    let state = llama_state::parse(section, options(StateVersion::V4)).unwrap();
    let normal = state.encode_for(section, 1);
    let state = llama_state::parse(&normal, options(StateVersion::V4)).unwrap();
    let header = *b"HEADER!!";
    for n_stream in [1, 2, 3, 8] {
        let expected = [&header[..], &state.encode_for(&normal, n_stream)].concat();
        // Some bytes before the section (a file's head) and after it (its trailer).
        let mut buf = [vec![0xee; 20], normal.clone(), vec![0xdd; 32]].concat();
        let range = state
            .frame_in_place(&mut buf, 20, header, n_stream)
            .unwrap();
        assert_eq!(&buf[range], expected.as_slice(), "{n_stream} streams");
    }
    // A cache without cells (one empty stream) is framed the same way.
    let first_end = state.caches[0].stream_range.clone().unwrap().end;
    let mut second_empty = normal[..first_end].to_vec();
    second_empty.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    let empty = llama_state::parse(&second_empty, options(StateVersion::V4)).unwrap();
    assert!(empty.caches[1].stream_range.is_none());
    let expected = [&header[..], &empty.encode_for(&second_empty, 4)].concat();
    let mut buf = [vec![1; 8], second_empty.clone()].concat();
    let range = empty.frame_in_place(&mut buf, 8, header, 4).unwrap();
    assert_eq!(&buf[range], expected.as_slice());
    // A section with two streams per cache is not framed in place.
    let two = state.encode_for(&normal, 2);
    let state_two = llama_state::parse(&two, options(StateVersion::V4)).unwrap();
    let mut buf = [vec![0; 8], two.clone()].concat();
    assert!(state_two.frame_in_place(&mut buf, 8, header, 2).is_none());
    assert_eq!(&buf[8..], two.as_slice());
    // Nor one without room for the header.
    let mut buf = normal.clone();
    assert!(state.frame_in_place(&mut buf, 0, header, 2).is_none());
}

#[test]
fn normalised_pieces_concatenate_to_the_normalised_section() {
    let section = memory_section(V4);
    let state = llama_state::parse(section, options(StateVersion::V4)).unwrap();
    for n_stream in [1, 2, 3] {
        // As a context with `n_stream` streams writes it, then read back as a save does.
        let written = state.encode_for(section, n_stream);
        let parsed = llama_state::parse(&written, options(StateVersion::V4)).unwrap();
        assert_eq!(
            parsed.normalised_pieces(&written).concat(),
            state.encode_for(section, 1),
            "{n_stream} streams"
        );
    }
    // A cache without cells.
    let first_end = state.caches[0].stream_range.clone().unwrap().end;
    let mut second_empty = section[..first_end].to_vec();
    second_empty.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let empty = llama_state::parse(&second_empty, options(StateVersion::V4)).unwrap();
    assert_eq!(
        empty.normalised_pieces(&second_empty).concat(),
        empty.encode_for(&second_empty, 1)
    );
}

/// `has_v` came after stores were written: a layout with V encodes byte for byte as before
/// (page salts are made from this encoding), and an old encoding reads back with V.
#[test]
fn a_layout_with_v_encodes_as_before_latent_attention_was_known() {
    #[derive(serde::Serialize)]
    struct Before {
        v_trans: bool,
        n_rot_k: u32,
        n_rot_v: u32,
        layers: Vec<llama_state::LayerLayout>,
    }
    let state = llama_state::parse(memory_section(V4), options(StateVersion::V4)).unwrap();
    let layout = state.caches[0].layout.clone().unwrap();
    assert!(layout.has_v);
    let before = Before {
        v_trans: layout.v_trans,
        n_rot_k: layout.n_rot_k,
        n_rot_v: layout.n_rot_v,
        layers: layout.layers.clone(),
    };
    let old = rmp_serde::to_vec(&before).unwrap();
    assert_eq!(rmp_serde::to_vec(&layout).unwrap(), old);
    assert_eq!(
        rmp_serde::to_vec_named(&layout).unwrap(),
        rmp_serde::to_vec_named(&before).unwrap()
    );
    let read: llama_state::CacheLayout = rmp_serde::from_slice(&old).unwrap();
    assert_eq!(read, layout);
    let latent = llama_state::CacheLayout {
        has_v: false,
        ..layout
    };
    let round: llama_state::CacheLayout =
        rmp_serde::from_slice(&rmp_serde::to_vec(&latent).unwrap()).unwrap();
    assert_eq!(round, latent);
}

/// A recurrent section as llama.cpp writes one sequence's: a cell at `position` (or none), and
/// per layer an r row and an s row of f32.
fn recurrent_section(position: Option<i32>, layers: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    let word = |out: &mut Vec<u8>, w: u32| out.extend_from_slice(&w.to_le_bytes());
    word(&mut out, u32::from(position.is_some()));
    if let Some(position) = position {
        word(&mut out, position as u32);
        word(&mut out, 0);
    }
    word(&mut out, 0);
    word(&mut out, layers.len() as u32 + 1);
    let cells = usize::from(position.is_some());
    for s_rows in [false, true] {
        for (layer, &(r, s)) in layers.iter().enumerate() {
            let row = if s_rows { s } else { r };
            word(&mut out, 0);
            out.extend_from_slice(&row.to_le_bytes());
            out.extend((0..row as usize * cells).map(|at| (at + layer * 7) as u8));
        }
    }
    out
}

fn recurrent_options() -> ParseOptions {
    ParseOptions {
        version: StateVersion::V4,
        shape: llama_state::Shape {
            n_caches: 0,
            cell_ext: false,
            has_v: true,
            recurrent: true,
        },
        max_cells: 8192,
    }
}

#[test]
fn a_recurrent_section_parses_and_damage_to_it_is_refused() {
    let section = recurrent_section(Some(41), &[(24, 64), (24, 0)]);
    let state = llama_state::parse(&section, recurrent_options()).unwrap();
    let recurrent = state.recurrent.as_ref().unwrap();
    assert_eq!(recurrent.position, Some(41));
    assert_eq!(recurrent.layout.n_layer, 3);
    assert_eq!(recurrent.layout.row_bytes(), 24 + 64 + 24);
    assert_eq!(recurrent.layout.section_bytes(), section.len());
    // Its rows, written back around the same cell, are the same section.
    let mut again = Vec::new();
    llama_state::write_recurrent(
        &recurrent.layout,
        Some(41),
        &recurrent.rows(&section),
        &mut |piece| again.extend_from_slice(piece),
    )
    .unwrap();
    assert_eq!(again, section);
    // Rewriting for several streams leaves it alone (it has no stream count).
    assert_eq!(state.encode_for(&section, 3), section);

    let at_word = |at: usize, value: u32| {
        let mut damaged = section.clone();
        damaged[at..at + 4].copy_from_slice(&value.to_le_bytes());
        damaged
    };
    let refused = [
        ("two cells", at_word(0, 2)),
        ("a cell with sequence ids", at_word(8, 1)),
        ("a transposed S", at_word(12, 1)),
        ("more row blocks than layers", at_word(16, 1)),
        ("a row block short", section[..section.len() - 12].to_vec()),
        ("truncated", section[..section.len() - 1].to_vec()),
    ];
    for (what, damaged) in refused {
        assert!(
            llama_state::parse(&damaged, recurrent_options()).is_err(),
            "{what}"
        );
    }
    // A row size that would be absurd even with no cell to hold it.
    let mut empty = recurrent_section(None, &[(24, 64)]);
    empty[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(llama_state::parse(&empty, recurrent_options()).is_err());
}

#[test]
fn a_recurrent_snapshot_verifies_only_where_its_history_ends() {
    let (mut snapshot, mut live) = sample_snapshot();
    let tokens = snapshot.tokens.len() as i32;
    let section = recurrent_section(Some(tokens - 1), &[(24, 64), (24, 64)]);
    let parsed = llama_state::parse(&section, recurrent_options()).unwrap();
    live.layout.caches.clear();
    live.layout.recurrent = parsed.recurrent.map(|r| r.layout);
    snapshot.layout = live.layout.clone();
    snapshot.sequence_state = section.into();
    snapshot.verify(&live).unwrap();

    let mut behind = snapshot.clone();
    behind.sequence_state = recurrent_section(Some(tokens - 2), &[(24, 64), (24, 64)]).into();
    assert!(matches!(
        behind.verify(&live),
        Err(SnapshotError::Corrupt(_))
    ));

    let mut other = live.clone();
    other.layout.recurrent.as_mut().unwrap().layers[1].s_row_size = 32;
    let refused = snapshot.verify(&other).unwrap_err();
    assert!(
        matches!(refused, SnapshotError::Incompatible(_)),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("recurrent layer 1"),
        "{refused}"
    );

    // A layout without a recurrent state encodes as it did before there was one.
    let (plain, _) = sample_snapshot();
    let encoded = rmp_serde::to_vec_named(&plain.layout).unwrap();
    assert!(!encoded.windows(9).any(|w| w == b"recurrent"));
}
