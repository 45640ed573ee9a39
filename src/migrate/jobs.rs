//! Bulk moves in the background: `POST /admin/v1/migrate` starts a job, `GET
//! /admin/v1/jobs/{id}` reports it.
//!
//! A job moves its conversations one after another, so the engine hands out one snapshot at a
//! time and keeps serving every other conversation meanwhile. Jobs live in memory: a restarted
//! daemon forgets them, and the conversations themselves are safe either way (see `mod.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::Migrator;
use super::peer::{PeerClient, PeerIdentity};
use super::report::{JobStatus, PlannedMove, Refusal};
use crate::clock::now_ms;

/// A job's error when the instance shut down before its list was done.
const STOPPED_AT_SHUTDOWN: &str =
    "this instance shut down before the job's list was done; start it again for the rest";

/// Every job this daemon ran since it started.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<Uuid, Arc<Mutex<JobStatus>>>>,
    /// Set at shutdown: jobs finish the move they are in and start no other.
    stopping: std::sync::atomic::AtomicBool,
    running: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Jobs {
    /// At a shutdown signal: no job starts another move from now on.
    pub fn stop_starting(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// At shutdown: no job starts another move; waits up to `deadline` for the moves in
    /// progress to end, and logs every job that did not finish its list.
    pub async fn wind_down(&self, deadline: std::time::Duration) {
        self.stop_starting();
        let running: Vec<_> = std::mem::take(&mut *self.running.lock().expect("never poisoned"));
        let all = futures::future::join_all(running);
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(
                "a migration was still sending at the shutdown deadline; it is left to be retried (nothing is lost: the source keeps a conversation until the target has it)"
            );
        }
        let jobs = self.jobs.lock().expect("never poisoned");
        for job in jobs.values() {
            let status = job.lock().expect("never poisoned");
            if status.error.as_deref() == Some(STOPPED_AT_SHUTDOWN) {
                tracing::warn!(
                    job = %status.job_id, target = %status.target,
                    moved = status.sessions_moved, total = status.sessions_total,
                    "a migration job stopped at shutdown before its list was done; start it again"
                );
            }
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn status(&self, id: Uuid) -> Option<JobStatus> {
        let jobs = self.jobs.lock().expect("the jobs lock is never poisoned");
        jobs.get(&id)
            .map(|job| job.lock().expect("a job lock is never poisoned").clone())
    }

    fn insert(&self, status: JobStatus) -> Arc<Mutex<JobStatus>> {
        let job = Arc::new(Mutex::new(status.clone()));
        self.jobs
            .lock()
            .expect("the jobs lock is never poisoned")
            .insert(status.job_id, job.clone());
        job
    }
}

/// Starts moving `moves` to `peer` in the background; `refused` are reported as failures
/// from the start. Returns the job's first status.
pub fn start(
    migrator: Arc<Migrator>,
    peer: PeerClient,
    target: PeerIdentity,
    moves: Vec<PlannedMove>,
    refused: Vec<Refusal>,
) -> JobStatus {
    let status = JobStatus {
        job_id: Uuid::new_v4(),
        target: peer.url().to_string(),
        state: "running".into(),
        sessions_total: moves.len() + refused.len(),
        sessions_done: refused.len(),
        bytes_planned: moves.iter().map(|m| m.bytes).sum(),
        failures: refused,
        started_ms: now_ms(),
        ..JobStatus::default()
    };
    let job = migrator.jobs.insert(status.clone());
    let running = tokio::spawn(run(migrator.clone(), peer, target, moves, job.clone()));
    // A job that ended without finishing (a panic) still ends, with the reason, so nobody
    // polls it forever.
    let watcher = tokio::spawn(async move {
        if let Err(error) = running.await {
            let mut status = job.lock().expect("a job lock is never poisoned");
            status.state = "finished".into();
            status.finished_ms = Some(now_ms());
            status.error = Some(format!("the job stopped unexpectedly: {error}"));
        }
    });
    let mut jobs = migrator.jobs.running.lock().expect("never poisoned");
    jobs.retain(|job| !job.is_finished());
    jobs.push(watcher);
    status
}

async fn run(
    migrator: Arc<Migrator>,
    peer: PeerClient,
    target: PeerIdentity,
    moves: Vec<PlannedMove>,
    job: Arc<Mutex<JobStatus>>,
) {
    let update = |change: &dyn Fn(&mut JobStatus)| {
        change(&mut job.lock().expect("a job lock is never poisoned"));
    };
    let mut left_at_shutdown = 0;
    for planned in moves {
        let id = planned.session_id;
        if migrator.jobs.stopping() {
            left_at_shutdown += 1;
            update(&|s| {
                s.failures.push(Refusal {
                    session_id: id,
                    reason: "not moved: this instance is shutting down".into(),
                });
                s.sessions_done += 1;
            });
            continue;
        }
        let progress = job.clone();
        let sent = move |bytes: u64| {
            progress
                .lock()
                .expect("a job lock is never poisoned")
                .bytes_done += bytes;
        };
        let before = job.lock().expect("a job lock is never poisoned").bytes_done;
        match migrator.move_one(id, &peer, &target, sent).await {
            Ok(_) => update(&|s| {
                s.sessions_moved += 1;
                s.moved.push(id);
            }),
            Err(error) => {
                let reason = error.to_string();
                update(&|s| {
                    // Bytes of a transfer that failed do not count as done.
                    s.bytes_done = before;
                    s.failures.push(Refusal {
                        session_id: id,
                        reason: reason.clone(),
                    });
                })
            }
        }
        update(&|s| s.sessions_done += 1);
    }
    update(&|s| {
        s.state = "finished".into();
        s.finished_ms = Some(now_ms());
        if left_at_shutdown > 0 {
            s.error = Some(STOPPED_AT_SHUTDOWN.into());
        }
    });
}
