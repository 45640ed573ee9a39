//! Step 4: conversations as manifests and content-addressed pages instead of whole files.
//!
//! Every stored snapshot file is checked (its checksum, its record's checksum, its llama.cpp
//! state walked against its own layout), cut into pages with its owner's salt, and replaced by
//! a manifest, a page list and the pages, all in this step's one transaction. A file that
//! cannot be cut (damaged, or not a snapshot) is kept whole, and its record marked damaged
//! with the reason: nothing is dropped, and an admin can still download it.

use redb::{ReadableTable, WriteTransaction};

use crate::snapshot::manifest::{Manifest, PageBytes};
use crate::store::records::SessionRecord;
use crate::store::tables::{CHUNKS, MANIFESTS, PAGE_LISTS, PAGE_REFS, PAGES, SESSIONS};
use crate::store::vault::Vault;
use crate::store::{PagedPut, mark_damaged_in, write_paged};

pub fn apply(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(MANIFESTS)?;
    txn.open_table(PAGE_LISTS)?;
    txn.open_table(PAGES)?;
    txn.open_table(PAGE_REFS)?;
    let sessions: Vec<(u128, Vec<u8>)> = txn
        .open_table(SESSIONS)?
        .iter()?
        .map(|entry| entry.map(|(k, v)| (k.value(), v.value().to_vec())))
        .collect::<Result<_, _>>()?;
    for (key, record) in sessions {
        let Ok(record) = SessionRecord::decode(&record) else {
            continue;
        };
        if record.damaged.is_some() {
            continue;
        }
        let mut file = Vec::new();
        for entry in txn.open_table(CHUNKS)?.range((key, 0)..=(key, u32::MAX))? {
            file.extend_from_slice(entry?.1.value());
        }
        let outcome = match to_pages(&record, &file) {
            Ok((manifest, pages)) => {
                let refs = manifest.page_ids();
                let encoded = manifest.encode();
                let put = PagedPut {
                    manifest: &encoded,
                    refs: &refs,
                    pages: pages
                        .iter()
                        .map(|(id, bytes)| (*id, bytes.as_slice()))
                        .collect(),
                };
                // Steps before 7 run on stores written in the clear; sealing comes after.
                write_paged(txn, &Vault::plain(), key, &record, &put).map(|_| ())
            }
            Err(reason) => mark_damaged_in(
                txn,
                &Vault::plain(),
                key,
                &format!(
                    "the store upgrade could not cut it into pages ({reason}); its file is kept \
                     whole"
                ),
            ),
        };
        outcome.map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    }
    Ok(())
}

/// A whole snapshot file as its manifest and pages, or why it cannot be.
fn to_pages(record: &SessionRecord, file: &[u8]) -> Result<(Manifest, PageBytes), String> {
    if crate::snapshot::checksum(file).to_hex().as_str() != record.checksum {
        return Err("its bytes do not match the checksum recorded with them".into());
    }
    Manifest::cut_file(file, record.owner.as_deref())
}
