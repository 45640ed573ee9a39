//! Step 8: the owner index (`tables::OWNERS`), so one key's conversations are listed and
//! counted without opening every record. The table is created here, empty: records may be
//! sealed, which a schema step cannot open, so the store fills it when it next opens with its
//! keys (`Store::index_owners`). The step also keeps builds older than the index, which would
//! not keep it in step, from writing the file.

use redb::WriteTransaction;

use crate::store::tables::OWNERS;

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(OWNERS)?;
    Ok(())
}
