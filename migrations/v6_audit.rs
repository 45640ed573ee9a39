//! Step 6: the audit trail, a table of admin actions appended in order.

use redb::WriteTransaction;

use crate::store::tables::AUDIT;

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(AUDIT)?;
    Ok(())
}
