//! The writer: a thread that encodes, pages, hashes and commits saves, so the engine thread
//! only copies a sequence's state out and goes on decoding.
//!
//! Jobs run one at a time in the order they were queued, so a conversation's later save never
//! commits before an earlier one. Each job's `then` runs on this thread once the commit
//! succeeded or failed (a turn's reply ends there), and a `Saved` goes back with the outcome
//! and the state buffer, for reuse.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::fleet::Fleet;
use crate::engine::{KeepAs, KeepError, SaveJob, SaveResult, Saved};
use crate::store::Store;

pub struct Writer {
    jobs: Option<mpsc::Sender<SaveJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread; finished saves are sent to `done`.
    /// With a fleet, each committed save goes to the bucket too: in `remote-sync` mode before
    /// the job's `then` runs (so a turn's reply waits for it), else queued for the uploader;
    /// unnamed entries are always queued.
    pub fn start(
        store: Arc<Store>,
        fleet: Option<Arc<Fleet>>,
        done: mpsc::Sender<Saved>,
    ) -> std::io::Result<Writer> {
        let (jobs, queue) = mpsc::channel::<SaveJob>();
        let thread = std::thread::Builder::new()
            .name("kvsnap-writer".into())
            .spawn(move || {
                lower_priority();
                // Conversations whose last queued save failed: the store holds an older
                // version than the engine's `unchanged_below` speaks of, until one succeeds.
                let mut failed = HashSet::new();
                for job in queue {
                    let started = std::time::Instant::now();
                    let mut keep = job.keep();
                    if failed.contains(&job.session) {
                        keep.unchanged_below = 0;
                    }
                    let (saved, named) = match job.kind {
                        KeepAs::Conversation => (super::save(&store, keep).map(|_| ()), true),
                        KeepAs::Entry {
                            continues,
                            checkpoint,
                        } => (
                            super::save_entry(&store, keep, continues, checkpoint),
                            false,
                        ),
                    };
                    let mut result: SaveResult = saved.map_err(KeepError::from);
                    if let (Ok(()), Some(fleet)) = (&result, &fleet) {
                        if named {
                            result = fleet.saved(job.session, true).map_err(KeepError::from);
                        } else {
                            fleet.queue_entry(job.session);
                        }
                    }
                    if result.is_err() {
                        failed.insert(job.session);
                    } else {
                        failed.remove(&job.session);
                    }
                    tracing::debug!(session = %job.session, saved = ?started.elapsed(), "writer save");
                    (job.then)(&result);
                    let saved = Saved {
                        session: job.session,
                        result,
                        raw: job.raw,
                    };
                    if done.send(saved).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Writer {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues a save; gives the job back if the writer has stopped.
    pub fn queue(&self, job: SaveJob) -> Result<(), Box<SaveJob>> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| Box::new(e.0)),
            None => Err(Box::new(job)),
        }
    }
}

/// The writer yields to decoding: at a higher nice value it gets the cores only when
/// llama.cpp's threads leave them, so saves stretch a turn's reply a little instead of every
/// other conversation's time between tokens.
fn lower_priority() {
    // On Linux the nice value belongs to the thread named by its id.
    let thread = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(thread), WRITER_NICE) {
        tracing::warn!(%error, "could not lower the writer thread's priority");
    }
}

/// Measured with the decode-stall bench (`benches/pages.rs`): at nice 0 the p99 time between
/// tokens grew 1.18–1.32x while others saved, at 9 1.03x, with a turn's reply 22 ms later
/// (138 against 116 ms); at 19 the writer starved behind llama.cpp's spinning threads.
const WRITER_NICE: i32 = 9;

impl Drop for Writer {
    /// Finishes every queued save, then stops.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
