//! Appending to the audit trail from async code: one durable store write, off the runtime. A
//! failed append is logged and does not fail the action it records: that has already happened.

use std::sync::Arc;

use crate::store::Store;
use crate::store::records::AuditRecord;

pub async fn append(store: &Arc<Store>, entry: AuditRecord) {
    let store = store.clone();
    let target = entry.target.clone();
    let action = entry.action.clone();
    match tokio::task::spawn_blocking(move || store.append_audit(&entry)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::error!(%error, %target, %action, "could not append to the audit trail")
        }
        Err(error) => {
            tracing::error!(%error, %target, %action, "could not append to the audit trail")
        }
    }
}

/// The actor of what an instance does on its own (a move a job made, a lease taken over).
pub fn instance_actor(instance: u64) -> String {
    format!("instance:{instance:016x}")
}
