//! Key rotation while serving: `start` reloads the key file (a key was added and made
//! current) and runs one pass over the local store and then the fleet's bucket in the
//! background, sealing again what an older key sealed. One pass at a time: a second `start`
//! while one runs joins it. A pass cut short (a restart, a failure) is finished by the next.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::ConversationError;
use super::Fleet;
use crate::clock::now_ms;
use crate::store::{RekeyProgress, Store};

/// What the last (or running) pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RekeyStatus {
    /// `idle` (none since start), `running`, `done` or `failed`.
    pub state: &'static str,
    /// The key everything is being sealed with.
    pub current_key: Option<String>,
    pub store: RekeyProgress,
    /// `None` without a bucket.
    pub bucket: Option<RekeyProgress>,
    pub error: Option<String>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
}

pub struct Rekeys {
    store: Arc<Store>,
    fleet: Option<Arc<Fleet>>,
    status: Arc<Mutex<RekeyStatus>>,
}

impl Rekeys {
    pub fn new(store: Arc<Store>, fleet: Option<Arc<Fleet>>) -> Arc<Rekeys> {
        Arc::new(Rekeys {
            store,
            fleet,
            status: Arc::new(Mutex::new(RekeyStatus {
                state: "idle",
                ..RekeyStatus::default()
            })),
        })
    }

    pub fn status(&self) -> RekeyStatus {
        self.status.lock().expect("never poisoned").clone()
    }

    /// Reloads the key file and starts a pass (or answers the running one's status).
    pub fn start(&self) -> Result<RekeyStatus, ConversationError> {
        let Some(keys) = self.store.keys() else {
            return Err(ConversationError::Invalid(
                "this instance stores nothing encrypted: start it with --encryption-key-file \
                 to encrypt at rest"
                    .into(),
            ));
        };
        let mut status = self.status.lock().expect("never poisoned");
        if status.state == "running" {
            return Ok(status.clone());
        }
        let current = keys
            .reload()
            .map_err(|e| ConversationError::Invalid(e.to_string()))?;
        *status = RekeyStatus {
            state: "running",
            current_key: Some(current),
            bucket: self.fleet.as_ref().map(|_| RekeyProgress::default()),
            started_ms: Some(now_ms()),
            ..RekeyStatus::default()
        };
        let answer = status.clone();
        drop(status);
        let (store, fleet, shared) = (self.store.clone(), self.fleet.clone(), self.status.clone());
        tokio::spawn(async move {
            let outcome = run(store, fleet, shared.clone()).await;
            let mut status = shared.lock().expect("never poisoned");
            status.finished_ms = Some(now_ms());
            match outcome {
                Ok(()) => status.state = "done",
                Err(error) => {
                    tracing::error!(%error, "key rotation failed; run it again to finish it");
                    status.state = "failed";
                    status.error = Some(error);
                }
            }
        });
        Ok(answer)
    }
}

async fn run(
    store: Arc<Store>,
    fleet: Option<Arc<Fleet>>,
    status: Arc<Mutex<RekeyStatus>>,
) -> Result<(), String> {
    let shared = status.clone();
    tokio::task::spawn_blocking(move || {
        store.rekey(&mut |progress| {
            shared.lock().expect("never poisoned").store = progress;
        })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if let Some(fleet) = fleet {
        fleet
            .rekey(&mut |progress| {
                status.lock().expect("never poisoned").bucket = Some(progress);
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
