//! Step 3: a table of forwarding records for conversations moved to another instance, so a
//! request for one at its old host can be sent on to its new one (307).

use redb::WriteTransaction;

use crate::store::tables::FORWARDS;

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(FORWARDS)?;
    Ok(())
}
