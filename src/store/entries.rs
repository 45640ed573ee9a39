//! Unnamed entries: states of conversations no client named, found again by their tokens,
//! and the storage budget that drops them, least recently used first.
//!
//! An entry is a record (`ENTRIES`), a manifest and page list stored exactly like a named
//! conversation's (so pages are shared and counted the same way), one row of the prefix index
//! (`ENTRY_INDEX`) and one of the use order (`ENTRY_USED`, whose value is the entry's index
//! name, so dropping an entry needs no other lookup). The index names come from
//! `sessions::lookup`: this file only stores them (keyed when sealed) and compares them.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableHandle, WriteTransaction};
use uuid::Uuid;

use super::records::EntryRecord;
use super::tables::{ENTRIES, ENTRY_INDEX, ENTRY_USED, MANIFESTS, META, PAGE_BYTES_KEY, PAGES};
use super::vault::session_key;
use super::{NamedPut, PageId, PagedPut, PutStats, Store, StoreError, release_list, write_pages};

/// What the unnamed entries hold, for `/metrics` and the admin listing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EntryStats {
    pub entries: u64,
    /// Bytes of every page the store holds (named conversations' and entries').
    pub page_bytes: u64,
    /// The budget those bytes are held to (0: none).
    pub budget_bytes: u64,
}

impl Store {
    /// Keeps entry `id` (its record, manifest, pages and index row under `index`), then, while
    /// the store's pages exceed the budget, drops the least recently used entries (this one
    /// last). One durable transaction; returns what was written and how many were dropped.
    pub fn put_entry(
        &self,
        id: Uuid,
        record: &EntryRecord,
        index: &PageId,
        put: &PagedPut<'_>,
    ) -> Result<(PutStats, usize), StoreError> {
        let txn = self.db.begin_write()?;
        let key = id.as_u128();
        let named = NamedPut::of(&self.vault, put);
        let stats = write_pages(&txn, &self.vault, key, &named)?;
        put_record(&txn, &self.vault, key, record)?;
        let name = self.vault.page_name(index);
        txn.open_table(ENTRY_INDEX)?.insert((name, key), ())?;
        txn.open_table(ENTRY_USED)?
            .insert((record.last_used_ms, key), name)?;
        let dropped = self.keep_within_budget(&txn)?;
        txn.commit()?;
        Ok((stats, dropped))
    }

    /// Entry `id`'s record, if it is kept and reads.
    pub fn entry(&self, id: Uuid) -> Result<Option<EntryRecord>, StoreError> {
        let Some(bytes) = self.read_row(ENTRIES, id)? else {
            return Ok(None);
        };
        EntryRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Damaged(id, format!("its entry record cannot be read: {e}")))
    }

    /// The entries indexed under the first of `names` (plain index names, tried in order)
    /// under which `fits` accepts any, the one holding the most tokens of those; `None` when
    /// no name has one. One read transaction.
    pub fn find_entry(
        &self,
        names: &[PageId],
        fits: &mut dyn FnMut(&EntryRecord) -> bool,
    ) -> Result<Option<(Uuid, EntryRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(ENTRY_INDEX)?;
        let entries = txn.open_table(ENTRIES)?;
        for plain in names {
            let name = self.vault.page_name(plain);
            let mut best: Option<(Uuid, EntryRecord)> = None;
            for row in index.range((name, 0)..=(name, u128::MAX))? {
                let (_, key) = row?.0.value();
                let Some(value) = entries.get(key)? else {
                    continue;
                };
                let Ok(bytes) = self
                    .vault
                    .open(ENTRIES.name(), &session_key(key), value.value())
                else {
                    continue;
                };
                let Ok(record) = EntryRecord::decode(&bytes) else {
                    continue;
                };
                if fits(&record) && best.as_ref().is_none_or(|(_, b)| record.tokens > b.tokens) {
                    best = Some((Uuid::from_u128(key), record));
                }
            }
            if best.is_some() {
                return Ok(best);
            }
        }
        Ok(None)
    }

    /// Marks entry `id` used at `now_ms`, so the budget drops entries used longer ago first.
    /// Not durable by itself (the next durable commit makes it so): a crash only makes the
    /// entry look as old as it was.
    pub fn touch_entry(&self, id: Uuid, now_ms: u64) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let key = id.as_u128();
        let Some(sealed) = txn
            .open_table(ENTRIES)?
            .get(key)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(());
        };
        let bytes = self
            .vault
            .open(ENTRIES.name(), &session_key(key), &sealed)?;
        let mut record = EntryRecord::decode(&bytes).map_err(|e| {
            StoreError::Damaged(id, format!("its entry record cannot be read: {e}"))
        })?;
        let mut used = txn.open_table(ENTRY_USED)?;
        let Some(name) = used.remove((record.last_used_ms, key))?.map(|v| v.value()) else {
            return Ok(());
        };
        record.last_used_ms = now_ms;
        used.insert((now_ms, key), name)?;
        drop(used);
        put_record(&txn, &self.vault, key, &record)?;
        txn.commit()?;
        Ok(())
    }

    /// Whether a checkpoint whose tokens hash to `tokens_hash` is kept under `index`: the
    /// same tokens computed as a cold start are the same bytes, so another is not kept.
    pub fn holds_checkpoint(&self, index: &PageId, tokens_hash: &[u8]) -> Result<bool, StoreError> {
        let mut same =
            |record: &EntryRecord| record.checkpoint && record.tokens_hash == tokens_hash;
        Ok(self.find_entry(&[*index], &mut same)?.is_some())
    }

    /// Drops entry `id` and the pages only it held; returns whether it was kept.
    pub fn remove_entry(&self, id: Uuid) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = remove_entry_in(&txn, &self.vault, id.as_u128())?;
        txn.commit()?;
        Ok(existed)
    }

    /// How many entries are kept, and the store's page bytes against the budget.
    pub fn entry_stats(&self) -> Result<EntryStats, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(EntryStats {
            entries: txn.open_table(ENTRIES)?.len()?,
            page_bytes: txn
                .open_table(META)?
                .get(PAGE_BYTES_KEY)?
                .map_or(0, |v| v.value()),
            budget_bytes: self.budget(),
        })
    }

    /// Holds the store's pages to `bytes` (0: no budget) by dropping unnamed entries, least
    /// recently used first, whenever an entry or a named conversation is saved. Named
    /// conversations are never dropped for it.
    pub fn set_budget(&self, bytes: u64) {
        self.budget
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn budget(&self) -> u64 {
        self.budget.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops least recently used entries while the pages exceed the budget; returns how many.
    pub(super) fn keep_within_budget(&self, txn: &WriteTransaction) -> Result<usize, StoreError> {
        let budget = self.budget();
        if budget == 0 {
            return Ok(0);
        }
        let mut dropped = 0;
        loop {
            let held = txn
                .open_table(META)?
                .get(PAGE_BYTES_KEY)?
                .map_or(0, |v| v.value());
            if held <= budget {
                return Ok(dropped);
            }
            let oldest = txn
                .open_table(ENTRY_USED)?
                .first()?
                .map(|(key, _)| key.value().1);
            let Some(key) = oldest else {
                return Ok(dropped);
            };
            remove_entry_in(txn, &self.vault, key)?;
            dropped += 1;
        }
    }

    /// Counts `PAGES`' bytes into `META` once, when the count is absent.
    pub(super) fn count_page_bytes(&self) -> Result<(), StoreError> {
        // Read first: a start need not wait for (or write) a transaction when it is counted.
        if self
            .db
            .begin_read()?
            .open_table(META)?
            .get(PAGE_BYTES_KEY)?
            .is_some()
        {
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        if txn.open_table(META)?.get(PAGE_BYTES_KEY)?.is_some() {
            return Ok(());
        }
        let mut total = 0u64;
        for page in txn.open_table(PAGES)?.iter()? {
            total += page?.1.value().len() as u64;
        }
        txn.open_table(META)?.insert(PAGE_BYTES_KEY, total)?;
        txn.commit()?;
        Ok(())
    }
}

/// Stores entry `key`'s record, sealed when the store is.
fn put_record(
    txn: &WriteTransaction,
    vault: &super::vault::Vault,
    key: u128,
    record: &EntryRecord,
) -> Result<(), StoreError> {
    let sealed = vault
        .seal(ENTRIES.name(), &session_key(key), &record.encode())
        .into_owned();
    txn.open_table(ENTRIES)?.insert(key, sealed.as_slice())?;
    Ok(())
}

/// Removes entry `key`: its record, index and use rows, manifest and page references.
fn remove_entry_in(
    txn: &WriteTransaction,
    vault: &super::vault::Vault,
    key: u128,
) -> Result<bool, StoreError> {
    let Some(sealed) = txn
        .open_table(ENTRIES)?
        .remove(key)?
        .map(|v| v.value().to_vec())
    else {
        return Ok(false);
    };
    let last_used = vault
        .open(ENTRIES.name(), &session_key(key), &sealed)
        .ok()
        .and_then(|bytes| EntryRecord::decode(&bytes).ok())
        .map(|record| record.last_used_ms);
    let mut used = txn.open_table(ENTRY_USED)?;
    // A record that does not read: its use row is found by scanning.
    let row = match last_used {
        Some(at) => used.get((at, key))?.map(|name| ((at, key), name.value())),
        None => None,
    };
    let row = match row {
        Some(row) => Some(row),
        None => used
            .iter()?
            .filter_map(Result::ok)
            .map(|(k, v)| (k.value(), v.value()))
            .find(|(k, _)| k.1 == key),
    };
    if let Some((used_key, name)) = row {
        used.remove(used_key)?;
        txn.open_table(ENTRY_INDEX)?.remove((name, key))?;
    }
    drop(used);
    release_list(txn, key)?;
    txn.open_table(MANIFESTS)?.remove(key)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::RECORD_VERSION;

    fn entry(store: &Store, n: u8, used_ms: u64) -> Uuid {
        let id = Uuid::from_u128(n as u128 + 1);
        let record = EntryRecord {
            record_version: RECORD_VERSION,
            owner: None,
            created_ms: used_ms,
            last_used_ms: used_ms,
            tokens: 64,
            tokens_hash: vec![n; 32],
            model: "m".into(),
            checkpoint: false,
            index: vec![n; 32],
        };
        let page = vec![n; 1000];
        let put = PagedPut {
            manifest: &[n],
            refs: &[[n; 32]],
            pages: vec![([n; 32], page.as_slice())],
        };
        store.put_entry(id, &record, &[n; 32], &put).unwrap();
        id
    }

    #[test]
    fn a_checkpoint_is_known_by_its_index_name_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        entry(&store, 1, 10);
        // `entry` keeps turn entries: not checkpoints.
        assert!(!store.holds_checkpoint(&[1; 32], &[1; 32]).unwrap());
        let id = Uuid::from_u128(99);
        let mut record = store.entry(Uuid::from_u128(2)).unwrap().unwrap();
        record.checkpoint = true;
        record.tokens_hash = vec![9; 32];
        let put = PagedPut {
            manifest: &[9],
            refs: &[],
            pages: vec![],
        };
        store.put_entry(id, &record, &[1; 32], &put).unwrap();
        assert!(store.holds_checkpoint(&[1; 32], &[9; 32]).unwrap());
        assert!(!store.holds_checkpoint(&[1; 32], &[8; 32]).unwrap());
        assert!(!store.holds_checkpoint(&[2; 32], &[9; 32]).unwrap());
    }

    #[test]
    fn an_entry_used_again_is_dropped_after_those_used_longer_ago() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let oldest = entry(&store, 1, 10);
        let middle = entry(&store, 2, 20);
        store.touch_entry(oldest, 30).unwrap();
        assert_eq!(store.entry(oldest).unwrap().unwrap().last_used_ms, 30);
        // Room for two entries' pages: the third drops the least recently used.
        store.set_budget(2000);
        let newest = entry(&store, 3, 40);
        assert!(store.entry(middle).unwrap().is_none(), "used longest ago");
        assert!(store.entry(oldest).unwrap().is_some(), "used again since");
        assert!(store.entry(newest).unwrap().is_some());
        // Touching one no longer kept changes nothing.
        store.touch_entry(middle, 50).unwrap();
        assert!(store.entry(middle).unwrap().is_none());
        assert!(store.check().unwrap().is_empty());
    }
}
