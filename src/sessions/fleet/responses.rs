//! Stored responses of OpenAI's Responses API in the fleet's bucket, so a member continues a
//! response another answered. A response never changes: it goes up once (queued like a turn,
//! or at once in `remote-sync`) and is fetched by a member that lacks it. Its conversation
//! state travels as every conversation's does (the claim before the fork that continues it).

use uuid::Uuid;

use super::upload::Upload;
use super::{Fleet, FleetError, RemoteDurability, blocking, unreachable};
use crate::store::records::ResponseRecord;

impl Fleet {
    /// Response `id` was kept here: the bucket gets it, before this returns in `remote-sync`
    /// (the reply waits for it), soon otherwise.
    pub async fn keep_response(&self, id: Uuid) -> Result<(), FleetError> {
        if self.durability != RemoteDurability::RemoteSync {
            self.enqueue(Upload::Response(id));
            return Ok(());
        }
        let result = self.upload_response(id).await;
        if result.is_err() {
            self.enqueue(Upload::Response(id));
        }
        result
    }

    /// Brings response `id`, as kept here, to the bucket (one deleted meanwhile stays away).
    pub(super) async fn upload_response(&self, id: Uuid) -> Result<(), FleetError> {
        let store = self.store.clone();
        let Some(record) = blocking(move || Ok(store.response(id)?)).await? else {
            return Ok(());
        };
        self.remote
            .put_response(id, &record)
            .await
            .map_err(unreachable)
    }

    /// Response `id` from the bucket, kept here once read; `None` if the bucket has none.
    pub async fn fetch_response(&self, id: Uuid) -> Result<Option<ResponseRecord>, FleetError> {
        let Some(record) = self.remote.response(id).await.map_err(unreachable)? else {
            return Ok(None);
        };
        let store = self.store.clone();
        let kept = record.clone();
        blocking(move || Ok(store.put_response(id, &kept)?)).await?;
        Ok(Some(record))
    }

    /// Response `id` was deleted here: the bucket forgets it too.
    pub async fn delete_response(&self, id: Uuid) -> Result<(), FleetError> {
        self.remote.delete_response(id).await.map_err(unreachable)
    }
}
