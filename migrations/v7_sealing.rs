//! Step 7: the table that records whether, and with which page-naming key, a store is
//! encrypted. Stores written before it stay unencrypted until opened with a key file.

use redb::WriteTransaction;

use crate::store::tables::SEALING;

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(SEALING)?;
    Ok(())
}
