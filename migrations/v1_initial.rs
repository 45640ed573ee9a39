//! Step 1: the schema-version table, session records, and snapshot chunks.

use redb::WriteTransaction;

use crate::store::tables::{CHUNKS, META, SESSIONS};

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(META)?;
    txn.open_table(SESSIONS)?;
    txn.open_table(CHUNKS)?;
    Ok(())
}
