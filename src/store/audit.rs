//! The audit trail: admin actions appended in order, each in a durable transaction of its own,
//! read back page by page. Entries are never rewritten or deleted.

use redb::{ReadableDatabase, ReadableTable, TableHandle};

use super::records::AuditRecord;
use super::tables::AUDIT;
use super::{Store, StoreError};

/// Most entries one read hands back.
pub const AUDIT_PAGE_MAX: usize = 1000;

impl Store {
    /// Appends `entry` after the last one, committed with fsync; returns its sequence number
    /// (1 for the first).
    pub fn append_audit(&self, entry: &AuditRecord) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let sequence = {
            let mut table = txn.open_table(AUDIT)?;
            let last = table.last()?.map_or(0, |(key, _)| key.value());
            let sequence = last + 1;
            let sealed = self
                .vault
                .seal(AUDIT.name(), &sequence.to_be_bytes(), &entry.encode())
                .into_owned();
            table.insert(sequence, sealed.as_slice())?;
            sequence
        };
        txn.commit()?;
        Ok(sequence)
    }

    /// Up to `limit` entries (at most `AUDIT_PAGE_MAX`) after sequence number `after`,
    /// oldest first. An entry that does not decode is an error, not skipped: a trail with a
    /// hole in it must say so.
    pub fn audit(&self, after: u64, limit: usize) -> Result<Vec<(u64, AuditRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut entries = Vec::new();
        for row in table
            .range(after.saturating_add(1)..)?
            .take(limit.min(AUDIT_PAGE_MAX))
        {
            let (key, value) = row?;
            let bytes = self
                .vault
                .open(AUDIT.name(), &key.value().to_be_bytes(), value.value())?;
            let record = AuditRecord::decode(&bytes).map_err(|e| {
                StoreError::Io(format!("audit entry {} does not decode: {e}", key.value()))
            })?;
            entries.push((key.value(), record));
        }
        Ok(entries)
    }
}
