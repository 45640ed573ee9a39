//! The store against a file written by schema v1, kept in tests/fixtures/store/v1.redb.

use kvsnap::store::records::{RECORD_VERSION, SessionRecord};
use kvsnap::store::{SCHEMA_VERSION, SessionStore, Store};
use uuid::Uuid;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/store/v1.redb");
const FIXTURE_ID: u128 = 0x0b6e1c52_8f3a_4c1e_9d55_2f6b8e7a4c10;
const FIXTURE_SNAPSHOT: &[u8] = b"a v1 snapshot payload";

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
    assert_eq!(store.record(id).unwrap().unwrap(), fixture_record());
    assert_eq!(store.snapshot(id).unwrap().unwrap(), FIXTURE_SNAPSHOT);
    // The v2 index lists it, and the v3 forwards table exists (nothing moved yet).
    assert_eq!(store.forward(id).unwrap(), None);
    let listed = store.list(0, 10).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, id);
    drop(store);
    // Opening again is a no-op.
    assert_eq!(
        Store::open(&path).unwrap().schema_version().unwrap(),
        SCHEMA_VERSION
    );
}

/// Regenerates the fixture: `cargo test --release --test store -- --ignored write_v1_fixture`.
#[test]
#[ignore]
fn write_v1_fixture() {
    let _ = std::fs::remove_file(FIXTURE);
    let store = Store::create_v1_for_tests(std::path::Path::new(FIXTURE)).unwrap();
    store
        .put_v1_for_tests(
            Uuid::from_u128(FIXTURE_ID),
            &fixture_record(),
            FIXTURE_SNAPSHOT,
        )
        .unwrap();
}
