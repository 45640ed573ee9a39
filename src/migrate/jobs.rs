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
use crate::engine::now_ms;

/// Every job this daemon ran since it started.
#[derive(Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<Uuid, Arc<Mutex<JobStatus>>>>,
}

impl Jobs {
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
    let running = tokio::spawn(run(migrator, peer, target, moves, job.clone()));
    // A job that ended without finishing (a panic) still ends, with the reason, so nobody
    // polls it forever.
    tokio::spawn(async move {
        if let Err(error) = running.await {
            let mut status = job.lock().expect("a job lock is never poisoned");
            status.state = "finished".into();
            status.finished_ms = Some(now_ms());
            status.error = Some(format!("the job stopped unexpectedly: {error}"));
        }
    });
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
    for planned in moves {
        let id = planned.session_id;
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
    });
}
