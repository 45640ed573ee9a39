//! Stored responses of OpenAI's Responses API (`tables::RESPONSES`), one fsync'd transaction
//! each, sealed like every other value.

use redb::TableHandle;
use uuid::Uuid;

use super::records::ResponseRecord;
use super::tables::RESPONSES;
use super::vault::session_key;
use super::{Store, StoreError};

impl Store {
    /// Keeps `record` under `id`, committed before this returns.
    pub fn put_response(&self, id: Uuid, record: &ResponseRecord) -> Result<(), StoreError> {
        let key = id.as_u128();
        let sealed = self
            .vault
            .seal(RESPONSES.name(), &session_key(key), &record.encode())
            .into_owned();
        let txn = self.db.begin_write()?;
        txn.open_table(RESPONSES)?.insert(key, sealed.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    pub fn response(&self, id: Uuid) -> Result<Option<ResponseRecord>, StoreError> {
        let Some(bytes) = self.read_row(RESPONSES, id)? else {
            return Ok(None);
        };
        ResponseRecord::decode(&bytes).map(Some).map_err(|e| {
            StoreError::Damaged(id, format!("its response record cannot be read: {e}"))
        })
    }

    /// Removes the response; whether there was one.
    pub fn delete_response(&self, id: Uuid) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let removed = txn.open_table(RESPONSES)?.remove(id.as_u128())?.is_some();
        txn.commit()?;
        Ok(removed)
    }
}
