//! Step 5: conversations arriving page by page from another instance wait in tables of their
//! own until committed, so a transfer that broke off resumes where it stopped.

use redb::WriteTransaction;

use crate::store::tables::{INCOMING, INCOMING_PAGES};

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(INCOMING)?;
    txn.open_table(INCOMING_PAGES)?;
    Ok(())
}
