//! Durable storage of conversations, in one redb file.
//!
//! - `tables.rs`: every table. `records.rs`: the stored record types.
//! - `migrations/` (top level): the schema steps, applied by `Store::open`.
//!
//! Promises: a `put` is one write transaction committed with fsync (`Durability::Immediate`):
//! after it returns the snapshot survives a crash, and a crash before it leaves the previous
//! snapshot whole — redb never exposes half a transaction. Reads check the snapshot's checksum.
//! All calls block: callers on the async runtime use `spawn_blocking`.

pub mod records;
pub mod tables;

#[path = "../../migrations/mod.rs"]
mod migrations;

use std::borrow::Cow;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable};
use uuid::Uuid;

use records::{ForwardRecord, SessionRecord};
use tables::{CHUNK_BYTES, CHUNKS, FORWARDS, LAST_USED, META, SCHEMA_VERSION_KEY, SESSIONS};

/// The schema this build writes.
pub const SCHEMA_VERSION: u64 = 3;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error(
        "the store at {path} has schema version {found}, newer than this kvsnap ({SCHEMA_VERSION}); upgrade kvsnap"
    )]
    TooNew { path: String, found: u64 },
    #[error("the stored snapshot of {0} is damaged: {1}")]
    Damaged(Uuid, String),
    #[error("store failure: {0}")]
    Io(String),
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => { $( impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Io(e.to_string()) }
    } )* };
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A snapshot file handed to `put`: pieces that concatenate to it, so a caller need not copy
/// megabytes into one buffer first, and the blake3 of the whole file.
pub struct SnapshotBlob<'a> {
    pieces: Vec<&'a [u8]>,
    checksum: blake3::Hash,
}

impl<'a> SnapshotBlob<'a> {
    /// A file in one buffer, hashed here.
    pub fn whole(bytes: &'a [u8]) -> Self {
        SnapshotBlob {
            pieces: vec![bytes],
            checksum: crate::snapshot::checksum(bytes),
        }
    }

    /// A file in pieces, with the checksum its producer computed while writing them
    /// (`EncodedSnapshot` hashes its pieces in the same pass that makes its own hash).
    pub fn pieces(pieces: Vec<&'a [u8]>, checksum: blake3::Hash) -> Self {
        SnapshotBlob { pieces, checksum }
    }

    pub fn len(&self) -> usize {
        self.pieces.iter().map(|p| p.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file cut into `size`-byte chunks: borrowed where a chunk lies inside one piece,
    /// copied only where it straddles two.
    fn chunks(&self, size: usize) -> Vec<Cow<'a, [u8]>> {
        let mut chunks = Vec::new();
        let mut straddling: Vec<u8> = Vec::new();
        for &piece in &self.pieces {
            let mut rest = piece;
            if !straddling.is_empty() {
                let take = rest.len().min(size - straddling.len());
                straddling.extend_from_slice(&rest[..take]);
                rest = &rest[take..];
                if straddling.len() == size {
                    chunks.push(Cow::Owned(std::mem::take(&mut straddling)));
                }
            }
            while rest.len() >= size {
                chunks.push(Cow::Borrowed(&rest[..size]));
                rest = &rest[size..];
            }
            straddling.extend_from_slice(rest);
        }
        if !straddling.is_empty() {
            chunks.push(Cow::Owned(straddling));
        }
        chunks
    }
}

/// The store's small interface, so a shared remote store can take its place later.
pub trait SessionStore: Send + Sync {
    /// Replaces the conversation's record and snapshot atomically and durably. The record's
    /// size, chunk count and checksum are taken from `snapshot`.
    fn put(
        &self,
        id: Uuid,
        record: &SessionRecord,
        snapshot: &SnapshotBlob<'_>,
    ) -> Result<(), StoreError>;
    fn record(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError>;
    /// The snapshot file, checked against the record's checksum.
    fn snapshot(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError>;
    /// The snapshot file into `out` (its contents replaced), without the store's own checksum
    /// pass; false if there is none. Only for readers that verify every byte themselves: a
    /// restore decodes it with `Snapshot::decode`, whose blake3 covers the same bytes, so
    /// hashing twice would only cost time. `out` is the caller's to reuse: megabytes of fresh
    /// memory cost a page fault per 4 KiB (measured: 20 MB read in 14 ms fresh, 2.5 ms reused).
    fn read_snapshot_into(&self, id: Uuid, out: &mut Vec<u8>) -> Result<bool, StoreError>;
    fn delete(&self, id: Uuid) -> Result<bool, StoreError>;
    fn mark_damaged(&self, id: Uuid, reason: &str) -> Result<(), StoreError>;
    /// Newest use first.
    fn list(&self, offset: usize, limit: usize) -> Result<Vec<(Uuid, SessionRecord)>, StoreError>;
    /// Where the conversation went, if it moved to another instance.
    fn forward(&self, id: Uuid) -> Result<Option<ForwardRecord>, StoreError>;
    /// Deletes the conversation and records where it went, in one durable transaction: after
    /// a crash it is either still here whole or forwarded, never neither.
    fn move_out(&self, id: Uuid, forward: &ForwardRecord) -> Result<(), StoreError>;
}

pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) the file and brings its schema up to `SCHEMA_VERSION`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let fail = |message: String| StoreError::Open {
            path: shown.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
        }
        let db = Database::create(path).map_err(|e| fail(e.to_string()))?;
        let store = Store { db };
        let found = store.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: shown, found });
        }
        store.migrate(found)?;
        Ok(store)
    }

    /// The file's schema version; 0 for a new file.
    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(SCHEMA_VERSION_KEY)?.map_or(0, |v| v.value()))
    }

    /// Applies the steps after `from`, each with its version number in one transaction.
    fn migrate(&self, from: u64) -> Result<(), StoreError> {
        for step in migrations::MIGRATIONS.iter().filter(|m| m.version > from) {
            tracing::info!(
                version = step.version,
                name = step.name,
                "applying store migration"
            );
            let txn = self.db.begin_write()?;
            (step.apply)(&txn)?;
            txn.open_table(META)?
                .insert(SCHEMA_VERSION_KEY, step.version)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// The record, with the concatenated chunks in `out` (replaced), unchecked.
    fn read_snapshot(
        &self,
        id: Uuid,
        out: &mut Vec<u8>,
    ) -> Result<Option<SessionRecord>, StoreError> {
        let Some(record) = self.record(id)? else {
            return Ok(None);
        };
        let key = id.as_u128();
        let txn = self.db.begin_read()?;
        let chunks = txn.open_table(CHUNKS)?;
        out.clear();
        out.reserve(record.bytes as usize);
        for entry in chunks.range((key, 0)..=(key, u32::MAX))? {
            let (_, piece) = entry?;
            out.extend_from_slice(piece.value());
        }
        Ok(Some(record))
    }

    /// Writes a database in schema step 1 only: how the v1 fixture was made. Test support.
    #[doc(hidden)]
    pub fn create_v1_for_tests(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Io(e.to_string()))?;
        let store = Store { db };
        let step = &migrations::MIGRATIONS[0];
        let txn = store.db.begin_write()?;
        (step.apply)(&txn)?;
        txn.open_table(META)?.insert(SCHEMA_VERSION_KEY, 1)?;
        txn.commit()?;
        Ok(store)
    }

    /// Writes a record and chunks as schema step 1 did (no index). Test support.
    #[doc(hidden)]
    pub fn put_v1_for_tests(
        &self,
        id: Uuid,
        record: &SessionRecord,
        snapshot: &[u8],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SESSIONS)?
            .insert(id.as_u128(), record.encode().as_slice())?;
        let mut chunks = txn.open_table(CHUNKS)?;
        for (i, piece) in snapshot.chunks(CHUNK_BYTES).enumerate() {
            chunks.insert((id.as_u128(), i as u32), piece)?;
        }
        drop(chunks);
        txn.commit()?;
        Ok(())
    }
}

impl SessionStore for Store {
    fn put(
        &self,
        id: Uuid,
        record: &SessionRecord,
        snapshot: &SnapshotBlob<'_>,
    ) -> Result<(), StoreError> {
        let key = id.as_u128();
        let pieces = snapshot.chunks(CHUNK_BYTES);
        let mut record = record.clone();
        record.bytes = snapshot.len() as u64;
        record.chunks = pieces.len() as u32;
        record.checksum = snapshot.checksum.to_hex().to_string();

        let txn = self.db.begin_write()?;
        {
            let mut sessions = txn.open_table(SESSIONS)?;
            let mut index = txn.open_table(LAST_USED)?;
            let previous = sessions
                .get(key)?
                .and_then(|v| SessionRecord::decode(v.value()).ok());
            if let Some(previous) = &previous {
                index.remove((previous.last_used_ms, key))?;
            }
            sessions.insert(key, record.encode().as_slice())?;
            index.insert((record.last_used_ms, key), ())?;

            let mut chunks = txn.open_table(CHUNKS)?;
            chunks.retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
            for (i, piece) in pieces.iter().enumerate() {
                chunks.insert((key, i as u32), piece.as_ref())?;
            }
            // A conversation that moved away and came back is here again, not forwarded.
            txn.open_table(FORWARDS)?.remove(key)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn record(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let sessions = txn.open_table(SESSIONS)?;
        let Some(value) = sessions.get(id.as_u128())? else {
            return Ok(None);
        };
        SessionRecord::decode(value.value())
            .map(Some)
            .map_err(|e| StoreError::Damaged(id, format!("its record cannot be read: {e}")))
    }

    fn snapshot(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        let mut bytes = Vec::new();
        let Some(record) = self.read_snapshot(id, &mut bytes)? else {
            return Ok(None);
        };
        if crate::snapshot::checksum(&bytes).to_hex().as_str() != record.checksum {
            return Err(StoreError::Damaged(
                id,
                "its stored bytes do not match the checksum recorded with them".into(),
            ));
        }
        Ok(Some(bytes))
    }

    fn read_snapshot_into(&self, id: Uuid, out: &mut Vec<u8>) -> Result<bool, StoreError> {
        Ok(self.read_snapshot(id, out)?.is_some())
    }

    fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = remove_session(&txn, id.as_u128())?;
        txn.open_table(FORWARDS)?.remove(id.as_u128())?;
        txn.commit()?;
        Ok(existed)
    }

    fn forward(&self, id: Uuid) -> Result<Option<ForwardRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let forwards = txn.open_table(FORWARDS)?;
        let Some(value) = forwards.get(id.as_u128())? else {
            return Ok(None);
        };
        ForwardRecord::decode(value.value())
            .map(Some)
            .map_err(|e| StoreError::Damaged(id, format!("its forwarding record: {e}")))
    }

    fn move_out(&self, id: Uuid, forward: &ForwardRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        remove_session(&txn, id.as_u128())?;
        txn.open_table(FORWARDS)?
            .insert(id.as_u128(), forward.encode().as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn mark_damaged(&self, id: Uuid, reason: &str) -> Result<(), StoreError> {
        let key = id.as_u128();
        let txn = self.db.begin_write()?;
        {
            let mut sessions = txn.open_table(SESSIONS)?;
            let record = sessions
                .get(key)?
                .and_then(|v| SessionRecord::decode(v.value()).ok());
            if let Some(mut record) = record {
                record.damaged = Some(reason.to_string());
                sessions.insert(key, record.encode().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn list(&self, offset: usize, limit: usize) -> Result<Vec<(Uuid, SessionRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(LAST_USED)?;
        let sessions = txn.open_table(SESSIONS)?;
        let mut out = Vec::new();
        for entry in index.iter()?.rev().skip(offset).take(limit) {
            let (key, _) = entry?;
            let (_, id) = key.value();
            if let Some(value) = sessions.get(id)?
                && let Ok(record) = SessionRecord::decode(value.value())
            {
                out.push((Uuid::from_u128(id), record));
            }
        }
        Ok(out)
    }
}

/// Removes a conversation's record, index entry and chunks; returns whether it existed.
fn remove_session(txn: &redb::WriteTransaction, key: u128) -> Result<bool, StoreError> {
    let previous = txn
        .open_table(SESSIONS)?
        .remove(key)?
        .map(|v| v.value().to_vec());
    if let Some(previous) = previous
        .as_deref()
        .and_then(|b| SessionRecord::decode(b).ok())
    {
        txn.open_table(LAST_USED)?
            .remove((previous.last_used_ms, key))?;
    }
    txn.open_table(CHUNKS)?
        .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
    Ok(previous.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(last_used_ms: u64) -> SessionRecord {
        SessionRecord {
            record_version: records::RECORD_VERSION,
            owner: None,
            created_ms: 1,
            last_used_ms,
            tokens: 3,
            bytes: 0,
            chunks: 0,
            checksum: String::new(),
            model: "m".into(),
            damaged: None,
            compute_profile: None,
        }
    }

    #[test]
    fn put_replaces_whole_snapshots_and_lists_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let big = vec![7u8; CHUNK_BYTES * 2 + 5];
        store
            .put(a, &record(10), &SnapshotBlob::whole(&big))
            .unwrap();
        store
            .put(b, &record(20), &SnapshotBlob::whole(b"small"))
            .unwrap();
        store
            .put(a, &record(30), &SnapshotBlob::whole(b"replaced"))
            .unwrap();
        assert_eq!(store.snapshot(a).unwrap().unwrap(), b"replaced");
        let ids: Vec<Uuid> = store
            .list(0, 10)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(ids, vec![a, b]);
        assert!(store.delete(a).unwrap());
        assert!(store.snapshot(a).unwrap().is_none());
        assert_eq!(store.list(0, 10).unwrap().len(), 1);
    }

    #[test]
    fn pieces_are_cut_into_the_same_chunks_as_one_buffer() {
        let file: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let whole = SnapshotBlob::whole(&file);
        let expected: Vec<&[u8]> = file.chunks(64).collect();
        for cuts in [
            vec![],
            vec![10],
            vec![64],
            vec![63, 65, 200],
            vec![0, 9_999, 10_000],
        ] {
            let mut pieces = Vec::new();
            let mut from = 0;
            for cut in cuts.iter().copied().chain([file.len()]) {
                pieces.push(&file[from..cut]);
                from = cut;
            }
            let blob = SnapshotBlob::pieces(pieces, whole.checksum);
            let chunks = blob.chunks(64);
            let got: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
            assert_eq!(got, expected, "cut at {cuts:?}");
            assert_eq!(blob.len(), file.len());
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let id = Uuid::new_v4();
        let blob = SnapshotBlob::pieces(vec![&file[..100], &file[100..]], whole.checksum);
        store.put(id, &record(1), &blob).unwrap();
        assert_eq!(store.snapshot(id).unwrap().unwrap(), file);
    }

    #[test]
    fn moving_out_replaces_the_conversation_with_a_forward_and_coming_back_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let id = Uuid::new_v4();
        store
            .put(id, &record(5), &SnapshotBlob::whole(b"state"))
            .unwrap();
        let forward = ForwardRecord {
            record_version: records::RECORD_VERSION,
            target: "http://b:1".into(),
            moved_ms: 9,
        };
        store.move_out(id, &forward).unwrap();
        assert!(store.record(id).unwrap().is_none());
        assert!(store.list(0, 10).unwrap().is_empty());
        assert_eq!(store.forward(id).unwrap(), Some(forward));
        store
            .put(id, &record(6), &SnapshotBlob::whole(b"back"))
            .unwrap();
        assert_eq!(store.forward(id).unwrap(), None);
        assert_eq!(store.snapshot(id).unwrap().unwrap(), b"back");
    }

    #[test]
    fn damage_is_reported_and_the_record_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let id = Uuid::new_v4();
        let mut r = record(5);
        store.put(id, &r, &SnapshotBlob::whole(b"bytes")).unwrap();
        // Rewrite the record with a wrong checksum, as a torn or altered file would look.
        r.checksum = "0".repeat(64);
        r.bytes = 5;
        let txn = store.db.begin_write().unwrap();
        txn.open_table(SESSIONS)
            .unwrap()
            .insert(id.as_u128(), r.encode().as_slice())
            .unwrap();
        txn.commit().unwrap();
        assert!(matches!(store.snapshot(id), Err(StoreError::Damaged(..))));
        store.mark_damaged(id, "checksum").unwrap();
        assert_eq!(
            store.record(id).unwrap().unwrap().damaged.as_deref(),
            Some("checksum")
        );
    }
}
