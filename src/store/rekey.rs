//! Key rotation while the store serves: every sealed value not sealed with the current key
//! is opened and sealed again with it, a few rows per transaction, so saves and reads go on
//! between them.
//!
//! Resumable by construction: each value names its key, so a rotation interrupted anywhere
//! (a crash, a restart) is finished by running it again, which passes over what is done.
//! A row changed meanwhile by a save is sealed with the current key already and is left alone.

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use super::tables::{
    AUDIT, CHUNKS, ENTRIES, FORWARDS, INCOMING, INCOMING_PAGES, MANIFESTS, PAGES, RESPONSES,
    SESSIONS,
};
use super::vault::{chunk_key, session_key, staged_page_key};
use super::{Store, StoreError};
use crate::keys::{KeyRing, sealed_key_id};

/// Rows sealed again per write transaction.
const ROWS_PER_TRANSACTION: usize = 64;

/// How far a rotation got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RekeyProgress {
    /// Sealed values found under an older key when the pass began.
    pub found: u64,
    /// Of those, sealed again with the current key (or deleted or rewritten meanwhile).
    pub done: u64,
}

impl Store {
    /// Seals every value with the current key; `report` hears the progress after each
    /// transaction. Refused on a store without encryption.
    pub fn rekey(
        &self,
        report: &mut dyn FnMut(RekeyProgress),
    ) -> Result<RekeyProgress, StoreError> {
        let Some(keys) = self.vault.keys() else {
            return Err(StoreError::Io(
                "this store is not encrypted: there is nothing to rekey".into(),
            ));
        };
        let ring = keys.ring();
        let mut progress = RekeyProgress::default();
        let u128_place = |k: &u128| session_key(*k).to_vec();
        let pending = vec![
            self.stale(SESSIONS, &ring, u128_place)?,
            self.stale(ENTRIES, &ring, u128_place)?,
            self.stale(RESPONSES, &ring, u128_place)?,
            self.stale(MANIFESTS, &ring, u128_place)?,
            self.stale(FORWARDS, &ring, u128_place)?,
            self.stale(INCOMING, &ring, u128_place)?,
            self.stale(CHUNKS, &ring, |k| chunk_key(*k).to_vec())?,
            self.stale(PAGES, &ring, |k| k.to_vec())?,
            self.stale(INCOMING_PAGES, &ring, |k| staged_page_key(*k).to_vec())?,
            self.stale(AUDIT, &ring, |k| k.to_be_bytes().to_vec())?,
        ];
        progress.found = pending.iter().map(|p| p.count()).sum();
        report(progress);
        for table in pending {
            table.reseal(self, &ring, &mut progress, report)?;
        }
        Ok(progress)
    }

    /// The rows of `table` sealed with another key than the ring's current one.
    fn stale<K>(
        &self,
        table: TableDefinition<'static, K, &'static [u8]>,
        ring: &KeyRing,
        place: fn(&K) -> Vec<u8>,
    ) -> Result<Box<dyn Stale>, StoreError>
    where
        K: redb::Key + Copy + 'static + for<'a> redb::Value<SelfType<'a> = K>,
    {
        let txn = self.db.begin_read()?;
        let mut rows = Vec::new();
        for entry in txn.open_table(table)?.iter()? {
            let (key, value) = entry?;
            if sealed_key_id(value.value()) != Some(ring.current()) {
                rows.push(key.value());
            }
        }
        Ok(Box::new(StaleRows { table, place, rows }))
    }
}

/// One table's rows to seal again.
trait Stale {
    fn count(&self) -> u64;
    fn reseal(
        &self,
        store: &Store,
        ring: &KeyRing,
        progress: &mut RekeyProgress,
        report: &mut dyn FnMut(RekeyProgress),
    ) -> Result<(), StoreError>;
}

struct StaleRows<K: redb::Key + 'static> {
    table: TableDefinition<'static, K, &'static [u8]>,
    place: fn(&K) -> Vec<u8>,
    rows: Vec<K>,
}

impl<K> Stale for StaleRows<K>
where
    K: redb::Key + Copy + 'static + for<'a> redb::Value<SelfType<'a> = K>,
{
    fn count(&self) -> u64 {
        self.rows.len() as u64
    }

    fn reseal(
        &self,
        store: &Store,
        ring: &KeyRing,
        progress: &mut RekeyProgress,
        report: &mut dyn FnMut(RekeyProgress),
    ) -> Result<(), StoreError> {
        let name = self.table.name().to_string();
        for batch in self.rows.chunks(ROWS_PER_TRANSACTION) {
            let txn = store.db.begin_write()?;
            {
                let mut table = txn.open_table(self.table)?;
                for key in batch {
                    let place = super::vault::place(&name, &(self.place)(key));
                    let stored = match table.get(*key)? {
                        Some(value) => value.value().to_vec(),
                        None => continue, // deleted meanwhile
                    };
                    if sealed_key_id(&stored) == Some(ring.current()) {
                        continue; // written again meanwhile
                    }
                    let plain = ring.open(&place, &stored).map_err(|e| {
                        StoreError::Io(format!("a value in table {name} cannot be read: {e}"))
                    })?;
                    table.insert(*key, ring.seal(&place, &plain).as_slice())?;
                }
            }
            txn.commit()?;
            progress.done += batch.len() as u64;
            report(*progress);
        }
        Ok(())
    }
}
