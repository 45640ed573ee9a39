//! Step 2: an index `(last_used_ms, id)` so `GET /v1/sessions` lists newest use first without
//! reading every record. Built here from the records step 1 left.

use redb::{ReadableTable, WriteTransaction};

use crate::store::records::SessionRecord;
use crate::store::tables::{LAST_USED, SESSIONS};

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    let sessions = txn.open_table(SESSIONS)?;
    let mut index = txn.open_table(LAST_USED)?;
    for entry in sessions.iter()? {
        let (id, record) = entry?;
        // A record that cannot be read is indexed at time 0 rather than lost from listings.
        let last_used = SessionRecord::decode(record.value()).map_or(0, |r| r.last_used_ms);
        index.insert((last_used, id.value()), ())?;
    }
    Ok(())
}
