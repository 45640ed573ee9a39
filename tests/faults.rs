//! The storage-fault campaign, modelled on redb's own fuzzer: random store operations against
//! an in-memory model of what must be there, on a disk that starts failing at a random call
//! (an I/O error, a short write or ENOSPC, on reads, writes, syncs or lengths) and then loses
//! power, keeping a random subset of its unsynced writes, some torn.
//!
//! After every power cut the store is reopened with the faults gone, and then:
//! - every acknowledged durable operation is there, whole: each conversation is in a state the
//!   model allows (what the last acknowledged operation left, or what an operation that failed
//!   or was not durable might have left), and its every page is there with its bytes;
//! - `Store::check` finds no manifest pointing at a missing page and no page without one;
//! - every acknowledged audit entry is there.
//!
//! Under the faults, every call answers (an error or a result), never panics, and no read
//! returns a state the model does not allow. The daemon, on a store file failing the same
//! ways, answers errors with a sentence, acknowledges no turn it could not save, and after a
//! restart continues every acknowledged turn exactly. `KVSNAP_FAULT_ROUNDS` sets the rounds (one power
//! cut each; `make test` runs 300, `make faults` 20,000) and `KVSNAP_FAULT_SEED` the seed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{Daemon, Dice, long_prose};
use serde_json::{Value, json};

use kvsnap::keys::Keys;
use kvsnap::store::faults::{Disk, DiskFile, Fault, Faulty, Schedule};
use kvsnap::store::records::{AuditRecord, ForwardRecord, RECORD_VERSION, SessionRecord};
use kvsnap::store::{PageId, PagedPut, SessionStore, Store};
use uuid::Uuid;

/// What a conversation can be in the store.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Absent,
    Held { checksum: String, manifest: Vec<u8> },
    Forwarded(String),
}

/// A page's bytes follow from its id, so any page read back can be checked.
fn page_bytes(id: &PageId) -> Vec<u8> {
    let len = 1 + (u16::from_le_bytes([id[0], id[1]]) as usize % 24_000);
    id.iter().copied().cycle().take(len).collect()
}

/// A manifest is opaque to the store: here a tag and the page ids it references, so the
/// campaign can follow it to its pages.
fn manifest_pages(manifest: &[u8]) -> Vec<PageId> {
    manifest[8..]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap())
        .collect()
}

fn record(checksum: &str) -> SessionRecord {
    SessionRecord {
        record_version: RECORD_VERSION,
        owner: Some("tenant".into()),
        created_ms: 1,
        last_used_ms: 1,
        tokens: 1,
        bytes: 1,
        chunks: 1,
        checksum: checksum.to_string(),
        model: "model".into(),
        damaged: None,
        compute_profile: None,
        saves: 0,
    }
}

/// What the store holds for `id`, read whole: its record, manifest and every page checked.
fn observe(store: &Store, id: Uuid) -> Result<State, String> {
    let e = |e: kvsnap::store::StoreError| e.to_string();
    if let Some(forward) = store.forward(id).map_err(e)? {
        return Ok(State::Forwarded(forward.target));
    }
    let Some(record) = store.record(id).map_err(e)? else {
        return Ok(State::Absent);
    };
    let manifest = store
        .manifest(id)
        .map_err(e)?
        .ok_or_else(|| format!("{id} has a record but no manifest"))?;
    let ids = manifest_pages(&manifest);
    let mut problem = None;
    store
        .with_pages(&ids, &mut |pages| {
            for (id, page) in ids.iter().zip(pages) {
                match page {
                    None => problem = Some(format!("page {} is missing", hex::encode(id))),
                    Some(bytes) if *bytes != page_bytes(id).as_slice() => {
                        problem = Some(format!("page {} has other bytes", hex::encode(id)))
                    }
                    Some(_) => {}
                }
            }
        })
        .map_err(e)?;
    match problem {
        // Under faults a read may fail; a read that succeeds with a hole in it is a bug.
        Some(problem) => panic!("{id}: {problem}"),
        None => Ok(State::Held {
            checksum: record.checksum,
            manifest,
        }),
    }
}

/// The model: for each conversation, every state the store may hold for it.
#[derive(Default)]
struct Model {
    allowed: HashMap<Uuid, Vec<State>>,
    /// Conversations written without fsync and acknowledged: durable once any later durable
    /// commit succeeds.
    copies: HashMap<Uuid, State>,
    audit_acknowledged: u64,
    audit_attempted: u64,
    /// Audit entries found at the last power-cut check.
    audit_checked: u64,
}

impl Model {
    fn allowed(&self, id: Uuid) -> Vec<State> {
        self.allowed
            .get(&id)
            .cloned()
            .unwrap_or(vec![State::Absent])
    }

    /// An operation on `id` ended: acknowledged and durable, acknowledged but not durable, or
    /// failed (which may or may not have taken effect).
    fn ended(&mut self, id: Uuid, new: State, outcome: Outcome) {
        let mut allowed = self.allowed(id);
        self.copies.remove(&id);
        match outcome {
            Outcome::Durable => {
                allowed = vec![new];
                self.made_durable();
            }
            Outcome::NotDurable => {
                allowed.push(new.clone());
                self.copies.insert(id, new);
            }
            Outcome::Failed => allowed.push(new),
        }
        allowed.dedup();
        self.allowed.insert(id, allowed);
    }

    /// A durable commit succeeded: the commits before it are durable too.
    fn made_durable(&mut self) {
        for (id, state) in std::mem::take(&mut self.copies) {
            self.allowed.insert(id, vec![state]);
        }
    }

    fn certain(&self, id: Uuid) -> Option<State> {
        match self.allowed(id).as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Durable,
    NotDurable,
    Failed,
}

#[derive(Default, Debug)]
struct Counts {
    operations: u64,
    failed_operations: u64,
    backend_calls: u64,
    injected_faults: u64,
    power_cuts: u64,
    states_checked: u64,
    faults_by_kind: [u64; 3],
}

fn one_operation(
    store: &Store,
    model: &mut Model,
    dice: &mut Dice,
    ids: &[Uuid],
    pages: &[PageId],
) -> bool {
    let id = ids[dice.below(ids.len() as u64) as usize];
    let tag = dice.next().to_le_bytes();
    let checksum = hex::encode(tag);
    match dice.below(100) {
        // A save: a manifest over 1–6 pages of the shared pool (so pages are shared).
        0..=44 => {
            let chosen: Vec<PageId> = (0..1 + dice.below(6))
                .map(|_| pages[dice.below(pages.len() as u64) as usize])
                .collect();
            let mut manifest = tag.to_vec();
            for page in &chosen {
                manifest.extend_from_slice(page);
            }
            let bytes: Vec<Vec<u8>> = chosen.iter().map(page_bytes).collect();
            let put = PagedPut {
                manifest: &manifest,
                refs: &chosen,
                pages: chosen
                    .iter()
                    .copied()
                    .zip(bytes.iter().map(Vec::as_slice))
                    .collect(),
            };
            let copy = dice.chance(20);
            let result = if copy {
                store.put_copy(id, &record(&checksum), &put)
            } else {
                store.put(id, &record(&checksum), &put)
            };
            let outcome = match (&result, copy) {
                (Err(_), _) => Outcome::Failed,
                (Ok(_), true) => Outcome::NotDurable,
                (Ok(_), false) => Outcome::Durable,
            };
            model.ended(id, State::Held { checksum, manifest }, outcome);
            result.is_ok()
        }
        // A fork of a conversation whose state is certain.
        45..=54 => {
            let to = ids[dice.below(ids.len() as u64) as usize];
            let Some(State::Held { manifest, .. }) = model.certain(id) else {
                return true;
            };
            if to == id || model.certain(to).is_none() {
                return true;
            }
            let result = store.fork(id, to, &record(&checksum));
            let outcome = match &result {
                Ok(true) => Outcome::Durable,
                Ok(false) => panic!("fork of {id}: the store lost a held conversation"),
                Err(_) => Outcome::Failed,
            };
            model.ended(to, State::Held { checksum, manifest }, outcome);
            result.is_ok()
        }
        55..=64 => {
            let result = store.delete(id);
            let outcome = if result.is_ok() {
                Outcome::Durable
            } else {
                Outcome::Failed
            };
            model.ended(id, State::Absent, outcome);
            result.is_ok()
        }
        65..=69 => {
            let target = format!("http://10.0.0.{}:8080", dice.below(200));
            let forward = ForwardRecord {
                record_version: RECORD_VERSION,
                target: target.clone(),
                moved_ms: 1,
            };
            let result = store.move_out(id, &forward);
            let outcome = if result.is_ok() {
                Outcome::Durable
            } else {
                Outcome::Failed
            };
            model.ended(id, State::Forwarded(target), outcome);
            result.is_ok()
        }
        70..=79 => {
            model.audit_attempted += 1;
            let entry = AuditRecord::now("key:test".into(), "delete", id.to_string(), "ok".into());
            let result = store.append_audit(&entry);
            if result.is_ok() {
                model.audit_acknowledged += 1;
                model.made_durable();
            }
            result.is_ok()
        }
        // A read: whatever it returns, the model must allow.
        _ => match observe(store, id) {
            Ok(state) => {
                assert!(
                    model.allowed(id).contains(&state),
                    "{id} reads as {state:?}, not one of {:?}",
                    model.allowed(id)
                );
                true
            }
            Err(_) => false,
        },
    }
}

/// Reopens after a power cut and checks everything against the model; the model then holds
/// exactly what was found.
fn check_after_power_cut(store: &Store, model: &mut Model, ids: &[Uuid], counts: &mut Counts) {
    assert_eq!(
        store.check().unwrap(),
        Vec::<String>::new(),
        "the page tables disagree"
    );
    for &id in ids {
        let found = observe(store, id).unwrap_or_else(|e| panic!("{id} after the power cut: {e}"));
        let allowed = model.allowed(id);
        assert!(
            allowed.contains(&found),
            "{id} after the power cut is {found:?}, not one of {allowed:?}"
        );
        model.allowed.insert(id, vec![found]);
        counts.states_checked += 1;
    }
    model.copies.clear();
    // Sequence numbers run from 1 without gaps: count from where the last check ended.
    let mut entries = model.audit_checked;
    loop {
        let page = store.audit(entries, 1000).unwrap();
        if page.is_empty() {
            break;
        }
        entries += page.len() as u64;
    }
    assert!(
        entries >= model.audit_acknowledged && entries <= model.audit_attempted,
        "the audit trail has {entries} entries; {} were acknowledged, {} attempted",
        model.audit_acknowledged,
        model.audit_attempted
    );
    model.audit_acknowledged = entries;
    model.audit_attempted = entries;
    model.audit_checked = entries;
}

/// A store on `backend`: sealed with `keys` when given.
fn open(backend: Faulty<DiskFile>, keys: &Option<Arc<Keys>>) -> Result<Store, String> {
    Store::open_on(backend, "memory", keys.clone()).map_err(|e| e.to_string())
}

fn campaign(rounds: u64, seed: u64, keys: Option<Arc<Keys>>) -> Counts {
    let mut dice = Dice::seeded(seed);
    let ids: Vec<Uuid> = (0..8)
        .map(|_| Uuid::from_u128(dice.next() as u128 + 1))
        .collect();
    let pages: Vec<PageId> = (0..24)
        .map(|_| {
            let mut id = [0u8; 32];
            for chunk in id.chunks_mut(8) {
                chunk.copy_from_slice(&dice.next().to_le_bytes());
            }
            id
        })
        .collect();
    let mut model = Model::default();
    let mut counts = Counts::default();
    let mut disk = Disk::new();
    for round in 0..rounds {
        let schedule = Schedule::new();
        let backend = Faulty {
            backend: DiskFile(disk.clone()),
            schedule: schedule.clone(),
        };
        let store = open(backend, &keys)
            .unwrap_or_else(|e| panic!("round {round}: reopening after the power cut: {e}"));
        check_after_power_cut(&store, &mut model, &ids, &mut counts);

        let fault = match dice.below(3) {
            0 => Fault::Io,
            1 => Fault::ShortWrite,
            _ => Fault::NoSpace,
        };
        // Some rounds run clean; most fail somewhere in their first few hundred calls.
        if !dice.chance(15) {
            schedule.arm(dice.below(250), fault);
        }
        for _ in 0..5 + dice.below(40) {
            counts.operations += 1;
            if !one_operation(&store, &mut model, &mut dice, &ids, &pages) {
                counts.failed_operations += 1;
            }
        }
        // The power goes: unsynced writes each kept or lost, a kept one sometimes torn. The
        // image is taken before the store is dropped, as a crash runs no destructor.
        let mut cut = Dice::seeded(dice.next());
        let image = disk.crash(|len| {
            if cut.chance(50) {
                None
            } else if len > 0 && cut.chance(20) {
                Some(cut.below(len as u64) as usize)
            } else {
                Some(len)
            }
        });
        let (calls, failed) = schedule.counts();
        counts.backend_calls += calls;
        counts.injected_faults += failed;
        if failed > 0 {
            counts.faults_by_kind[match fault {
                Fault::Io => 0,
                Fault::ShortWrite => 1,
                Fault::NoSpace => 2,
            }] += 1;
        }
        counts.power_cuts += 1;
        drop(store);
        disk = Disk::from_bytes(image);
    }
    let store = open(
        Faulty {
            backend: DiskFile(disk),
            schedule: Schedule::new(),
        },
        &keys,
    )
    .unwrap();
    check_after_power_cut(&store, &mut model, &ids, &mut counts);
    counts
}

#[test]
fn acknowledged_operations_survive_injected_faults_and_power_cuts() {
    let rounds = std::env::var("KVSNAP_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = std::env::var("KVSNAP_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_f00d);
    let started = std::time::Instant::now();
    let counts = campaign(rounds, seed, None);
    report("fault campaign", seed, rounds, &counts, started);
}

/// The same campaign on an encrypted store: sealing changes every value's bytes and every
/// page's name, never what survives.
#[test]
fn sealed_stores_survive_injected_faults_and_power_cuts_alike() {
    let rounds = std::env::var("KVSNAP_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(100, |r| r / 3);
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("keys.toml");
    kvsnap::keys::KeyFile::generate()
        .unwrap()
        .write(&key_file, false)
        .unwrap();
    let keys = Keys::load(&key_file).unwrap();
    let seed = 0x5ea1_ed00;
    let started = std::time::Instant::now();
    let counts = campaign(rounds, seed, Some(keys));
    report("sealed fault campaign", seed, rounds, &counts, started);
}

fn report(name: &str, seed: u64, rounds: u64, counts: &Counts, started: std::time::Instant) {
    println!(
        "{name} (seed {seed}): {} rounds, {} operations ({} failed under faults), \
         {} backend calls, {} injected faults (rounds failing by I/O error {}, short write {}, \
         ENOSPC {}), {} power cuts, {} conversation states checked, {:.1} s",
        rounds,
        counts.operations,
        counts.failed_operations,
        counts.backend_calls,
        counts.injected_faults,
        counts.faults_by_kind[0],
        counts.faults_by_kind[1],
        counts.faults_by_kind[2],
        counts.power_cuts,
        counts.states_checked,
        started.elapsed().as_secs_f64()
    );
    assert!(
        counts.failed_operations > 0,
        "no operation met a fault: the schedule is off"
    );
}

async fn turn(d: &Daemon, prompt: &str, session: &str, seed: Option<u64>) -> (u16, Value) {
    let mut body = json!({"prompt": prompt, "n_predict": 8, "temperature": 0.8,
                          "session_id": session});
    if let Some(seed) = seed {
        body["seed"] = json!(seed);
    }
    d.post("/completion", body).await
}

#[tokio::test]
async fn under_storage_faults_the_daemon_acknowledges_no_unsaved_turn() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("kvsnap.redb");
    let control = dir.path().join("faults");
    let env = [(
        "KVSNAP_STORAGE_FAULTS".to_string(),
        control.display().to_string(),
    )];
    let args = ["-c", "2048", "-np", "2", "--persist", "turn"];
    let first = format!("A ledger kept in turns. {}", long_prose(120));
    for fault in ["io", "enospc", "short-write"] {
        std::fs::write(&control, "").unwrap();
        let d = Daemon::start_with_env(dir.path(), &data, &args, &env);
        let session = Uuid::new_v4().to_string();
        let (status, one) = turn(&d, &first, &session, Some(7)).await;
        assert_eq!(status, 200, "{one}");
        let second = format!("{first}{} And then", one["content"].as_str().unwrap());

        // The disk fails: no turn is acknowledged, every answer is a sentence.
        std::fs::write(&control, fault).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (status, refused) = turn(&d, &second, &session, None).await;
        assert!(
            status >= 500,
            "{fault}: a turn that could not be saved answered {status}: {refused}"
        );
        let sentence = refused["error"]["message"].as_str().unwrap_or("");
        assert!(sentence.len() > 20, "{fault}: {refused}");
        let (status, other) = turn(&d, &first, &Uuid::new_v4().to_string(), Some(3)).await;
        assert!(status >= 500, "{fault}: {status} {other}");
        assert!(other["error"]["message"].as_str().is_some(), "{other}");
        // A failing disk is the store's failure, never blamed on the model.
        let saved = d
            .client
            .post(d.url(&format!("/v1/sessions/{session}/save")))
            .send()
            .await
            .unwrap();
        assert!(saved.status().as_u16() >= 500, "{fault}");
        let saved: serde_json::Value = saved.json().await.unwrap();
        for answer in [&refused, &other, &saved] {
            let sentence = answer["error"]["message"].as_str().unwrap_or("");
            assert!(!sentence.contains("model failed"), "{fault}: {answer}");
        }
        let health = d.client.get(d.url("/health")).send().await.unwrap();
        assert!(health.status().as_u16() < 600);

        // The faults stop with a restart: the acknowledged turn continues exactly, as an
        // uninterrupted conversation does.
        d.kill_9();
        std::fs::write(&control, "").unwrap();
        let d = Daemon::start_with_env(dir.path(), &data, &args, &env);
        let (status, continued) = turn(&d, &second, &session, None).await;
        assert_eq!(status, 200, "{fault}: {continued}");
        assert!(
            continued["timings"]["cache_n"].as_u64().unwrap() > 0,
            "{continued}"
        );
        let reference = Uuid::new_v4().to_string();
        let (_, ref_one) = turn(&d, &first, &reference, Some(7)).await;
        assert_eq!(ref_one["content"], one["content"]);
        let (_, ref_two) = turn(&d, &second, &reference, None).await;
        assert_eq!(
            continued["content"], ref_two["content"],
            "{fault}: the acknowledged turn continues exactly"
        );
        d.stop();
    }
}
