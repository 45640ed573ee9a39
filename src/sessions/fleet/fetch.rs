//! A conversation brought from the bucket into the local store: its object checked, every page
//! fetched and checked against its id, all committed in one transaction, or nothing kept.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use uuid::Uuid;

use super::{Fleet, FleetError, PARALLEL_PAGES, blocking, unreachable};
use crate::snapshot::manifest::Manifest;
use crate::snapshot::pages::{self, PageId};
use crate::store::PagedPut;
use crate::store::remote::RemoteConversation;

impl Fleet {
    /// Brings the bucket's `conversation` into the local store: its pages fetched several at
    /// once, each checked against its id, then committed with its manifest in one transaction.
    pub(super) async fn fetch(
        &self,
        session: Uuid,
        conversation: &RemoteConversation,
    ) -> Result<(), FleetError> {
        let started = std::time::Instant::now();
        let ids = conversation.page_ids();
        let fetched = self
            .fetch_listed_pages(
                &format!("conversation {session}"),
                &conversation.manifest,
                &ids,
                conversation.record.owner.as_deref(),
            )
            .await?;
        let t_pages = started.elapsed();
        let fetched_bytes: usize = fetched.iter().map(|(_, b)| b.len()).sum();
        let store = self.store.clone();
        let record = conversation.record.clone();
        let manifest_bytes = conversation.manifest.clone();
        blocking(move || {
            let put = PagedPut {
                manifest: &manifest_bytes,
                refs: &ids,
                pages: fetched.iter().map(|(id, b)| (*id, b.as_ref())).collect(),
            };
            // The bucket holds it durably: this copy needs no fsync of its own.
            store.put_copy(session, &record, &put)?;
            Ok(())
        })
        .await?;
        tracing::info!(
            %session, bytes = fetched_bytes, ?t_pages, took = ?started.elapsed(),
            "conversation fetched from the bucket"
        );
        metrics::counter!("kvsnap_remote_fetches_total").increment(1);
        Ok(())
    }

    /// The pages a bucket object lists (`ids`, which must be its manifest's own list) that
    /// the local store lacks, fetched and checked against their ids under the salt of the
    /// manifest and `owner`. `what` names the object in errors.
    pub(super) async fn fetch_listed_pages(
        &self,
        what: &str,
        manifest: &[u8],
        ids: &[PageId],
        owner: Option<&str>,
    ) -> Result<Vec<(PageId, Bytes)>, FleetError> {
        let manifest = Manifest::decode(manifest)?;
        if manifest.page_ids() != ids {
            return Err(damaged(what, "its page list does not match its manifest"));
        }
        self.fetch_pages(what, &manifest.salt(owner), ids).await
    }

    /// The pages among `ids` the local store lacks, fetched from the bucket several at once,
    /// each checked against its id under `salt`. `what` names their owner in errors.
    async fn fetch_pages(
        &self,
        what: &str,
        salt: &[u8; 32],
        ids: &[PageId],
    ) -> Result<Vec<(PageId, Bytes)>, FleetError> {
        let wanted: Vec<PageId> = {
            let store = self.store.clone();
            let mut unique = ids.to_vec();
            unique.sort_unstable();
            unique.dedup();
            blocking(move || Ok(store.missing_pages(&unique)?)).await?
        };
        futures::stream::iter(wanted)
            .map(|id| async move {
                let bytes = self
                    .remote
                    .page(&id)
                    .await
                    .map_err(unreachable)?
                    .ok_or_else(|| damaged(what, "one of its pages is missing from the bucket"))?;
                if pages::page_id(salt, &bytes) != id {
                    return Err(damaged(
                        what,
                        "one of its pages in the bucket does not match its id",
                    ));
                }
                Ok::<_, FleetError>((id, bytes))
            })
            .buffer_unordered(PARALLEL_PAGES)
            .try_collect()
            .await
    }
}

/// `what` in the bucket is damaged, and why.
pub(super) fn damaged(what: &str, why: &str) -> FleetError {
    FleetError::Damaged(format!("{what} in the bucket is damaged: {why}"))
}
