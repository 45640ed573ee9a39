//! `Conversations`: what `http/` and `migrate/` ask of a conversation, as one async service.
//!
//! Every method that reads or replaces a conversation makes the fleet's claim first (another
//! instance's live lease answers `Moved`, an older copy here gives way to the bucket's), so a
//! caller cannot forget it. The engine is asked only for what a sequence holds; uploads are
//! verified and stored here, off the decode thread, while the engine holds the conversation.

use std::sync::Arc;

use uuid::Uuid;

use super::error::ConversationError;
use super::fleet::{Claim, Fleet};
use super::imports::{self, Origin};
use super::{PersistPolicy, blocking, describe, lookup, paging};
use crate::clock::now_ms;
use crate::engine::{
    EngineError, EngineHandle, HoldFor, ModelInfo, Outgoing, Prepared, Requester, SessionInfo,
};
use crate::snapshot::{Snapshot, llama_file};
use crate::store::records::{ForwardRecord, RECORD_VERSION, SessionRecord};
use crate::store::{EntryStats, SessionStore, Store};

fn unknown(session: Uuid) -> ConversationError {
    ConversationError::unknown(session)
}

pub struct Conversations {
    engine: EngineHandle,
    pub(super) store: Arc<Store>,
    pub(super) fleet: Option<Arc<Fleet>>,
    /// Conversations a user key may keep (0: no limit).
    max_per_key: usize,
    /// Whether requests no client named are kept as unnamed entries (and looked up so).
    keep_unnamed: bool,
    /// `Off`: no conversation may be named here.
    persist: PersistPolicy,
}

impl Conversations {
    pub fn new(
        engine: EngineHandle,
        store: Arc<Store>,
        fleet: Option<Arc<Fleet>>,
        max_per_key: usize,
        keep_unnamed: bool,
        persist: PersistPolicy,
    ) -> Self {
        Conversations {
            engine,
            store,
            fleet,
            max_per_key,
            keep_unnamed,
            persist,
        }
    }

    /// Before anything reads or replaces `session` here: a fleet member that lacks it fetches
    /// it from the shared bucket (every page checked) into its local store. Another instance
    /// holding its live lease answers `Moved` (a 307 to it); an older copy here is dropped
    /// from its sequence, unsaved, before the newer one replaces it.
    /// With `--persist off` nothing is read or replaced: the daemon keeps no conversations.
    async fn claim(&self, session: Uuid) -> Result<(), ConversationError> {
        if self.persist == PersistPolicy::Off {
            return Err(ConversationError::Incompatible(
                "this daemon was started with --persist off and keeps no conversations, so a \
                 request may not name one; leave session_id out, or restart it with --persist \
                 turn"
                    .into(),
            ));
        }
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
        let resident = self.engine.look(session, requester.clone()).await;
        if matches!(resident, Ok(Some(_))) {
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

    /// Before a prepared turn is admitted: a fleet member whose store holds less of the
    /// prompt than an entry of the requester's key in the bucket fetches that entry, so the
    /// engine restores it instead of reading those tokens again. A request naming no
    /// conversation may take any entry; a named one only a checkpoint, and only on its first
    /// turn. Whatever goes wrong here, the turn goes on and evaluates its prompt.
    pub async fn before_admit(&self, prepared: &Prepared) {
        let request = prepared.request();
        let Some(fleet) = &self.fleet else {
            return;
        };
        if !self.keep_unnamed || !request.cache_prompt {
            return;
        }
        let Ok(identity) = self.model().snapshot_identity() else {
            return;
        };
        let checkpoints_only = match request.session {
            None => false,
            Some(session) => {
                let store = self.store.clone();
                match blocking(move || Ok(store.record(session)?)).await {
                    Ok(None) => true,
                    _ => return,
                }
            }
        };
        let tenant = request.requester.tenant();
        let owner = tenant.as_deref();
        let tokens = prepared.tokens();
        let held = {
            let store = self.store.clone();
            let identity = identity.clone();
            let owner = tenant.clone();
            let tokens = tokens.to_vec();
            blocking(move || {
                Ok(lookup::find(
                    &store,
                    &identity,
                    owner.as_deref(),
                    &tokens,
                    checkpoints_only,
                )?)
            })
            .await
        };
        let held = match held {
            Ok(found) => found.map_or(0, |f| f.tokens),
            Err(error) => {
                tracing::warn!(%error, "could not look for a kept prefix here");
                return;
            }
        };
        let wanted = lookup::Wanted::new(identity, owner, tokens, checkpoints_only);
        if let Err(error) = fleet.fetch_entry(&wanted, held).await {
            tracing::warn!(%error, "could not fetch a kept prefix from the bucket; the prompt is evaluated");
        }
    }

    /// Every conversation `requester` may use, resident and stored, newest use first; the first
    /// `limit` of them. Resident ones show their live token count and their stored size.
    pub async fn list(
        &self,
        limit: usize,
        requester: Requester,
    ) -> Result<Vec<SessionInfo>, ConversationError> {
        let mut resident = self.engine.resident().await?;
        resident.retain(|s| requester.may_use(&s.owner));
        let store = self.store.clone();
        let wanted = limit.saturating_add(resident.len());
        // A user key's listing opens its own records (and nobody's) only, through the owner index.
        let stored = blocking(move || {
            Ok(match &requester {
                Requester::User(owner) => store.list_owned(&Some(owner.clone()), true, wanted)?,
                _ => store.list(wanted, &|owner| requester.may_use(owner))?,
            })
        })
        .await?;
        let mut all = resident;
        for (id, record) in stored {
            if let Some(live) = all.iter_mut().find(|s| s.session_id == id) {
                live.bytes = record.bytes;
                live.created_ms = record.created_ms;
                continue;
            }
            all.push(describe(id, &record, self.model()));
        }
        all.sort_by_key(|s| std::cmp::Reverse(s.last_used_ms));
        all.truncate(limit);
        Ok(all)
    }

    /// What the store holds: unnamed entries, page bytes, the budget they are held to.
    pub async fn store_usage(&self) -> Result<EntryStats, ConversationError> {
        let store = self.store.clone();
        blocking(move || Ok(store.entry_stats()?)).await
    }

    pub fn model(&self) -> &ModelInfo {
        self.engine.info()
    }

    /// The stored record of `session`, if `requester` may use it: another owner's is unknown.
    async fn record(
        &self,
        session: Uuid,
        requester: &Requester,
    ) -> Result<Option<SessionRecord>, ConversationError> {
        let store = self.store.clone();
        let record = blocking(move || Ok(store.record(session)?)).await?;
        match record {
            Some(record) if !requester.may_use(&record.owner) => Err(unknown(session)),
            other => Ok(other),
        }
    }

    /// A conversation as the store and, when resident, its sequence know it.
    pub async fn describe(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, ConversationError> {
        self.claim(session).await?;
        let resident = self.engine.look(session, requester.clone()).await?;
        let record = self.record(session, &requester).await?;
        match (resident, record) {
            (Some(resident), record) => {
                let mut info = resident.info;
                if let Some(record) = record {
                    info.bytes = record.bytes;
                    if !resident.dirty {
                        info.checksum = Some(record.checksum);
                    }
                }
                Ok(info)
            }
            (None, Some(record)) => Ok(describe(session, &record, self.model())),
            (None, None) => Err(unknown(session)),
        }
    }

    /// Deletes a conversation: its sequence, its stored version and its pages' references.
    pub async fn delete(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<(), ConversationError> {
        self.claim(session).await?;
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        let owner_check = requester.clone();
        self.while_held(session, requester, HoldFor::Delete, move |resident| {
            match store.record(session)? {
                Some(record) if !owner_check.may_use(&record.owner) => {
                    return Err(unknown(session));
                }
                None if !resident => return Err(unknown(session)),
                _ => {}
            }
            store.delete(session)?;
            if let Some(fleet) = &fleet {
                fleet.left(session);
            }
            Ok(())
        })
        .await
    }

    /// Holds `session` in the engine (`HoldFor`), runs `work` on a blocking thread (told
    /// whether the conversation is resident), then releases it: the resident copy goes when
    /// `work` succeeded and stays when it failed. This runs as a task of its own, so a client
    /// hanging up cannot leave the conversation held.
    async fn while_held<T: Send + 'static>(
        &self,
        session: Uuid,
        requester: Requester,
        purpose: HoldFor,
        work: impl FnOnce(bool) -> Result<T, ConversationError> + Send + 'static,
    ) -> Result<T, ConversationError> {
        let engine = self.engine.clone();
        let held = async move {
            let resident = engine.hold(session, requester, purpose).await?;
            let done = blocking(move || work(resident)).await;
            engine.release(session, done.is_ok()).await?;
            done
        };
        tokio::spawn(held)
            .await
            .map_err(|e| ConversationError::Internal(format!("a conversation task failed: {e}")))?
    }

    /// Returns once the conversation's snapshot is committed to the store.
    pub async fn save(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, ConversationError> {
        self.claim(session).await?;
        if let Some(saved) = self.engine.save(session, requester.clone()).await? {
            return Ok(saved);
        }
        match self.record(session, &requester).await? {
            Some(record) => Ok(describe(session, &record, self.model())),
            None => Err(unknown(session)),
        }
    }

    /// A new conversation `into` with `session`'s owner (the forking key's when it had none),
    /// history and random stream, sharing every page of its stored snapshot: it continues
    /// exactly as the source would. A resident source with unsaved changes is saved first, so
    /// the fork starts where the source is now.
    pub async fn fork(
        &self,
        session: Uuid,
        into: Uuid,
        requester: Requester,
    ) -> Result<SessionInfo, ConversationError> {
        if into == session {
            return Err(ConversationError::Invalid(
                "a fork needs a new conversation id, not the source's".into(),
            ));
        }
        self.claim(session).await?;
        self.refuse_existing(into).await?;
        self.may_create(into, &requester).await?;
        self.engine.save(session, requester.clone()).await?;
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        let model = self.model().clone();
        let forked = blocking(move || {
            let record = match store.record(session)? {
                Some(record) if requester.may_use(&record.owner) => record,
                _ => return Err(unknown(session)),
            };
            if let Some(reason) = &record.damaged {
                return Err(ConversationError::Damaged(format!(
                    "conversation {session} is damaged and cannot be forked: {reason}"
                )));
            }
            let now = now_ms();
            let forked = SessionRecord {
                // A conversation nobody owned becomes the forking key's (so it counts against
                // that key's quota, and other keys cannot use it).
                owner: record.owner.clone().or_else(|| requester.owner()),
                created_ms: now,
                last_used_ms: now,
                ..record
            };
            if !store.fork(session, into, &forked)? {
                return Err(unknown(session));
            }
            if let Some(fleet) = &fleet {
                fleet.queue(into);
            }
            Ok(describe(into, &forked, &model))
        })
        .await?;
        Ok(forked)
    }

    /// Refuses `into` as a new conversation's id when anything already goes by it: resident,
    /// held, stored, or forwarded elsewhere.
    async fn refuse_existing(&self, into: Uuid) -> Result<(), ConversationError> {
        let exists = || {
            ConversationError::Incompatible(format!(
                "conversation {into} already exists; fork into a new id"
            ))
        };
        match self.engine.look(into, Requester::System).await {
            Ok(None) => {}
            Ok(Some(_)) | Err(EngineError::Moved { .. } | EngineError::Conflict(_)) => {
                return Err(exists());
            }
            Err(other) => return Err(other.into()),
        }
        let store = self.store.clone();
        let taken =
            blocking(move || Ok(store.record(into)?.is_some() || store.forward(into)?.is_some()))
                .await?;
        if taken {
            return Err(exists());
        }
        Ok(())
    }

    /// The conversation's snapshot file: taken now if resident, else the stored one (read on a
    /// blocking thread, every page checked).
    pub async fn export(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Vec<u8>, ConversationError> {
        self.claim(session).await?;
        let record = self.record(session, &requester).await?;
        if let Some(bytes) = self.engine.check_out(session, requester).await? {
            return Ok(bytes);
        }
        let record = record.ok_or_else(|| unknown(session))?;
        let store = self.store.clone();
        blocking(move || paging::stored_file(&store, session, &record))
            .await?
            .ok_or_else(|| unknown(session))
    }

    /// The conversation as a llama.cpp `ggsq` v4 file (one stream per cache: loads into a
    /// unified-KV or single-sequence llama.cpp context, llama-server's default).
    pub async fn export_llama(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Vec<u8>, ConversationError> {
        let bytes = self.export(session, requester).await?;
        blocking(move || {
            let snapshot = Snapshot::decode(&bytes)?;
            Ok(llama_file::write_seq_file(
                4,
                &snapshot.tokens,
                &snapshot.sequence_state,
            ))
        })
        .await
    }

    /// Holds `session` for a move and hands out its snapshot: taken from its sequence when
    /// resident, else read from the store. Every change to it is refused until `end_move`.
    pub async fn begin_move(&self, session: Uuid) -> Result<Outgoing, ConversationError> {
        if let Some(outgoing) = self.engine.begin_move(session).await? {
            return Ok(outgoing);
        }
        let store = self.store.clone();
        let stored = blocking(move || {
            let record = store.record(session)?.ok_or_else(|| unknown(session))?;
            if let Some(reason) = &record.damaged {
                return Err(ConversationError::Damaged(format!(
                    "conversation {session} is damaged and cannot move: {reason}"
                )));
            }
            let bytes =
                paging::stored_file(&store, session, &record)?.ok_or_else(|| unknown(session))?;
            Ok(Outgoing {
                tokens: record.tokens,
                owner: record.owner,
                created_ms: record.created_ms,
                bytes,
            })
        })
        .await;
        if stored.is_err() {
            self.engine.end_move(session, false).await?;
        }
        stored
    }

    /// Where `session` went, if it moved away from this instance (the store's forward; no
    /// claim is made).
    pub async fn moved_to(&self, session: Uuid) -> Result<Option<String>, ConversationError> {
        let store = self.store.clone();
        blocking(move || Ok(store.forward(session)?.map(|f| f.target))).await
    }

    /// Ends a move begun by `begin_move`. With a target (it acknowledged a durable copy) the
    /// conversation is deleted here and forwarded there, in one store transaction; without one
    /// it simply stays. If that commit fails the conversation stays refused here (still
    /// moving) rather than open to turns that would fork it; a restart clears that.
    pub async fn end_move(
        &self,
        session: Uuid,
        target: Option<String>,
    ) -> Result<(), ConversationError> {
        let Some(target) = target else {
            return Ok(self.engine.end_move(session, false).await?);
        };
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        blocking(move || {
            let forward = ForwardRecord {
                record_version: RECORD_VERSION,
                target,
                moved_ms: now_ms(),
            };
            store.move_out(session, &forward)?;
            // Out of the fleet too, unless it was handed to another member (then its object
            // is that member's, and the uploader leaves it alone).
            if let Some(fleet) = &fleet {
                fleet.left(session);
            }
            Ok(())
        })
        .await?;
        Ok(self.engine.end_move(session, true).await?)
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
            self.engine.look(session, requester.clone()).await
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
    ) -> Result<SessionInfo, ConversationError> {
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
    ) -> Result<SessionInfo, ConversationError> {
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
    ) -> Result<SessionInfo, ConversationError> {
        self.claim(session).await?;
        self.replace(session, Requester::System, bytes, Some(origin))
            .await
    }

    /// Verifies and stores the file while the engine holds the conversation (turns to it
    /// are refused with 409; unsaved changes are saved first, and the resident copy stays if
    /// the file is refused).
    async fn replace(
        &self,
        session: Uuid,
        requester: Requester,
        bytes: Vec<u8>,
        origin: Option<Origin>,
    ) -> Result<SessionInfo, ConversationError> {
        let purpose = match origin {
            Some(_) => HoldFor::Return,
            None => HoldFor::Upload,
        };
        let store = self.store.clone();
        let fleet = self.fleet.clone();
        let model = self.model().clone();
        let uploader = requester.clone();
        self.while_held(session, requester, purpose, move |_| {
            imports::verify_and_store(
                &store,
                fleet.as_deref(),
                &model,
                session,
                &uploader,
                &bytes,
                origin,
            )
        })
        .await
    }
}
