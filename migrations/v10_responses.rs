//! Step 10: stored responses of OpenAI's Responses API (`tables::RESPONSES`), each the text of
//! a conversation whose state is the named conversation of the same id. Created empty.

use redb::WriteTransaction;

use crate::store::tables::RESPONSES;

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(RESPONSES)?;
    Ok(())
}
