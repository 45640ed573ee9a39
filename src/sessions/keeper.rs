//! `StoreKeeper`: the engine's `Keeper`, on the store.
//!
//! It decides where a conversation's bytes go and when: the persist policy, saves now or
//! through the writer thread, and the "latest version" map (`saving`) that makes anything
//! reading a stored version wait for that conversation's queued saves first.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc;

use uuid::Uuid;

use super::fleet::Fleet;
use super::writer::Writer;
use super::{PersistPolicy, describe, lookup, paging};
use crate::clock::now_ms;
use crate::engine::{
    FoundEntry, Keep, KeepAs, KeepError, Keeper, ModelInfo, SaveJob, Saved, SessionInfo,
};
use crate::snapshot::LiveIdentity;
use crate::snapshot::manifest::Manifest;
use crate::store::records::SessionRecord;
use crate::store::{SessionStore, Store};

pub struct StoreKeeper {
    store: Arc<Store>,
    policy: PersistPolicy,
    writer: Writer,
    finished: mpsc::Receiver<Saved>,
    /// Saves queued on the writer and not yet finished, per conversation.
    saving: HashMap<Uuid, usize>,
    /// The shared bucket, when this instance is part of a fleet: told of every change.
    fleet: Option<Arc<Fleet>>,
    /// Whether requests no client named are kept as unnamed entries.
    entries: bool,
    /// Where an entry found is marked used, off the decode thread (`None` outside a runtime).
    runtime: Option<tokio::runtime::Handle>,
}

impl StoreKeeper {
    /// Starts the writer thread.
    pub fn start(
        store: Arc<Store>,
        policy: PersistPolicy,
        fleet: Option<Arc<Fleet>>,
        entries: bool,
    ) -> std::io::Result<Self> {
        let (done, finished) = mpsc::channel();
        let writer = Writer::start(store.clone(), fleet.clone(), done)?;
        Ok(StoreKeeper {
            store,
            policy,
            writer,
            finished,
            saving: HashMap::new(),
            fleet,
            entries,
            runtime: tokio::runtime::Handle::try_current().ok(),
        })
    }

    /// Counts one queued save of this conversation as finished.
    fn count_finished(&mut self, saved: &Saved) {
        if let Some(count) = self.saving.get_mut(&saved.session) {
            *count -= 1;
            if *count == 0 {
                self.saving.remove(&saved.session);
            }
        }
    }

    fn record(&self, session: Uuid) -> Result<Option<SessionRecord>, KeepError> {
        Ok(self.store.record(session)?)
    }
}

impl Keeper for StoreKeeper {
    fn saves_every_turn(&self) -> bool {
        self.policy == PersistPolicy::Turn
    }

    fn stored(&self, session: Uuid, model: &ModelInfo) -> Result<Option<SessionInfo>, KeepError> {
        Ok(self
            .record(session)?
            .map(|record| describe(session, &record, model)))
    }

    fn forwarded_to(&self, session: Uuid) -> Result<Option<String>, KeepError> {
        Ok(self.store.forward(session)?.map(|f| f.target))
    }

    fn save(&mut self, keep: Keep<'_>) -> Result<(), KeepError> {
        // The engine waits for a conversation's queued saves before it saves it now, so this
        // newer version cannot be overwritten by an older one committing later.
        if self.saving.contains_key(&keep.session) {
            return Err(KeepError::Failed(format!(
                "conversation {} was saved while an older save of it was queued",
                keep.session
            )));
        }
        let session = keep.session;
        if let KeepAs::Entry {
            continues,
            checkpoint,
        } = keep.kind
        {
            super::save_entry(&self.store, keep, continues, checkpoint)?;
            if let Some(fleet) = &self.fleet {
                fleet.queue_entry(session);
            }
            return Ok(());
        }
        super::save(&self.store, keep)?;
        if let Some(fleet) = &self.fleet {
            fleet.queue(session);
        }
        Ok(())
    }

    fn queue(&mut self, job: SaveJob) -> Result<(), Box<SaveJob>> {
        let session = job.session;
        self.writer.queue(job)?;
        *self.saving.entry(session).or_default() += 1;
        Ok(())
    }

    fn wait(&mut self, session: Option<Uuid>) -> Vec<Saved> {
        let mut done = Vec::new();
        loop {
            let waiting = match session {
                Some(id) => self.saving.contains_key(&id),
                None => !self.saving.is_empty(),
            };
            if !waiting {
                return done;
            }
            match self.finished.recv() {
                Ok(saved) => {
                    self.count_finished(&saved);
                    done.push(saved);
                }
                Err(_) => {
                    self.saving.clear();
                    return done;
                }
            }
        }
    }

    fn finished(&mut self) -> Vec<Saved> {
        let mut done = Vec::new();
        while let Ok(saved) = self.finished.try_recv() {
            self.count_finished(&saved);
            done.push(saved);
        }
        done
    }

    fn read(
        &mut self,
        session: Uuid,
        owner: Option<&str>,
        frame: &mut Vec<u8>,
        room: usize,
        most_tokens: Option<usize>,
    ) -> Result<Option<Manifest>, KeepError> {
        Ok(paging::read(
            &self.store,
            session,
            owner,
            frame,
            room,
            most_tokens,
        )?)
    }

    fn mark_damaged(&mut self, session: Uuid, reason: &str) {
        if let Err(error) = self.store.mark_damaged(session, reason) {
            tracing::error!(%session, %error, "could not mark a damaged conversation");
        }
    }

    fn keeps_entries(&self) -> bool {
        self.entries
    }

    fn find_entry(
        &mut self,
        owner: Option<&str>,
        identity: &LiveIdentity,
        prompt: &[i32],
        checkpoints_only: bool,
    ) -> Result<Option<FoundEntry>, KeepError> {
        metrics::counter!("kvsnap_prefix_lookups_total").increment(1);
        let found = lookup::find(&self.store, identity, owner, prompt, checkpoints_only)?;
        if let (Some(found), Some(runtime)) = (&found, &self.runtime) {
            // Used now: the budget drops it after entries used longer ago.
            let store = self.store.clone();
            let entry = found.entry;
            runtime.spawn_blocking(move || {
                if let Err(error) = store.touch_entry(entry, now_ms()) {
                    tracing::warn!(%entry, %error, "could not mark an unnamed entry used");
                }
            });
        }
        Ok(found.map(|found| FoundEntry {
            entry: found.entry,
            tokens: found.tokens,
            checkpoint: found.checkpoint,
        }))
    }

    fn drop_entry(&mut self, entry: Uuid, reason: &str) {
        tracing::warn!(%entry, %reason, "an unnamed entry could not be restored; dropped");
        if let Err(error) = self.store.remove_entry(entry) {
            tracing::error!(%entry, %error, "could not drop an unnamed entry");
        }
    }
}
