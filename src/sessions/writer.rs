//! The writer: a thread that encodes, pages, hashes and commits saves, so the engine thread
//! only copies a sequence's state out and goes on decoding.
//!
//! Jobs run one at a time in the order they were queued, so a conversation's later save never
//! commits before an earlier one. Each job's `then` runs on this thread once the commit
//! succeeded or failed (a turn's reply ends there), and a `Saved` goes back to the engine with
//! the outcome and the state buffer, for reuse.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use uuid::Uuid;

use super::paging;
use crate::engine::EngineError;
use crate::snapshot::Snapshot;
use crate::snapshot::llama_state::SequenceState;
use crate::store::records::SessionRecord;
use crate::store::{PutStats, Store};

/// What a job's `then` hears.
pub type SaveResult = Result<PutStats, EngineError>;

/// One save: a conversation's state as the engine copied it out, and what to store with it.
pub struct SaveJob {
    pub session: Uuid,
    /// Its record; the writer fills in the snapshot file's size and checksum.
    pub record: SessionRecord,
    /// The snapshot around the state, its state left out.
    pub shell: Snapshot<'static>,
    /// The state's parse; its memory section is `raw[section_at..]`.
    pub state: SequenceState,
    pub raw: Vec<u8>,
    pub section_at: usize,
    /// Runs on the writer thread once the save committed or failed.
    pub then: Box<dyn FnOnce(&SaveResult) + Send>,
}

/// A finished save, back to the engine.
pub struct Saved {
    pub session: Uuid,
    pub result: SaveResult,
    /// The job's state buffer, for the next save.
    pub raw: Vec<u8>,
}

pub struct Writer {
    jobs: Option<mpsc::Sender<SaveJob>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread; finished saves are sent to `done`.
    pub fn start(store: Arc<Store>, done: mpsc::Sender<Saved>) -> std::io::Result<Writer> {
        let (jobs, queue) = mpsc::channel::<SaveJob>();
        let thread = std::thread::Builder::new()
            .name("kvsnap-writer".into())
            .spawn(move || {
                for job in queue {
                    let result = commit(&store, &job);
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

impl Drop for Writer {
    /// Finishes every queued save, then stops.
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Encodes the snapshot file (for the record's size and checksum), then stores its pages.
fn commit(store: &Store, job: &SaveJob) -> SaveResult {
    let started = std::time::Instant::now();
    let section = &job.raw[job.section_at..];
    let file = job
        .shell
        .encode_around(job.state.normalised_pieces(section))?;
    let record = SessionRecord {
        bytes: file.len() as u64,
        checksum: file.file_checksum.to_hex().to_string(),
        ..job.record.clone()
    };
    let stats = paging::save(store, job.session, &record, &job.shell, &job.state, section)?;
    tracing::debug!(
        session = %job.session, saved = ?started.elapsed(), bytes = file.len(),
        pages_written = stats.pages_written, page_bytes = stats.page_bytes_written,
        "writer save"
    );
    metrics::histogram!("kvsnap_snapshot_save_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("kvsnap_page_bytes_written_total").increment(stats.page_bytes_written);
    metrics::counter!("kvsnap_manifest_bytes_written_total").increment(stats.manifest_bytes);
    Ok(stats)
}
