//! How the store's values and page names look in the file: as given (no key file), or sealed
//! with the instance's keys and named by a keyed hash (`keys/`).
//!
//! Every value of a byte table goes through `seal` on its way in and `open` on its way out,
//! bound to its table and key, so a value copied to another row does not open there. Page
//! ids become `page_name`s before they touch a table: a store's file never holds a page's
//! content id, only its keyed name. Keys (conversation ids, sequence numbers, times) stay
//! plain: they say nothing of what was said.

use std::borrow::Cow;
use std::sync::Arc;

use crate::keys::{KeyRing, Keys};

use super::{PageId, StoreError};

/// The store's sealing: none, or the instance's keys.
#[derive(Clone, Default)]
pub struct Vault {
    keys: Option<Arc<Keys>>,
}

impl Vault {
    pub fn plain() -> Vault {
        Vault { keys: None }
    }

    pub fn sealed(keys: Arc<Keys>) -> Vault {
        Vault { keys: Some(keys) }
    }

    pub fn keys(&self) -> Option<&Arc<Keys>> {
        self.keys.as_ref()
    }

    pub fn ring(&self) -> Option<Arc<KeyRing>> {
        self.keys.as_ref().map(|k| k.ring())
    }

    /// What to store for `value` in row `key` of `table`.
    pub fn seal<'v>(&self, table: &str, key: &[u8], value: &'v [u8]) -> Cow<'v, [u8]> {
        match &self.keys {
            None => Cow::Borrowed(value),
            Some(keys) => Cow::Owned(keys.ring().seal(&place(table, key), value)),
        }
    }

    /// The value row `key` of `table` stores as `stored`.
    pub fn open<'s>(
        &self,
        table: &str,
        key: &[u8],
        stored: &'s [u8],
    ) -> Result<Cow<'s, [u8]>, StoreError> {
        match &self.keys {
            None => Ok(Cow::Borrowed(stored)),
            Some(keys) => keys
                .ring()
                .open(&place(table, key), stored)
                .map(Cow::Owned)
                .map_err(|e| {
                    StoreError::Io(format!("a value in table {table} cannot be read: {e}"))
                }),
        }
    }

    /// The name page `id` is stored under.
    pub fn page_name(&self, id: &PageId) -> PageId {
        match &self.keys {
            None => *id,
            Some(keys) => keys.ring().page_name(id),
        }
    }

    /// The name `owner`'s conversations are indexed under (`tables::OWNERS`): nobody's
    /// conversations share one name too.
    pub fn owner_name(&self, owner: &Option<String>) -> PageId {
        let plain = *blake3::Hasher::new()
            .update(b"kvsnap owner\0")
            .update(owner.as_deref().unwrap_or("").as_bytes())
            .finalize()
            .as_bytes();
        self.page_name(&plain)
    }

    pub fn page_names(&self, ids: &[PageId]) -> Vec<PageId> {
        match &self.keys {
            None => ids.to_vec(),
            Some(keys) => {
                let ring = keys.ring();
                ids.iter().map(|id| ring.page_name(id)).collect()
            }
        }
    }
}

/// The associated data binding a value to its row.
pub fn place(table: &str, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + table.len() + key.len());
    out.extend_from_slice(b"kvsnap store v1\0");
    out.extend_from_slice(table.as_bytes());
    out.push(0);
    out.extend_from_slice(key);
    out
}

/// Row keys as the associated data spells them.
pub fn session_key(key: u128) -> [u8; 16] {
    key.to_be_bytes()
}

pub fn chunk_key(key: (u128, u32)) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..16].copy_from_slice(&key.0.to_be_bytes());
    out[16..].copy_from_slice(&key.1.to_be_bytes());
    out
}

pub fn staged_page_key(key: (u128, PageId)) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..16].copy_from_slice(&key.0.to_be_bytes());
    out[16..].copy_from_slice(&key.1);
    out
}
