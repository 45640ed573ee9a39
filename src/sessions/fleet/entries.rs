//! Unnamed entries in the fleet's bucket: each entry kept here goes up once (its pages, then
//! its object, under the index name it is found by), and a prompt that no entry kept here
//! serves as far as one in the bucket does brings that one down first.
//!
//! Entries never change (a longer conversation is a new entry), so they take no lease: any
//! member may write one, and two writing the same bytes is harmless. They are found the way
//! the local store finds them (`lookup::Wanted`): under the names of the prompt's boundaries,
//! longest first, then checked against the prompt's hash; their pages are checked against
//! their ids before anything keeps them.

use futures::StreamExt;
use uuid::Uuid;

use super::{Fleet, FleetError, blocking, unreachable};
use crate::sessions::lookup::{BOUNDARY, Wanted};
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::PageId;
use crate::store::PagedPut;
use crate::store::SessionStore;
use crate::store::remote::RemoteEntry;

/// Index names listed at once when looking an entry up in the bucket.
const PARALLEL_LISTS: usize = 8;

impl Fleet {
    /// Brings entry `id`, as kept here, to the bucket: the pages it lacks, then the entry. An
    /// entry dropped here meanwhile, or kept before entries had an index name, stays away.
    pub(super) async fn upload_entry(&self, id: Uuid) -> Result<(), FleetError> {
        let _one = self.uploading.lock().await;
        let store = self.store.clone();
        let local = blocking(move || Ok(store.entry(id)?.zip(store.manifest(id)?))).await?;
        let Some((record, manifest_bytes)) = local else {
            return Ok(());
        };
        if record.index.len() != 32 {
            return Ok(());
        }
        let ids = Manifest::decode(&manifest_bytes)?.page_ids();
        self.upload_pages(&ids).await?;
        let entry = RemoteEntry {
            record,
            manifest: manifest_bytes,
            refs: ids.concat(),
        };
        self.remote.put_entry(id, &entry).await?;
        metrics::counter!("kvsnap_remote_entries_uploaded_total").increment(1);
        Ok(())
    }

    /// Looks for an entry of `wanted`'s key in the bucket that holds more of its prompt than
    /// `longer_than` tokens, and keeps the one holding the most in the local store (every page
    /// checked), where the engine's lookup then finds it. Returns how many tokens it holds.
    pub async fn fetch_entry(
        &self,
        wanted: &Wanted<'_>,
        longer_than: usize,
    ) -> Result<Option<usize>, FleetError> {
        // An entry indexed at boundary `b` holds fewer than `b + BOUNDARY` tokens.
        let names: Vec<(usize, PageId)> = wanted
            .names()
            .into_iter()
            .filter(|(boundary, _)| boundary + BOUNDARY > longer_than + 1)
            .collect();
        // Listed several at once, read in order: the longest boundary with a fitting entry wins.
        let mut listed = futures::stream::iter(names)
            .map(|(_, name)| async move { (name, self.remote.entries_at(&name).await) })
            .buffered(PARALLEL_LISTS);
        while let Some((name, ids)) = listed.next().await {
            let mut best: Option<(Uuid, RemoteEntry)> = None;
            for id in ids.map_err(unreachable)? {
                let Some(entry) = self.remote.entry(&name, id).await.map_err(unreachable)? else {
                    continue;
                };
                let holds = entry.record.tokens as usize;
                if entry.record.index == name
                    && holds > longer_than
                    && wanted.fits(&entry.record)
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| holds > b.record.tokens as usize)
                {
                    best = Some((id, entry));
                }
            }
            if let Some((id, entry)) = best {
                let tokens = entry.record.tokens as usize;
                self.keep_fetched_entry(id, &name, entry).await?;
                return Ok(Some(tokens));
            }
        }
        Ok(None)
    }

    /// Keeps the bucket's entry `id` here: its pages fetched and checked, then committed with
    /// its record (used now, for the budget) in one transaction.
    async fn keep_fetched_entry(
        &self,
        id: Uuid,
        index: &PageId,
        entry: RemoteEntry,
    ) -> Result<(), FleetError> {
        let started = std::time::Instant::now();
        let ids = entry.page_ids();
        let fetched = self
            .fetch_listed_pages(
                &format!("entry {id}"),
                &entry.manifest,
                &ids,
                entry.record.owner.as_deref(),
            )
            .await?;
        let fetched_bytes: usize = fetched.iter().map(|(_, b)| b.len()).sum();
        let store = self.store.clone();
        let index = *index;
        blocking(move || {
            let mut record = entry.record;
            record.last_used_ms = crate::clock::now_ms();
            let put = PagedPut {
                manifest: &entry.manifest,
                refs: &ids,
                pages: fetched.iter().map(|(id, b)| (*id, b.as_ref())).collect(),
            };
            store.put_entry(id, &record, &index, &put)?;
            Ok(())
        })
        .await?;
        tracing::info!(
            %id, bytes = fetched_bytes, took = ?started.elapsed(),
            "unnamed entry fetched from the bucket"
        );
        metrics::counter!("kvsnap_remote_entry_fetches_total").increment(1);
        Ok(())
    }
}
