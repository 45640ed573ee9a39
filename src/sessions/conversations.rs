//! `Conversations`: what `http/` and `migrate/` ask of a conversation, as one async service.
//!
//! Every method that reads or replaces a conversation makes the fleet's claim first (another
//! instance's live lease answers `Moved`, an older copy here gives way to the bucket's), so a
//! caller cannot forget it. The engine is asked only for what a sequence holds; uploads are
//! verified and stored here, off the decode thread, while the engine holds the conversation.

use std::sync::Arc;

use uuid::Uuid;

use super::fleet::{Claim, Fleet};
use super::imports::{self, Origin};
use super::{blocking, list};
use crate::engine::{EngineError, EngineHandle, Requester, SessionInfo};
use crate::store::{SessionStore, Store};

/// A request about a conversation that this layer refuses.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The key keeps as many conversations as it may (`--max-conversations-per-key`).
    #[error(
        "this key keeps {held} conversations, the most it may (--max-conversations-per-key); \
         delete some with DELETE /v1/sessions/{{id}} before starting another"
    )]
    Quota { held: usize },
}

pub struct Conversations {
    engine: EngineHandle,
    store: Arc<Store>,
    fleet: Option<Arc<Fleet>>,
    /// Conversations a user key may keep (0: no limit).
    max_per_key: usize,
}

impl Conversations {
    pub fn new(
        engine: EngineHandle,
        store: Arc<Store>,
        fleet: Option<Arc<Fleet>>,
        max_per_key: usize,
    ) -> Self {
        Conversations {
            engine,
            store,
            fleet,
            max_per_key,
        }
    }

    /// Before anything reads or replaces `session` here: a fleet member that lacks it fetches
    /// it from the shared bucket (every page checked) into its local store. Another instance
    /// holding its live lease answers `Moved` (a 307 to it); an older copy here is dropped
    /// from its sequence, unsaved, before the newer one replaces it.
    async fn claim(&self, session: Uuid) -> Result<(), EngineError> {
        let Some(fleet) = &self.fleet else {
            return Ok(());
        };
        if let Claim::Stale = fleet.claim(session, false).await? {
            self.engine.drop_resident(session).await?;
            fleet.claim(session, true).await?;
        }
        Ok(())
    }

    /// Before `requester` makes `session` a new conversation: a user key keeps at most
    /// `max_per_key`. An existing conversation (stored, or resident and unsaved), an admin
    /// key and an open API pass.
    pub async fn may_create(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<(), ConversationError> {
        let Requester::User(owner) = requester else {
            return Ok(());
        };
        if self.max_per_key == 0 {
            return Ok(());
        }
        let store = self.store.clone();
        let owner = Some(owner.clone());
        let held = blocking(move || {
            if store.record(session)?.is_some() {
                return Ok(None);
            }
            Ok(Some(store.count_owned(&owner)?))
        })
        .await?;
        let Some(held) = held else {
            return Ok(());
        };
        if held < self.max_per_key {
            return Ok(());
        }
        let resident = self.engine.resident().await?;
        if resident.iter().any(|s| s.session_id == session) {
            return Ok(());
        }
        Err(ConversationError::Quota { held })
    }

    /// Before a turn of `session` is submitted: the claim, and the quota if it is new.
    pub async fn before_turn(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<(), ConversationError> {
        self.claim(session).await?;
        self.may_create(session, requester).await
    }

    /// Every conversation `requester` may use, newest use first; the first `limit`.
    pub async fn list(
        &self,
        limit: usize,
        requester: Requester,
    ) -> Result<Vec<SessionInfo>, EngineError> {
        list(&self.engine, &self.store, limit, requester).await
    }

    pub async fn describe(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, EngineError> {
        self.claim(session).await?;
        self.engine.describe(session, requester).await
    }

    pub async fn delete(&self, session: Uuid, requester: Requester) -> Result<(), EngineError> {
        self.claim(session).await?;
        self.engine.forget(session, requester).await
    }

    /// Returns once the conversation's snapshot is committed to the store.
    pub async fn save(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, EngineError> {
        self.claim(session).await?;
        self.engine.save(session, requester).await
    }

    /// A new conversation `into` continuing exactly as `session` would, sharing its pages.
    pub async fn fork(
        &self,
        session: Uuid,
        into: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, ConversationError> {
        self.claim(session).await?;
        self.may_create(into, &requester).await?;
        Ok(self.engine.fork(session, into, requester).await?)
    }

    /// The conversation's snapshot file.
    pub async fn export(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Vec<u8>, EngineError> {
        self.claim(session).await?;
        self.engine.export(session, requester).await
    }

    /// The conversation as a llama.cpp `ggsq` v4 file.
    pub async fn export_llama(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Vec<u8>, EngineError> {
        self.claim(session).await?;
        self.engine.export_llama(session, requester).await
    }

    /// Before an upload's body is read: a conversation that moved away or lives on another
    /// member answers where it went; a new one must fit the key's quota.
    pub async fn before_upload(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<(), ConversationError> {
        self.claim(session).await?;
        if let Err(moved @ EngineError::Moved { .. }) =
            self.engine.describe(session, requester.clone()).await
        {
            return Err(moved.into());
        }
        self.may_create(session, requester).await
    }

    /// A snapshot file uploaded by `requester` as conversation `session` (see `replace`).
    pub async fn import(
        &self,
        session: Uuid,
        requester: Requester,
        bytes: Vec<u8>,
    ) -> Result<SessionInfo, EngineError> {
        self.claim(session).await?;
        self.replace(session, requester, bytes, None).await
    }

    /// A llama.cpp `ggsq` file as conversation `session`: translated into a snapshot for the
    /// running model, then verified and stored like any upload.
    pub async fn import_llama(
        &self,
        session: Uuid,
        requester: Requester,
        bytes: Vec<u8>,
    ) -> Result<SessionInfo, EngineError> {
        self.claim(session).await?;
        let model = self.engine.info().clone();
        let file = blocking(move || imports::snapshot_from_llama_file(&bytes, &model)).await?;
        self.replace(session, requester, file, None).await
    }

    /// A conversation another instance sent (admin only): verified like any upload, keeping
    /// its owner and creation time. A conversation this instance forwarded may come back.
    pub async fn import_moved(
        &self,
        session: Uuid,
        bytes: Vec<u8>,
        origin: Origin,
    ) -> Result<SessionInfo, EngineError> {
        self.claim(session).await?;
        self.replace(session, Requester::System, bytes, Some(origin))
            .await
    }

    /// Holds the conversation in the engine (turns to it are refused with 409; unsaved
    /// changes are saved first), verifies and stores the file on a blocking thread, then
    /// releases it: a resident copy goes once the new version is stored, and stays if it was
    /// refused. This runs as a task of its own, so a client hanging up cannot leave the
    /// conversation held.
    async fn replace(
        &self,
        session: Uuid,
        requester: Requester,
        bytes: Vec<u8>,
        origin: Option<Origin>,
    ) -> Result<SessionInfo, EngineError> {
        let engine = self.engine.clone();
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        let replacing = async move {
            engine
                .hold(session, requester.clone(), origin.is_some())
                .await?;
            let model = engine.info().clone();
            let stored = blocking(move || {
                imports::verify_and_store(
                    &store,
                    fleet.as_deref(),
                    &model,
                    session,
                    &requester,
                    &bytes,
                    origin,
                )
            })
            .await;
            engine.release(session, stored.is_ok()).await?;
            stored
        };
        tokio::spawn(replacing)
            .await
            .map_err(|e| EngineError::Internal(format!("an upload task failed: {e}")))?
    }
}
