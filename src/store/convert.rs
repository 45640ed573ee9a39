//! Encrypting a store written in the clear: every row copied into a new file, values sealed
//! and pages renamed by their keyed names, then the new file renamed over the old one.
//!
//! A new file rather than rewriting in place, because redb reuses freed pages without
//! clearing them: rewritten in place, the old plaintext would stay in the file's free space.
//! A crash before the rename leaves the old store whole (the staging file is removed at the
//! next open); after it, the sealed one. The filesystem may still hold the old file's blocks:
//! for a guarantee against the disk itself, start encrypted and move conversations over.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::tables::{
    AUDIT, CHUNKS, ENTRIES, ENTRY_INDEX, ENTRY_USED, FORWARDS, INCOMING, INCOMING_PAGES, LAST_USED,
    MANIFESTS, META, OWNERS, OWNERS_INDEXED_KEY, PAGE_BYTES_KEY, PAGE_LISTS, PAGE_REFS, PAGES,
    RESPONSES, SEALING, SESSIONS,
};
use super::vault::{chunk_key, place, session_key, staged_page_key};
use super::{PAGE_IDS_CHECK, StoreError};
use crate::keys::{KeyRing, Keys};

/// Rows copied per transaction into the new file (which nothing reads until it is whole).
const ROWS_PER_TRANSACTION: usize = 256;

/// Where the sealed copy of the store at `path` is written before it replaces it.
pub fn staging_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sealing");
    PathBuf::from(name)
}

/// Rewrites the unencrypted store at `path` (at the current schema) sealed with `keys`.
pub fn seal_file(path: &Path, keys: &Keys) -> Result<(), StoreError> {
    let ring = keys.ring();
    let shown = path.display();
    let fail = |e: &dyn std::fmt::Display| StoreError::Open {
        path: shown.to_string(),
        message: format!("cannot encrypt it: {e}"),
    };
    tracing::info!(path = %shown, "encrypting the store: every row is copied, sealed, into a new file");
    let source = Database::open(path).map_err(|e| fail(&e))?;
    let staging = staging_path(path);
    let _ = std::fs::remove_file(&staging);
    let target = Database::create(&staging).map_err(|e| fail(&e))?;
    let copied = {
        let read = source.begin_read()?;
        let known = [
            META.name(),
            SESSIONS.name(),
            CHUNKS.name(),
            LAST_USED.name(),
            FORWARDS.name(),
            MANIFESTS.name(),
            PAGE_LISTS.name(),
            PAGES.name(),
            PAGE_REFS.name(),
            INCOMING.name(),
            INCOMING_PAGES.name(),
            AUDIT.name(),
            SEALING.name(),
            ENTRIES.name(),
            ENTRY_INDEX.name(),
            ENTRY_USED.name(),
            RESPONSES.name(),
            // Derived, under names the seal changes: rebuilt when the sealed file opens.
            OWNERS.name(),
        ];
        // A table this copy does not know would be lost: refuse instead.
        for table in read.list_tables()? {
            if !known.contains(&table.name()) {
                return Err(fail(&format!(
                    "it has a table {:?} this kvsnap does not know",
                    table.name()
                )));
            }
        }
        let mut out = Copier::new(&target);
        for entry in read.open_table(META)?.iter()? {
            let (key, value) = entry?;
            // Derived: counted again when the sealed file opens (page sizes change).
            if key.value() != OWNERS_INDEXED_KEY && key.value() != PAGE_BYTES_KEY {
                out.put(META, key.value(), value.value())?;
            }
        }
        for entry in read.open_table(LAST_USED)?.iter()? {
            out.put(LAST_USED, entry?.0.value(), ())?;
        }
        let sealed = |table: &str, key: &[u8], value: &[u8]| ring.seal(&place(table, key), value);
        for entry in read.open_table(ENTRY_INDEX)?.iter()? {
            let (name, id) = entry?.0.value();
            out.put(ENTRY_INDEX, (ring.page_name(&name), id), ())?;
        }
        for entry in read.open_table(ENTRY_USED)?.iter()? {
            let (key, name) = entry?;
            out.put(ENTRY_USED, key.value(), ring.page_name(&name.value()))?;
        }
        for table in [SESSIONS, FORWARDS, MANIFESTS, INCOMING, ENTRIES, RESPONSES] {
            for entry in read.open_table(table)?.iter()? {
                let (key, value) = entry?;
                let key = key.value();
                let value = sealed(table.name(), &session_key(key), value.value());
                out.put(table, key, value.as_slice())?;
            }
        }
        for entry in read.open_table(CHUNKS)?.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let value = sealed(CHUNKS.name(), &chunk_key(key), value.value());
            out.put(CHUNKS, key, value.as_slice())?;
        }
        for entry in read.open_table(AUDIT)?.iter()? {
            let (key, value) = entry?;
            let key = key.value();
            let value = sealed(AUDIT.name(), &key.to_be_bytes(), value.value());
            out.put(AUDIT, key, value.as_slice())?;
        }
        for entry in read.open_table(PAGES)?.iter()? {
            let (id, value) = entry?;
            let name = ring.page_name(&id.value());
            let value = sealed(PAGES.name(), &name, value.value());
            out.put(PAGES, name, value.as_slice())?;
        }
        for entry in read.open_table(PAGE_REFS)?.iter()? {
            let (id, count) = entry?;
            out.put(PAGE_REFS, ring.page_name(&id.value()), count.value())?;
        }
        for entry in read.open_table(PAGE_LISTS)?.iter()? {
            let (key, list) = entry?;
            let names = renamed_list(&ring, list.value());
            out.put(PAGE_LISTS, key.value(), names.as_slice())?;
        }
        for entry in read.open_table(INCOMING_PAGES)?.iter()? {
            let (key, value) = entry?;
            let (session, id) = key.value();
            let row = (session, ring.page_name(&id));
            let value = sealed(INCOMING_PAGES.name(), &staged_page_key(row), value.value());
            out.put(INCOMING_PAGES, row, value.as_slice())?;
        }
        out.put(SEALING, PAGE_IDS_CHECK, ring.page_ids_check().as_slice())?;
        out.finish()?
    };
    drop(source);
    drop(target);
    std::fs::rename(&staging, path).map_err(|e| fail(&e))?;
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail(&e))?;
    }
    tracing::info!(path = %shown, rows = copied, "the store is encrypted");
    Ok(())
}

fn renamed_list(ring: &KeyRing, list: &[u8]) -> Vec<u8> {
    list.chunks_exact(32)
        .flat_map(|id| ring.page_name(id.try_into().expect("32 bytes")))
        .collect()
}

/// Inserts rows into the new file, committing every `ROWS_PER_TRANSACTION` (without fsync:
/// the last commit is durable, and until the rename nothing depends on the file).
struct Copier<'d> {
    db: &'d Database,
    txn: Option<redb::WriteTransaction>,
    in_txn: usize,
    rows: u64,
}

impl<'d> Copier<'d> {
    fn new(db: &'d Database) -> Self {
        Copier {
            db,
            txn: None,
            in_txn: 0,
            rows: 0,
        }
    }

    fn put<'k, 'v, K: redb::Key + 'static, V: redb::Value + 'static>(
        &mut self,
        table: TableDefinition<'static, K, V>,
        key: impl std::borrow::Borrow<K::SelfType<'k>>,
        value: impl std::borrow::Borrow<V::SelfType<'v>>,
    ) -> Result<(), StoreError> {
        if self.txn.is_none() {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Io(e.to_string()))?;
            self.txn = Some(txn);
        }
        let txn = self.txn.as_ref().expect("begun above");
        txn.open_table(table)?.insert(key, value)?;
        self.in_txn += 1;
        self.rows += 1;
        if self.in_txn >= ROWS_PER_TRANSACTION {
            self.txn.take().expect("begun above").commit()?;
            self.in_txn = 0;
        }
        Ok(())
    }

    /// Commits the rest durably; returns the rows copied.
    fn finish(mut self) -> Result<u64, StoreError> {
        if let Some(txn) = self.txn.take() {
            txn.commit()?;
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        txn.commit()?;
        Ok(self.rows)
    }
}
