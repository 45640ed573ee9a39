//! A disk that fails on a schedule and can lose power: the instrument of the storage-fault
//! campaign (`tests/faults.rs`), modelled on redb's own fuzzer.
//!
//! `Disk` is an in-memory file that remembers what was synced: `crash` gives back the image a
//! power cut would leave — everything synced, and of the writes since the last sync a random
//! subset, some of them torn; `DiskFile` is the redb `StorageBackend` over it. `Faulty` wraps
//! any backend: it counts every call and, once armed, fails the scheduled one with an I/O
//! error, a short write or ENOSPC, and every call after it until disarmed (a disk that failed once is not trusted
//! again within one open; the store is reopened, as the daemon would be restarted).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::ops::Bound;

use redb::{BackendError, StorageBackend};

/// How a scheduled call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every kind of call answers EIO.
    Io,
    /// A write stores its first half, then answers EIO; other calls answer EIO.
    ShortWrite,
    /// Writes and length changes answer ENOSPC; reads and syncs still work.
    NoSpace,
}

impl Fault {
    fn code(self) -> u8 {
        match self {
            Fault::Io => 0,
            Fault::ShortWrite => 1,
            Fault::NoSpace => 2,
        }
    }

    fn from_code(code: u8) -> Fault {
        match code {
            1 => Fault::ShortWrite,
            2 => Fault::NoSpace,
            _ => Fault::Io,
        }
    }
}

/// When calls fail: shared between the backend and whoever runs the campaign.
#[derive(Debug, Default)]
pub struct Schedule {
    calls: AtomicU64,
    /// The call number from which calls fail (`u64::MAX`: none).
    fail_from: AtomicU64,
    fault: AtomicU8,
    failed: AtomicU64,
    armed: AtomicBool,
}

impl Schedule {
    pub fn new() -> Arc<Schedule> {
        let schedule = Schedule::default();
        schedule.fail_from.store(u64::MAX, Ordering::SeqCst);
        Arc::new(schedule)
    }

    /// Fails the call `after` calls from now, and every call after it, with `fault`.
    pub fn arm(&self, after: u64, fault: Fault) {
        self.fault.store(fault.code(), Ordering::SeqCst);
        let now = self.calls.load(Ordering::SeqCst);
        self.fail_from
            .store(now.saturating_add(after), Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.fail_from.store(u64::MAX, Ordering::SeqCst);
    }

    /// Calls made so far, and calls failed so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.calls.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    /// The fault for this call, if it is to fail.
    fn next(&self) -> Option<Fault> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        if self.armed.load(Ordering::SeqCst) && call >= self.fail_from.load(Ordering::SeqCst) {
            self.failed.fetch_add(1, Ordering::SeqCst);
            Some(Fault::from_code(self.fault.load(Ordering::SeqCst)))
        } else {
            None
        }
    }
}

/// A write or length change since the last sync.
#[derive(Debug, Clone)]
enum Unsynced {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Image {
    /// What reads see.
    current: Vec<u8>,
    /// What the last sync made durable.
    durable: Vec<u8>,
    unsynced: Vec<Unsynced>,
}

/// An in-memory file with a durable image (see the module's comment).
#[derive(Debug, Default)]
pub struct Disk {
    image: Mutex<Image>,
}

impl Disk {
    pub fn new() -> Arc<Disk> {
        Arc::new(Disk::default())
    }

    /// A disk holding `bytes`, all durable.
    pub fn from_bytes(bytes: Vec<u8>) -> Arc<Disk> {
        Arc::new(Disk {
            image: Mutex::new(Image {
                current: bytes.clone(),
                durable: bytes,
                unsynced: Vec::new(),
            }),
        })
    }

    /// What a power cut now would leave: the durable image with each unsynced change kept
    /// or lost by `keep(n)` (called once per change, in order), a kept write possibly torn
    /// to its first `keep_bytes` bytes. The caller opens a new `Disk` on it.
    pub fn crash(&self, mut keep: impl FnMut(usize) -> Option<usize>) -> Vec<u8> {
        let image = self.image.lock().expect("disk lock");
        let mut bytes = image.durable.clone();
        for change in &image.unsynced {
            match change {
                Unsynced::SetLen(len) => {
                    if keep(0).is_some() {
                        bytes.resize(*len as usize, 0);
                    }
                }
                Unsynced::Write { offset, data } => {
                    let Some(kept) = keep(data.len()) else {
                        continue;
                    };
                    let kept = kept.min(data.len());
                    let start = *offset as usize;
                    if bytes.len() < start + kept {
                        bytes.resize(start + kept, 0);
                    }
                    bytes[start..start + kept].copy_from_slice(&data[..kept]);
                }
            }
        }
        bytes
    }

    /// Every byte as reads see it now.
    pub fn bytes(&self) -> Vec<u8> {
        self.image.lock().expect("disk lock").current.clone()
    }
}

/// `Disk` as a redb backend (it never fails by itself; wrap it in `Faulty`).
#[derive(Debug)]
pub struct DiskFile(pub Arc<Disk>);

impl StorageBackend for DiskFile {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.image.lock().expect("disk lock").current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let image = self.0.image.lock().expect("disk lock");
        let start = usize::try_from(offset).map_err(|_| eio("read offset"))?;
        let end = start
            .checked_add(out.len())
            .ok_or_else(|| eio("read end"))?;
        let Some(bytes) = image.current.get(start..end) else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        };
        out.copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut image = self.0.image.lock().expect("disk lock");
        image.current.resize(len as usize, 0);
        image.unsynced.push(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut image = self.0.image.lock().expect("disk lock");
        image.durable = image.current.clone();
        image.unsynced.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut image = self.0.image.lock().expect("disk lock");
        let start = usize::try_from(offset).map_err(|_| eio("write offset"))?;
        let end = start + data.len();
        if image.current.len() < end {
            image.current.resize(end, 0);
        }
        image.current[start..end].copy_from_slice(data);
        image.unsynced.push(Unsynced::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

/// Any redb backend, failing as `schedule` says: `DiskFile` in the campaign, redb's
/// `FileBackend` for a daemon under `KVSNAP_STORAGE_FAULTS` (test support only). Locks go
/// straight to the backend.
#[derive(Debug)]
pub struct Faulty<B> {
    pub backend: B,
    pub schedule: Arc<Schedule>,
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected I/O error on {what}"))
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl<B: StorageBackend> StorageBackend for Faulty<B> {
    fn len(&self) -> Result<u64, io::Error> {
        match self.schedule.next() {
            Some(Fault::Io | Fault::ShortWrite) => Err(eio("len")),
            _ => self.backend.len(),
        }
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        match self.schedule.next() {
            Some(Fault::Io | Fault::ShortWrite) => Err(eio("read")),
            _ => self.backend.read(offset, out),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        match self.schedule.next() {
            Some(Fault::NoSpace) => Err(enospc()),
            Some(_) => Err(eio("set_len")),
            None => self.backend.set_len(len),
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        match self.schedule.next() {
            Some(Fault::Io | Fault::ShortWrite) => Err(eio("sync")),
            _ => self.backend.sync_data(),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        match self.schedule.next() {
            None => self.backend.write(offset, data),
            Some(Fault::NoSpace) => Err(enospc()),
            Some(Fault::Io) => Err(eio("write")),
            Some(Fault::ShortWrite) => {
                self.backend.write(offset, &data[..data.len() / 2])?;
                Err(eio("write (short)"))
            }
        }
    }

    fn close(&self) -> Result<(), io::Error> {
        self.backend.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.backend.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.backend.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.backend.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.backend.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.backend.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.backend.query_lock_range(start, end)
    }
}

/// Arms and disarms `schedule` from a control file, read every 50 ms: a missing or empty file
/// means no faults; `io`, `short-write` or `enospc` fail every call from now on that way.
/// Test support: the daemon starts this only under `KVSNAP_STORAGE_FAULTS`.
pub fn follow_control_file(path: std::path::PathBuf, schedule: Arc<Schedule>) {
    std::thread::Builder::new()
        .name("storage-faults".into())
        .spawn(move || {
            let mut current = String::new();
            loop {
                let wanted = std::fs::read_to_string(&path)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                if wanted != current {
                    match wanted.as_str() {
                        "io" => schedule.arm(0, Fault::Io),
                        "short-write" => schedule.arm(0, Fault::ShortWrite),
                        "enospc" => schedule.arm(0, Fault::NoSpace),
                        _ => schedule.disarm(),
                    }
                    tracing::warn!(faults = %wanted, "injected storage faults changed");
                    current = wanted;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
        .expect("spawn the storage-fault thread");
}
