//! Step 9: unnamed entries (`tables::ENTRIES`, `ENTRY_INDEX`, `ENTRY_USED`): the states of
//! conversations no client named, found again by their tokens. Created empty; the page byte
//! count the storage budget reads is counted when the store next opens.

use redb::WriteTransaction;

use crate::store::tables::{ENTRIES, ENTRY_INDEX, ENTRY_USED};

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(ENTRIES)?;
    txn.open_table(ENTRY_INDEX)?;
    txn.open_table(ENTRY_USED)?;
    Ok(())
}
