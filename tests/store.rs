//! The store's schema upgrades: a file written by schema v1 (tests/fixtures/store/v1.redb), and
//! a store of whole snapshots (schema v3) cut into pages at open.

use kvsnap::sampling::RngState;
use kvsnap::sessions::paging;
use kvsnap::snapshot::llama_state::{self, ParseOptions, StateVersion};
use kvsnap::snapshot::{FORMAT_VERSION, LayoutIdentity, ModelIdentity, Snapshot, llama_file};
use kvsnap::store::records::{RECORD_VERSION, SessionRecord};
use kvsnap::store::{SCHEMA_VERSION, SessionStore, Store};
use uuid::Uuid;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store/v1.redb");
const FIXTURE_ID: u128 = 0x0b6e1c52_8f3a_4c1e_9d55_2f6b8e7a4c10;
const FIXTURE_SNAPSHOT: &[u8] = b"a v1 snapshot payload";
const LLAMA_V4: &[u8] = include_bytes!("fixtures/llama-cpp/lighthouse.v4.ggsq");

fn fixture_record() -> SessionRecord {
    SessionRecord {
        record_version: RECORD_VERSION,
        owner: None,
        created_ms: 1_795_000_000_000,
        last_used_ms: 1_795_000_000_500,
        tokens: 42,
        bytes: FIXTURE_SNAPSHOT.len() as u64,
        chunks: 1,
        checksum: blake3::hash(FIXTURE_SNAPSHOT).to_hex().to_string(),
        model: "fixture".into(),
        damaged: None,
        // Written before records carried a profile: it reads as unknown.
        compute_profile: None,
        saves: 0,
    }
}

#[test]
fn a_v1_database_upgrades_and_keeps_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("copy.redb");
    std::fs::copy(FIXTURE, &path).expect("the v1 fixture is committed");
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let id = Uuid::from_u128(FIXTURE_ID);
    // Its payload is not a real snapshot, so step 4 cannot cut it into pages: the file is kept
    // whole, downloadable, and the record says why it is damaged.
    let record = store.record(id).unwrap().unwrap();
    let reason = record.damaged.clone().expect("marked damaged");
    assert!(reason.contains("could not cut it into pages"), "{reason}");
    assert_eq!(
        SessionRecord {
            damaged: None,
            ..record.clone()
        },
        fixture_record()
    );
    assert_eq!(
        store.legacy_snapshot(id).unwrap().unwrap(),
        FIXTURE_SNAPSHOT
    );
    assert_eq!(
        paging::stored_file(&store, id, &record).unwrap().unwrap(),
        FIXTURE_SNAPSHOT
    );
    // The v2 index lists it, and the v3 forwards table exists (nothing moved yet).
    assert_eq!(store.forward(id).unwrap(), None);
    let listed = store.list(10, &|_| true).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, id);
    assert!(store.check().unwrap().is_empty());
    drop(store);
    // Opening again is a no-op.
    assert_eq!(
        Store::open(&path).unwrap().schema_version().unwrap(),
        SCHEMA_VERSION
    );
}

/// A real snapshot: llama.cpp's own v4 state file of the default model, wrapped as kvsnap
/// wrote snapshots before pages.
fn real_snapshot_file() -> Vec<u8> {
    let file = llama_file::parse_seq_file(LLAMA_V4).unwrap();
    let section = &LLAMA_V4[file.section_offset..];
    let options = ParseOptions {
        version: StateVersion::V4,
        shape: llama_state::KNOWN_SHAPES[2],
        max_cells: 8192,
    };
    let state = llama_state::parse(section, options).unwrap();
    let snapshot = Snapshot {
        format_version: FORMAT_VERSION,
        model: ModelIdentity {
            file_hash: "ab".repeat(32),
            architecture: "gemma3".into(),
            n_layer: 18,
            n_embd: 640,
            n_vocab: 262_144,
        },
        layout: LayoutIdentity {
            flash_attention: true,
            n_ctx_per_sequence: 4096,
            n_swa: 512,
            n_ubatch: 512,
            llama_build: "llama-cpp-sys-2 0.1.161".into(),
            cell_ext: false,
            caches: state
                .caches
                .iter()
                .filter_map(|c| c.layout.clone())
                .collect(),
            compute_profile: None,
            recurrent: None,
        },
        tokens: file.tokens,
        sampling: None,
        rng: RngState::from_seed(3),
        pending_token: None,
        created_unix_ms: 1_795_000_000_000,
        sequence_state: state.encode_for(section, 1).into(),
    };
    snapshot.encode().unwrap()
}

fn whole_record(file: &[u8], owner: Option<&str>) -> SessionRecord {
    SessionRecord {
        owner: owner.map(str::to_string),
        tokens: 50,
        bytes: file.len() as u64,
        chunks: file.len().div_ceil(1 << 20) as u32,
        checksum: blake3::hash(file).to_hex().to_string(),
        ..fixture_record()
    }
}

#[test]
fn whole_snapshots_are_cut_into_pages_that_assemble_to_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v3.redb");
    let file = real_snapshot_file();
    let (alice, alice_again, bob) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    {
        let old = Store::create_at_version_for_tests(&path, 3).unwrap();
        old.put_whole_for_tests(alice, &whole_record(&file, Some("alice")), &file, true)
            .unwrap();
        old.put_whole_for_tests(
            alice_again,
            &whole_record(&file, Some("alice")),
            &file,
            true,
        )
        .unwrap();
        old.put_whole_for_tests(bob, &whole_record(&file, Some("bob")), &file, true)
            .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    for id in [alice, alice_again, bob] {
        let record = store.record(id).unwrap().unwrap();
        assert_eq!(record.damaged, None, "{id}");
        assert!(
            store.legacy_snapshot(id).unwrap().is_none(),
            "no whole file left"
        );
        let again = paging::stored_file(&store, id, &record).unwrap().unwrap();
        assert!(
            again == file,
            "{id}: the pages assemble to the very same file"
        );
    }
    // One owner's two identical conversations share their pages; the other owner's are apart.
    let stats = store.page_stats().unwrap();
    assert_eq!(
        stats.references, 6,
        "two caches, one page each, three conversations"
    );
    assert_eq!(
        stats.pages, 4,
        "alice's pages stored once, bob's separately"
    );
    assert!(store.check().unwrap().is_empty());
    store.delete(alice).unwrap();
    store.delete(bob).unwrap();
    assert_eq!(
        store.page_stats().unwrap().pages,
        2,
        "alice_again keeps hers"
    );
    store.delete(alice_again).unwrap();
    assert_eq!(store.page_stats().unwrap().pages, 0);
    assert!(store.check().unwrap().is_empty());
}

/// Regenerates the fixture: `cargo test --release --test store -- --ignored write_v1_fixture`.
#[test]
#[ignore]
fn write_v1_fixture() {
    let _ = std::fs::remove_file(FIXTURE);
    let store = Store::create_at_version_for_tests(std::path::Path::new(FIXTURE), 1).unwrap();
    store
        .put_whole_for_tests(
            Uuid::from_u128(FIXTURE_ID),
            &fixture_record(),
            FIXTURE_SNAPSHOT,
            false,
        )
        .unwrap();
}
