//! Conversations arriving page by page from another instance (`tables::INCOMING*`).
//!
//! A source offers a conversation (its manifest and checksum), sends the pages this store
//! lacks one by one, then asks for the commit. Each page is kept, durably, as it arrives: a
//! transfer that broke off — the network, either instance restarting — resumes with the pages
//! still missing. Nothing here is a conversation yet: the commit goes through the ordinary
//! save, and only then are the offer and its pages dropped. An offer left unfinished for a
//! day is dropped by the next offer.

use redb::{ReadableDatabase, ReadableTable, TableHandle};
use uuid::Uuid;

use super::records::IncomingRecord;
use super::tables::{INCOMING, INCOMING_PAGES, PAGES};
use super::vault::{session_key, staged_page_key};
use super::{PageId, Store, StoreError};

/// Offers left unfinished longer than this are dropped.
const OFFER_KEPT_MS: u64 = 24 * 60 * 60 * 1000;

/// Where an offered conversation's pages are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IncomingPages {
    /// Neither stored nor staged here: the source must send these.
    pub missing: Vec<PageId>,
    /// Staged by an earlier attempt at this transfer.
    pub staged: usize,
    /// Already stored here (other conversations of the owner share them).
    pub held: usize,
}

impl Store {
    /// Starts, or resumes, receiving conversation `id`: keeps `offer`, drops staged pages of an
    /// earlier offer that `pages` (the new manifest's, each once) no longer names, and drops
    /// every other offer left for a day. Answers where each page is.
    pub fn offer_incoming(
        &self,
        id: Uuid,
        offer: &IncomingRecord,
        pages: &[PageId],
    ) -> Result<IncomingPages, StoreError> {
        let key = id.as_u128();
        let mut txn = self.db.begin_write()?;
        // Without an fsync of its own: an offer lost in a crash is simply made again (the
        // source's retry starts with it), and the next page kept makes it durable too.
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let mut answer = IncomingPages::default();
        {
            let mut incoming = txn.open_table(INCOMING)?;
            let mut staged_pages = txn.open_table(INCOMING_PAGES)?;
            let expired: Vec<u128> = incoming
                .iter()?
                .filter_map(|entry| {
                    let (session, record) = entry.ok()?;
                    let record = self.read_offer(session.value(), record.value()).ok();
                    let old =
                        record.is_none_or(|r| r.offered_ms + OFFER_KEPT_MS < offer.offered_ms);
                    (old && session.value() != key).then(|| session.value())
                })
                .collect();
            for session in expired {
                incoming.remove(session)?;
                drop_staged(&mut staged_pages, session)?;
            }
            // Staged and stored pages go by their stored names; the answer by content ids.
            let names = self.vault.page_names(pages);
            let staged: Vec<PageId> = staged_pages
                .range((key, [0; 32])..=(key, [0xff; 32]))?
                .map(|entry| entry.map(|(k, _)| k.value().1))
                .collect::<Result<_, _>>()?;
            for name in staged.iter().filter(|n| !names.contains(n)) {
                staged_pages.remove((key, *name))?;
            }
            let stored = txn.open_table(PAGES)?;
            for (page, name) in pages.iter().zip(&names) {
                if staged.contains(name) {
                    answer.staged += 1;
                } else if stored.get(name)?.is_some() {
                    answer.held += 1;
                } else {
                    answer.missing.push(*page);
                }
            }
            let sealed = self
                .vault
                .seal(INCOMING.name(), &session_key(key), &offer.encode())
                .into_owned();
            incoming.insert(key, sealed.as_slice())?;
        }
        txn.commit()?;
        Ok(answer)
    }

    /// The offer of conversation `id`, while it is arriving.
    pub fn incoming(&self, id: Uuid) -> Result<Option<IncomingRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(INCOMING)?;
        let Some(bytes) = table.get(id.as_u128())? else {
            return Ok(None);
        };
        self.read_offer(id.as_u128(), bytes.value()).map(Some)
    }

    fn read_offer(&self, key: u128, stored: &[u8]) -> Result<IncomingRecord, StoreError> {
        let bytes = self
            .vault
            .open(INCOMING.name(), &session_key(key), stored)?;
        IncomingRecord::decode(&bytes)
            .map_err(|e| StoreError::Io(format!("an incoming offer cannot be read: {e}")))
    }

    /// Keeps one page of arriving conversation `id`, durably (checked against its id by the
    /// caller). False when no offer of `id` is open: it was committed or dropped meanwhile.
    pub fn stage_page(&self, id: Uuid, page: &PageId, bytes: &[u8]) -> Result<bool, StoreError> {
        let key = id.as_u128();
        let txn = self.db.begin_write()?;
        let open = txn.open_table(INCOMING)?.get(key)?.is_some();
        if open {
            let row = (key, self.vault.page_name(page));
            let sealed = self
                .vault
                .seal(INCOMING_PAGES.name(), &staged_page_key(row), bytes);
            txn.open_table(INCOMING_PAGES)?
                .insert(row, sealed.as_ref())?;
        }
        txn.commit()?;
        Ok(open)
    }

    /// A page of arriving conversation `id`: staged for it, or already stored here.
    pub fn incoming_page(&self, id: Uuid, page: &PageId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let name = self.vault.page_name(page);
        let row = (id.as_u128(), name);
        if let Some(bytes) = txn.open_table(INCOMING_PAGES)?.get(row)? {
            let page =
                self.vault
                    .open(INCOMING_PAGES.name(), &staged_page_key(row), bytes.value())?;
            return Ok(Some(page.into_owned()));
        }
        let Some(stored) = txn.open_table(PAGES)?.get(name)? else {
            return Ok(None);
        };
        Ok(Some(
            self.vault
                .open(PAGES.name(), &name, stored.value())?
                .into_owned(),
        ))
    }

    /// Drops the offer of `id` and its staged pages: it was committed, or it was refused.
    pub fn end_incoming(&self, id: Uuid) -> Result<(), StoreError> {
        let key = id.as_u128();
        let mut txn = self.db.begin_write()?;
        // Without an fsync of its own: after a crash the offer may be back, unused, until the
        // next offer drops it a day later.
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        txn.open_table(INCOMING)?.remove(key)?;
        drop_staged(&mut txn.open_table(INCOMING_PAGES)?, key)?;
        txn.commit()?;
        Ok(())
    }
}

fn drop_staged(
    table: &mut redb::Table<(u128, [u8; 32]), &[u8]>,
    session: u128,
) -> Result<(), StoreError> {
    table.retain_in((session, [0; 32])..=(session, [0xff; 32]), |_, _| false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(manifest: &[u8], offered_ms: u64) -> IncomingRecord {
        IncomingRecord {
            record_version: 1,
            owner: None,
            created_ms: 1,
            checksum: "0".repeat(64),
            manifest: manifest.to_vec(),
            offered_ms,
        }
    }

    #[test]
    fn staged_pages_outlive_a_reopen_and_are_not_asked_for_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let session = Uuid::new_v4();
        let pages = [[1; 32], [2; 32], [3; 32]];
        {
            let store = Store::open(&path).unwrap();
            let first = store
                .offer_incoming(session, &offer(b"m", 10), &pages)
                .unwrap();
            assert_eq!(first.missing, pages.to_vec());
            assert!(store.stage_page(session, &pages[0], b"one").unwrap());
        }
        let store = Store::open(&path).unwrap();
        let again = store
            .offer_incoming(session, &offer(b"m", 20), &pages)
            .unwrap();
        assert_eq!(again.missing, vec![pages[1], pages[2]]);
        assert_eq!(again.staged, 1);
        assert_eq!(
            store.incoming_page(session, &pages[0]).unwrap().as_deref(),
            Some(&b"one"[..])
        );

        // A new offer that no longer names a staged page drops it.
        store
            .offer_incoming(session, &offer(b"n", 30), &pages[1..])
            .unwrap();
        assert_eq!(store.incoming_page(session, &pages[0]).unwrap(), None);

        // Committed: nothing is left, and a late page is refused.
        store.end_incoming(session).unwrap();
        assert_eq!(store.incoming(session).unwrap(), None);
        assert!(!store.stage_page(session, &pages[1], b"two").unwrap());
    }

    #[test]
    fn an_offer_left_for_a_day_is_dropped_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (old, new) = (Uuid::new_v4(), Uuid::new_v4());
        store
            .offer_incoming(old, &offer(b"m", 1_000), &[[1; 32]])
            .unwrap();
        store.stage_page(old, &[1; 32], b"one").unwrap();
        store
            .offer_incoming(new, &offer(b"m", 1_000 + OFFER_KEPT_MS + 1), &[[2; 32]])
            .unwrap();
        assert_eq!(store.incoming(old).unwrap(), None);
        assert_eq!(store.incoming_page(old, &[1; 32]).unwrap(), None);
        assert!(store.incoming(new).unwrap().is_some());
    }
}
