//! Durable storage of conversations, in one redb file: records, manifests and
//! content-addressed pages.
//!
//! - `tables.rs`: every table. `records.rs`: the stored record types.
//! - `migrations/` (top level): the schema steps, applied by `Store::open`.
//!
//! A conversation is a record, a manifest (opaque bytes here: `snapshot::manifest` reads
//! them) and the list of page ids the manifest references. Pages are stored once, however
//! many lists reference them, with a reference count beside each.
//!
//! Promises: a `put` is one write transaction committed with fsync (`Durability::Immediate`):
//! after it returns the conversation survives a crash, and a crash before it leaves the
//! previous one whole — redb never exposes half a transaction. Reference counts change in the
//! same transaction as the lists that hold the references, and a page is deleted in the
//! transaction that drops its count to zero: no manifest ever points at a missing page, and no
//! page outlives its last reference (`check` proves both). All calls block: callers on the
//! async runtime use `spawn_blocking`.

pub mod audit;
mod convert;
mod entries;
pub mod faults;
mod incoming;
pub mod records;
mod rekey;
pub mod remote;
mod responses;
pub mod tables;
pub mod vault;

#[path = "../../migrations/mod.rs"]
mod migrations;

use std::collections::HashMap;
use std::path::Path;

use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
    WriteTransaction,
};
use uuid::Uuid;

use crate::keys::Keys;
pub use entries::EntryStats;
pub use incoming::IncomingPages;
use records::{ForwardRecord, SessionRecord};
pub use rekey::RekeyProgress;
use tables::{
    CHUNK_BYTES, CHUNKS, FORWARDS, LAST_USED, MANIFESTS, META, OWNERS, OWNERS_INDEXED_KEY,
    PAGE_BYTES_KEY, PAGE_LISTS, PAGE_REFS, PAGES, SCHEMA_VERSION_KEY, SEALING, SESSIONS,
};
use vault::{Vault, chunk_key, session_key};

/// The schema this build writes.
pub const SCHEMA_VERSION: u64 = 10;

/// A page's id (the store only compares them): `snapshot::pages`' content address.
pub use crate::snapshot::pages::PageId;

/// What `SessionStore::with_pages` hands pages to: each page named, or `None` where missing.
pub type PageVisitor<'a> = dyn FnMut(&[Option<&[u8]>]) + 'a;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    #[error(
        "the store at {path} has schema version {found}, newer than this kvsnap ({SCHEMA_VERSION}); upgrade kvsnap"
    )]
    TooNew { path: String, found: u64 },
    #[error("the stored snapshot of {0} is damaged: {1}")]
    Damaged(Uuid, String),
    #[error("store failure: {0}")]
    Io(String),
    /// Opened with keys, the store holds values written in the clear (`Store::open_sealed`
    /// rewrites it).
    #[error("the store holds values written without encryption")]
    NeedsSealing,
}

/// `SEALING` row: `KeyRing::page_ids_check` of the keys a sealed store was written with.
const PAGE_IDS_CHECK: &str = "page_ids_check";

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => { $( impl From<$t> for StoreError {
        fn from(e: $t) -> Self { StoreError::Io(e.to_string()) }
    } )* };
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// One save: the manifest, every page id it references (once per reference), and the bytes
/// of the pages that may be new. Pages the store already holds are not written again.
pub struct PagedPut<'a> {
    pub manifest: &'a [u8],
    pub refs: &'a [PageId],
    pub pages: Vec<(PageId, &'a [u8])>,
}

/// What a put wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutStats {
    pub pages_written: usize,
    /// Page bytes written (the manifest and record come on top).
    pub page_bytes_written: u64,
    pub manifest_bytes: u64,
}

/// What the page tables hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageStats {
    pub pages: u64,
    pub page_bytes: u64,
    pub references: u64,
}

/// The store's small interface, so a shared remote store can take its place later.
pub trait SessionStore: Send + Sync {
    /// Replaces the conversation's record, manifest and page list atomically and durably:
    /// the pages its previous manifest referenced and the new one does not are released.
    fn put(
        &self,
        id: Uuid,
        record: &SessionRecord,
        put: &PagedPut<'_>,
    ) -> Result<PutStats, StoreError>;
    fn record(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError>;
    fn manifest(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError>;
    /// Hands `visit` the pages `ids` names, in that order (`None` for a page the store
    /// lacks), where the store holds them: nothing is copied (a restore's 14 MB copied out
    /// cost more than its checks). Unchecked: the caller checks each page against its id.
    fn with_pages(&self, ids: &[PageId], visit: &mut PageVisitor<'_>) -> Result<(), StoreError>;
    fn page(&self, id: &PageId) -> Result<Option<Vec<u8>>, StoreError>;
    /// A whole snapshot file kept from before pages (one the upgrade could not cut).
    fn legacy_snapshot(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError>;
    /// A new conversation `to` sharing every page of `from` (nothing copied), with `record`.
    /// False when `from` has no manifest.
    fn fork(&self, from: Uuid, to: Uuid, record: &SessionRecord) -> Result<bool, StoreError>;
    fn delete(&self, id: Uuid) -> Result<bool, StoreError>;
    fn mark_damaged(&self, id: Uuid, reason: &str) -> Result<(), StoreError>;
    /// Newest use first.
    /// The newest `limit` conversations, newest use first, of those whose owner `keep`
    /// accepts (scanned in order, so one owner's page is whole however many others' are newer).
    fn list(
        &self,
        limit: usize,
        keep: &dyn Fn(&Option<String>) -> bool,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError>;
    /// Where the conversation went, if it moved to another instance.
    fn forward(&self, id: Uuid) -> Result<Option<ForwardRecord>, StoreError>;
    /// Deletes the conversation and records where it went, in one durable transaction: after
    /// a crash it is either still here whole or forwarded, never neither.
    fn move_out(&self, id: Uuid, forward: &ForwardRecord) -> Result<(), StoreError>;
}

pub struct Store {
    db: Database,
    vault: Vault,
    /// Bytes of pages past which unnamed entries are dropped (`entries.rs`); 0: none.
    budget: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (or creates) the file and brings its schema up to `SCHEMA_VERSION`. Without
    /// keys: an encrypted store is refused with a sentence.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with(path, Vault::plain())
    }

    /// Like `open`, with encryption at rest: every value is sealed with `keys` and pages are
    /// named by a keyed hash. A store written without encryption is rewritten sealed first,
    /// into a new file that replaces the old one whole (`convert.rs`); one sealed under
    /// another page-naming key is refused.
    pub fn open_sealed(path: &Path, keys: std::sync::Arc<Keys>) -> Result<Store, StoreError> {
        match Store::open_with(path, Vault::sealed(keys.clone())) {
            Err(StoreError::NeedsSealing) => {
                convert::seal_file(path, &keys)?;
                Store::open_with(path, Vault::sealed(keys))
            }
            other => other,
        }
    }

    fn open_with(path: &Path, vault: Vault) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let fail = |message: String| StoreError::Open {
            path: shown.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
        }
        // What an interrupted conversion left; the store beside it is whole.
        let _ = std::fs::remove_file(convert::staging_path(path));
        let db = Database::create(path).map_err(|e| fail(e.to_string()))?;
        Store::upgrade(db, shown, vault)
    }

    /// Like `open` (or `open_sealed` with `keys`), on a file whose every call fails as
    /// `schedule` says (test support: the daemon under `KVSNAP_STORAGE_FAULTS`).
    pub fn open_with_faults(
        path: &Path,
        schedule: std::sync::Arc<faults::Schedule>,
        keys: Option<std::sync::Arc<Keys>>,
    ) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let fail = |message: String| StoreError::Open {
            path: shown.clone(),
            message,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| fail(e.to_string()))?;
        let file = redb::backends::FileBackend::new(file).map_err(|e| fail(e.to_string()))?;
        let db = Database::builder()
            .create_with_backend(faults::Faulty {
                backend: file,
                schedule,
            })
            .map_err(|e| fail(e.to_string()))?;
        Store::upgrade(db, shown, keys.map_or_else(Vault::plain, Vault::sealed))
    }

    /// Opens (or creates) a store on another redb backend: the fault campaign's failing disk
    /// (`faults::Faulty` over `faults::DiskFile`). `name` stands for the path in errors. With
    /// `keys` it is sealed (a store there written in the clear is refused: only a file can be
    /// rewritten sealed).
    pub fn open_on(
        backend: impl redb::StorageBackend,
        name: &str,
        keys: Option<std::sync::Arc<Keys>>,
    ) -> Result<Store, StoreError> {
        let db = Database::builder()
            .create_with_backend(backend)
            .map_err(|e| StoreError::Open {
                path: name.to_string(),
                message: e.to_string(),
            })?;
        Store::upgrade(
            db,
            name.to_string(),
            keys.map_or_else(Vault::plain, Vault::sealed),
        )
    }

    /// Brings an open database's schema up to `SCHEMA_VERSION`, or refuses a newer one; then
    /// checks that `vault` is how the store is sealed.
    fn upgrade(db: Database, shown: String, vault: Vault) -> Result<Store, StoreError> {
        let store = Store {
            db,
            vault,
            budget: std::sync::atomic::AtomicU64::new(0),
        };
        let found = store.schema_version()?;
        if found > SCHEMA_VERSION {
            return Err(StoreError::TooNew { path: shown, found });
        }
        store.migrate(found, SCHEMA_VERSION)?;
        store.check_sealing(&shown)?;
        store.index_owners()?;
        store.count_page_bytes()?;
        Ok(store)
    }

    /// Refuses keys that are not this store's, and a sealed store opened without keys. A
    /// store without a seal yet takes `vault`'s when it holds nothing; one holding values
    /// written in the clear answers `NeedsSealing`.
    fn check_sealing(&self, shown: &str) -> Result<(), StoreError> {
        let refuse = |message: &str| StoreError::Open {
            path: shown.to_string(),
            message: message.to_string(),
        };
        let recorded: Option<Vec<u8>> = self
            .db
            .begin_read()?
            .open_table(SEALING)?
            .get(PAGE_IDS_CHECK)?
            .map(|v| v.value().to_vec());
        let wanted = self.vault.ring().map(|ring| ring.page_ids_check());
        match (recorded, wanted) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(refuse(
                "it is encrypted; start kvsnap with --encryption-key-file naming its key file",
            )),
            (Some(recorded), Some(wanted)) if recorded == wanted => Ok(()),
            (Some(_), Some(_)) => Err(refuse(
                "it was encrypted with another key file (its page_ids key differs); use the \
                 key file it was written with",
            )),
            (None, Some(wanted)) => {
                if !self.is_empty()? {
                    return Err(StoreError::NeedsSealing);
                }
                let txn = self.db.begin_write()?;
                txn.open_table(SEALING)?
                    .insert(PAGE_IDS_CHECK, wanted.as_slice())?;
                txn.commit()?;
                Ok(())
            }
        }
    }

    /// Builds `OWNERS` from the records, once (see `tables::OWNERS`); one transaction.
    fn index_owners(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        if txn.open_table(META)?.get(OWNERS_INDEXED_KEY)?.is_some() {
            return Ok(());
        }
        {
            let sessions = txn.open_table(SESSIONS)?;
            let mut owners = txn.open_table(OWNERS)?;
            for entry in sessions.iter()? {
                let (key, value) = entry?;
                let key = key.value();
                let owner = self
                    .vault
                    .open(SESSIONS.name(), &session_key(key), value.value())
                    .ok()
                    .and_then(|bytes| SessionRecord::decode(&bytes).ok())
                    .and_then(|record| record.owner);
                owners.insert((self.vault.owner_name(&owner), key), ())?;
            }
        }
        txn.open_table(META)?.insert(OWNERS_INDEXED_KEY, 1)?;
        txn.commit()?;
        Ok(())
    }

    /// The conversations `owner` owns (and, with `with_ownerless`, those nobody owns), newest
    /// use first, at most `limit`: only their records are opened.
    pub fn list_owned(
        &self,
        owner: &Option<String>,
        with_ownerless: bool,
        limit: usize,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let owners = txn.open_table(OWNERS)?;
        let sessions = txn.open_table(SESSIONS)?;
        let mut names = vec![self.vault.owner_name(owner)];
        if with_ownerless && owner.is_some() {
            names.push(self.vault.owner_name(&None));
        }
        let mut out = Vec::new();
        for name in names {
            for entry in owners.range((name, 0)..=(name, u128::MAX))? {
                let (_, id) = entry?.0.value();
                if let Some(value) = sessions.get(id)?
                    && let Ok(bytes) =
                        self.vault
                            .open(SESSIONS.name(), &session_key(id), value.value())
                    && let Ok(record) = SessionRecord::decode(&bytes)
                    // The index only narrows the search; the record decides whose it is.
                    && (record.owner == *owner || (with_ownerless && record.owner.is_none()))
                {
                    out.push((Uuid::from_u128(id), record));
                }
            }
        }
        out.sort_by_key(|(_, record)| std::cmp::Reverse(record.last_used_ms));
        out.truncate(limit);
        Ok(out)
    }

    /// How many conversations `owner` owns here.
    pub fn count_owned(&self, owner: &Option<String>) -> Result<usize, StoreError> {
        let txn = self.db.begin_read()?;
        let owners = txn.open_table(OWNERS)?;
        let name = self.vault.owner_name(owner);
        Ok(owners.range((name, 0)..=(name, u128::MAX))?.count())
    }

    /// Whether no table holds a value a seal would cover.
    fn is_empty(&self) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let empty = txn.open_table(SESSIONS)?.is_empty()?
            && txn.open_table(CHUNKS)?.is_empty()?
            && txn.open_table(FORWARDS)?.is_empty()?
            && txn.open_table(MANIFESTS)?.is_empty()?
            && txn.open_table(PAGES)?.is_empty()?
            && txn.open_table(tables::INCOMING)?.is_empty()?
            && txn.open_table(tables::INCOMING_PAGES)?.is_empty()?
            && txn.open_table(tables::AUDIT)?.is_empty()?
            && txn.open_table(tables::ENTRIES)?.is_empty()?;
        Ok(empty)
    }

    /// Whether values are sealed (the store was opened with keys).
    pub fn is_sealed(&self) -> bool {
        self.vault.keys().is_some()
    }

    /// The keys this store seals with, if any.
    pub fn keys(&self) -> Option<&std::sync::Arc<Keys>> {
        self.vault.keys()
    }

    /// The value a table keyed by id holds for `id`, opened (unsealed); `None` without one.
    fn read_row(
        &self,
        table: TableDefinition<u128, &[u8]>,
        id: Uuid,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let rows = txn.open_table(table)?;
        let Some(value) = rows.get(id.as_u128())? else {
            return Ok(None);
        };
        let opened = self
            .vault
            .open(table.name(), &session_key(id.as_u128()), value.value())?;
        Ok(Some(opened.into_owned()))
    }

    pub fn schema_version(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = match txn.open_table(META) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        Ok(table.get(SCHEMA_VERSION_KEY)?.map_or(0, |v| v.value()))
    }

    /// Applies the steps after `from` up to `to`, each with its version number in one
    /// transaction.
    fn migrate(&self, from: u64, to: u64) -> Result<(), StoreError> {
        for step in migrations::MIGRATIONS
            .iter()
            .filter(|m| m.version > from && m.version <= to)
        {
            tracing::info!(
                version = step.version,
                name = step.name,
                "applying store migration"
            );
            let txn = self.db.begin_write()?;
            (step.apply)(&txn)?;
            txn.open_table(META)?
                .insert(SCHEMA_VERSION_KEY, step.version)?;
            txn.commit()?;
        }
        Ok(())
    }

    /// Like `SessionStore::put`, for a copy of a conversation another durable store holds
    /// (the fleet's bucket): committed without waiting for fsync. A crash may lose the copy
    /// (redb rolls back to its last durable commit, whole), and it is fetched again; the
    /// next durable commit makes it durable too.
    pub fn put_copy(
        &self,
        id: Uuid,
        record: &SessionRecord,
        put: &PagedPut<'_>,
    ) -> Result<PutStats, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let stats = write_paged(&txn, &self.vault, id.as_u128(), record, put)?;
        txn.commit()?;
        Ok(stats)
    }

    /// This store's instance id: random, made once and kept, so a fleet member knows its own
    /// leases again after a restart, whatever address it comes back on.
    pub fn instance_id(&self) -> Result<u64, StoreError> {
        const KEY: &str = "instance_id";
        if let Some(id) = self.db.begin_read()?.open_table(META)?.get(KEY)? {
            return Ok(id.value());
        }
        let id = (Uuid::new_v4().as_u128() >> 64) as u64;
        let txn = self.db.begin_write()?;
        let kept = {
            let mut meta = txn.open_table(META)?;
            let existing = meta.get(KEY)?.map(|v| v.value());
            match existing {
                Some(existing) => existing,
                None => {
                    meta.insert(KEY, id)?;
                    id
                }
            }
        };
        txn.commit()?;
        Ok(kept)
    }

    /// The pages among `ids` this store lacks.
    pub fn missing_pages(&self, ids: &[PageId]) -> Result<Vec<PageId>, StoreError> {
        let txn = self.db.begin_read()?;
        let pages = txn.open_table(PAGES)?;
        let mut missing = Vec::new();
        for id in ids {
            if pages.get(self.vault.page_name(id))?.is_none() {
                missing.push(*id);
            }
        }
        Ok(missing)
    }

    /// Counts of pages, their bytes and the references to them.
    pub fn page_stats(&self) -> Result<PageStats, StoreError> {
        let txn = self.db.begin_read()?;
        let pages = txn.open_table(PAGES)?;
        let refs = txn.open_table(PAGE_REFS)?;
        let mut stats = PageStats::default();
        for entry in pages.iter()? {
            let (_, bytes) = entry?;
            stats.pages += 1;
            stats.page_bytes += bytes.value().len() as u64;
        }
        for entry in refs.iter()? {
            stats.references += entry?.1.value();
        }
        Ok(stats)
    }

    /// Every way the page tables could disagree with the lists, as sentences; empty when they
    /// agree: each listed page exists, each count equals the references listed, and no page
    /// or count exists without a reference.
    pub fn check(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut listed: HashMap<PageId, u64> = HashMap::new();
        let manifests = txn.open_table(MANIFESTS)?;
        for entry in txn.open_table(PAGE_LISTS)?.iter()? {
            let (key, list) = entry?;
            for id in list.value().chunks_exact(32) {
                *listed.entry(id.try_into().expect("32 bytes")).or_default() += 1;
            }
            if manifests.get(key.value())?.is_none() {
                return Ok(vec![format!(
                    "{} has a page list but no manifest",
                    Uuid::from_u128(key.value())
                )]);
            }
        }
        let mut problems = Vec::new();
        let pages = txn.open_table(PAGES)?;
        let refs = txn.open_table(PAGE_REFS)?;
        for (id, count) in &listed {
            if pages.get(id)?.is_none() {
                problems.push(format!("page {} is listed but missing", hex::encode(id)));
            }
            let counted = refs.get(id)?.map_or(0, |v| v.value());
            if counted != *count {
                problems.push(format!(
                    "page {} is listed {count} times but counted {counted}",
                    hex::encode(id)
                ));
            }
        }
        for entry in pages.iter()? {
            let id = entry?.0.value();
            if !listed.contains_key(&id) {
                problems.push(format!("page {} is never referenced", hex::encode(id)));
            }
        }
        for entry in refs.iter()? {
            let id = entry?.0.value();
            if !listed.contains_key(&id) {
                problems.push(format!(
                    "page {} is counted but never listed",
                    hex::encode(id)
                ));
            }
        }
        Ok(problems)
    }

    /// Writes a database at schema step `version` only: how older stores look. Test support.
    #[doc(hidden)]
    pub fn create_at_version_for_tests(path: &Path, version: u64) -> Result<Store, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Io(e.to_string()))?;
        let store = Store {
            db,
            vault: Vault::plain(),
            budget: std::sync::atomic::AtomicU64::new(0),
        };
        store.migrate(0, version)?;
        Ok(store)
    }

    /// Writes a record and its whole snapshot in chunks, as schema steps 1 to 3 stored
    /// conversations (with the step-2 index when `indexed`). Test support.
    #[doc(hidden)]
    pub fn put_whole_for_tests(
        &self,
        id: Uuid,
        record: &SessionRecord,
        snapshot: &[u8],
        indexed: bool,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(SESSIONS)?
            .insert(id.as_u128(), record.encode().as_slice())?;
        if indexed {
            txn.open_table(LAST_USED)?
                .insert((record.last_used_ms, id.as_u128()), ())?;
            txn.open_table(OWNERS)?
                .insert((self.vault.owner_name(&record.owner), id.as_u128()), ())?;
        }
        let mut chunks = txn.open_table(CHUNKS)?;
        for (i, piece) in snapshot.chunks(CHUNK_BYTES).enumerate() {
            chunks.insert((id.as_u128(), i as u32), piece)?;
        }
        drop(chunks);
        txn.commit()?;
        Ok(())
    }

    /// Overwrites a page's bytes in place, as disk damage would. Test support.
    #[doc(hidden)]
    pub fn overwrite_page_for_tests(&self, id: &PageId, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(PAGES)?
            .insert(self.vault.page_name(id), bytes)?;
        txn.commit()?;
        Ok(())
    }
}

impl SessionStore for Store {
    fn put(
        &self,
        id: Uuid,
        record: &SessionRecord,
        put: &PagedPut<'_>,
    ) -> Result<PutStats, StoreError> {
        let txn = self.db.begin_write()?;
        let stats = write_paged(&txn, &self.vault, id.as_u128(), record, put)?;
        self.keep_within_budget(&txn)?;
        txn.commit()?;
        Ok(stats)
    }

    fn record(&self, id: Uuid) -> Result<Option<SessionRecord>, StoreError> {
        let Some(bytes) = self.read_row(SESSIONS, id)? else {
            return Ok(None);
        };
        SessionRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Damaged(id, format!("its record cannot be read: {e}")))
    }

    fn manifest(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let manifests = txn.open_table(MANIFESTS)?;
        let Some(stored) = manifests.get(id.as_u128())? else {
            return Ok(None);
        };
        let manifest =
            self.vault
                .open(MANIFESTS.name(), &session_key(id.as_u128()), stored.value())?;
        Ok(Some(manifest.into_owned()))
    }

    fn with_pages(&self, ids: &[PageId], visit: &mut PageVisitor<'_>) -> Result<(), StoreError> {
        let txn = self.db.begin_read()?;
        let pages = txn.open_table(PAGES)?;
        let names = self.vault.page_names(ids);
        let guards = names
            .iter()
            .map(|name| pages.get(name))
            .collect::<Result<Vec<_>, _>>()?;
        // Unsealed, the pages are handed over where redb holds them; sealed, each is opened
        // into a buffer of its own first.
        let opened = names
            .iter()
            .zip(&guards)
            .map(|(name, guard)| {
                guard
                    .as_ref()
                    .map(|g| self.vault.open(PAGES.name(), name, g.value()))
                    .transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let found: Vec<Option<&[u8]>> = opened.iter().map(|page| page.as_deref()).collect();
        visit(&found);
        Ok(())
    }

    fn page(&self, id: &PageId) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let pages = txn.open_table(PAGES)?;
        let name = self.vault.page_name(id);
        let Some(stored) = pages.get(name)? else {
            return Ok(None);
        };
        Ok(Some(
            self.vault
                .open(PAGES.name(), &name, stored.value())?
                .into_owned(),
        ))
    }

    fn legacy_snapshot(&self, id: Uuid) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let key = id.as_u128();
        let chunks = txn.open_table(CHUNKS)?;
        let mut out = Vec::new();
        let mut any = false;
        for entry in chunks.range((key, 0)..=(key, u32::MAX))? {
            let (chunk, stored) = entry?;
            let piece =
                self.vault
                    .open(CHUNKS.name(), &chunk_key(chunk.value()), stored.value())?;
            out.extend_from_slice(&piece);
            any = true;
        }
        Ok(any.then_some(out))
    }

    fn fork(&self, from: Uuid, to: Uuid, record: &SessionRecord) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let (manifest, list) = {
            let manifests = txn.open_table(MANIFESTS)?;
            let lists = txn.open_table(PAGE_LISTS)?;
            let Some(manifest) = manifests.get(from.as_u128())? else {
                return Ok(false);
            };
            let list = lists
                .get(from.as_u128())?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            let manifest = self.vault.open(
                MANIFESTS.name(),
                &session_key(from.as_u128()),
                manifest.value(),
            )?;
            (manifest.into_owned(), list)
        };
        // The list already holds stored names.
        let names: Vec<PageId> = list
            .chunks_exact(32)
            .map(|id| id.try_into().expect("32 bytes"))
            .collect();
        let put = NamedPut {
            manifest: &manifest,
            names,
            pages: HashMap::new(),
        };
        write_named(&txn, &self.vault, to.as_u128(), record, &put)?;
        txn.commit()?;
        Ok(true)
    }

    fn delete(&self, id: Uuid) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = remove_session(&txn, &self.vault, id.as_u128())?;
        txn.open_table(FORWARDS)?.remove(id.as_u128())?;
        txn.commit()?;
        Ok(existed)
    }

    fn forward(&self, id: Uuid) -> Result<Option<ForwardRecord>, StoreError> {
        let Some(bytes) = self.read_row(FORWARDS, id)? else {
            return Ok(None);
        };
        ForwardRecord::decode(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Damaged(id, format!("its forwarding record: {e}")))
    }

    fn move_out(&self, id: Uuid, forward: &ForwardRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        remove_session(&txn, &self.vault, id.as_u128())?;
        let key = id.as_u128();
        let sealed = self
            .vault
            .seal(FORWARDS.name(), &session_key(key), &forward.encode())
            .into_owned();
        txn.open_table(FORWARDS)?.insert(key, sealed.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn mark_damaged(&self, id: Uuid, reason: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        mark_damaged_in(&txn, &self.vault, id.as_u128(), reason)?;
        txn.commit()?;
        Ok(())
    }

    fn list(
        &self,
        limit: usize,
        keep: &dyn Fn(&Option<String>) -> bool,
    ) -> Result<Vec<(Uuid, SessionRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let index = txn.open_table(LAST_USED)?;
        let sessions = txn.open_table(SESSIONS)?;
        let mut out = Vec::new();
        for entry in index.iter()?.rev() {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            let (_, id) = key.value();
            if let Some(value) = sessions.get(id)?
                && let Ok(bytes) = self
                    .vault
                    .open(SESSIONS.name(), &session_key(id), value.value())
                && let Ok(record) = SessionRecord::decode(&bytes)
                && keep(&record.owner)
            {
                out.push((Uuid::from_u128(id), record));
            }
        }
        Ok(out)
    }
}

/// A save in the names the tables use: `PagedPut` with its page ids turned into stored
/// names (`Vault::page_name`).
pub(crate) struct NamedPut<'a> {
    pub manifest: &'a [u8],
    /// Once per reference, in the manifest's order.
    pub names: Vec<PageId>,
    /// The bytes of pages that may be new, by name.
    pub pages: HashMap<PageId, &'a [u8]>,
}

impl<'a> NamedPut<'a> {
    fn of(vault: &Vault, put: &PagedPut<'a>) -> NamedPut<'a> {
        NamedPut {
            manifest: put.manifest,
            names: vault.page_names(put.refs),
            pages: put
                .pages
                .iter()
                .map(|(id, bytes)| (vault.page_name(id), *bytes))
                .collect(),
        }
    }
}

/// Writes a conversation's record, manifest and page list, and the pages the store lacks;
/// releases what its previous list referenced. Inside the caller's transaction.
pub(crate) fn write_paged(
    txn: &WriteTransaction,
    vault: &Vault,
    key: u128,
    record: &SessionRecord,
    put: &PagedPut<'_>,
) -> Result<PutStats, StoreError> {
    write_named(txn, vault, key, record, &NamedPut::of(vault, put))
}

fn write_named(
    txn: &WriteTransaction,
    vault: &Vault,
    key: u128,
    record: &SessionRecord,
    put: &NamedPut<'_>,
) -> Result<PutStats, StoreError> {
    let row = session_key(key);
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut index = txn.open_table(LAST_USED)?;
    let previous = previous_record(&sessions, vault, key)?;
    let mut owners = txn.open_table(OWNERS)?;
    if let Some(previous) = &previous {
        index.remove((previous.last_used_ms, key))?;
        owners.remove((vault.owner_name(&previous.owner), key))?;
    }
    owners.insert((vault.owner_name(&record.owner), key), ())?;
    drop(owners);
    let sealed = vault
        .seal(SESSIONS.name(), &row, &record.encode())
        .into_owned();
    sessions.insert(key, sealed.as_slice())?;
    index.insert((record.last_used_ms, key), ())?;
    drop((sessions, index));
    let stats = write_pages(txn, vault, key, put)?;
    // A whole file kept from before pages is replaced by the manifest.
    txn.open_table(CHUNKS)?
        .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
    // A conversation that moved away and came back is here again, not forwarded.
    txn.open_table(FORWARDS)?.remove(key)?;
    Ok(stats)
}

/// Writes a page list's new references, the pages the store lacks, the list and the manifest
/// of `key` (a named conversation or an entry), releasing what its previous list referenced.
pub(crate) fn write_pages(
    txn: &WriteTransaction,
    vault: &Vault,
    key: u128,
    put: &NamedPut<'_>,
) -> Result<PutStats, StoreError> {
    let mut stats = PutStats {
        manifest_bytes: put.manifest.len() as u64,
        ..PutStats::default()
    };
    let mut stored_bytes = 0u64;
    // New references first, so a page both lists hold never drops to zero on the way.
    {
        let mut pages = txn.open_table(PAGES)?;
        let mut refs = txn.open_table(PAGE_REFS)?;
        for name in &put.names {
            let count = refs.get(name)?.map_or(0, |v| v.value());
            if count == 0 && pages.get(name)?.is_none() {
                let bytes = put.pages.get(name).ok_or_else(|| {
                    StoreError::Io(format!(
                        "a save references page {} without its bytes, and the store lacks it",
                        hex::encode(name)
                    ))
                })?;
                let sealed = vault.seal(PAGES.name(), name, bytes);
                stored_bytes += sealed.len() as u64;
                pages.insert(name, sealed.as_ref())?;
                stats.pages_written += 1;
                stats.page_bytes_written += bytes.len() as u64;
            }
            refs.insert(name, count + 1)?;
        }
    }
    count_page_bytes_in(txn, stored_bytes, 0)?;
    release_list(txn, key)?;
    let list: Vec<u8> = put.names.iter().flatten().copied().collect();
    txn.open_table(PAGE_LISTS)?.insert(key, list.as_slice())?;
    let manifest = vault.seal(MANIFESTS.name(), &session_key(key), put.manifest);
    txn.open_table(MANIFESTS)?.insert(key, manifest.as_ref())?;
    Ok(stats)
}

/// Adds `added` and takes `removed` bytes from the page byte count (`tables::PAGE_BYTES_KEY`),
/// when the store keeps one (it is counted at open).
fn count_page_bytes_in(txn: &WriteTransaction, added: u64, removed: u64) -> Result<(), StoreError> {
    if added == removed {
        return Ok(());
    }
    let mut meta = txn.open_table(META)?;
    let Some(held) = meta.get(PAGE_BYTES_KEY)?.map(|v| v.value()) else {
        return Ok(());
    };
    meta.insert(PAGE_BYTES_KEY, (held + added).saturating_sub(removed))?;
    Ok(())
}

/// The record row `key` holds, if it reads; one that does not is replaced, not trusted.
fn previous_record(
    sessions: &impl ReadableTable<u128, &'static [u8]>,
    vault: &Vault,
    key: u128,
) -> Result<Option<SessionRecord>, StoreError> {
    let Some(stored) = sessions.get(key)? else {
        return Ok(None);
    };
    Ok(vault
        .open(SESSIONS.name(), &session_key(key), stored.value())
        .ok()
        .and_then(|bytes| SessionRecord::decode(&bytes).ok()))
}

/// Drops the references conversation `key`'s page list holds (and the list), deleting every
/// page whose count reaches zero.
pub(crate) fn release_list(txn: &WriteTransaction, key: u128) -> Result<(), StoreError> {
    let Some(list) = txn
        .open_table(PAGE_LISTS)?
        .remove(key)?
        .map(|v| v.value().to_vec())
    else {
        return Ok(());
    };
    let mut removed = 0u64;
    {
        let mut pages = txn.open_table(PAGES)?;
        let mut refs = txn.open_table(PAGE_REFS)?;
        for id in list.chunks_exact(32) {
            let id: PageId = id.try_into().expect("32 bytes");
            let count = refs.get(&id)?.map_or(0, |v| v.value());
            if count <= 1 {
                refs.remove(&id)?;
                if let Some(page) = pages.remove(&id)? {
                    removed += page.value().len() as u64;
                }
            } else {
                refs.insert(&id, count - 1)?;
            }
        }
    }
    count_page_bytes_in(txn, 0, removed)
}

/// Removes a conversation's record, index entry, manifest, page references and any whole
/// file; returns whether it existed.
fn remove_session(txn: &WriteTransaction, vault: &Vault, key: u128) -> Result<bool, StoreError> {
    let previous = previous_record(&txn.open_table(SESSIONS)?, vault, key)?;
    let existed = txn.open_table(SESSIONS)?.remove(key)?.is_some();
    if let Some(previous) = previous {
        txn.open_table(LAST_USED)?
            .remove((previous.last_used_ms, key))?;
        txn.open_table(OWNERS)?
            .remove((vault.owner_name(&previous.owner), key))?;
    }
    release_list(txn, key)?;
    txn.open_table(MANIFESTS)?.remove(key)?;
    txn.open_table(CHUNKS)?
        .retain_in((key, 0)..=(key, u32::MAX), |_, _| false)?;
    Ok(existed)
}

pub(crate) fn mark_damaged_in(
    txn: &WriteTransaction,
    vault: &Vault,
    key: u128,
    reason: &str,
) -> Result<(), StoreError> {
    let mut sessions = txn.open_table(SESSIONS)?;
    if let Some(mut record) = previous_record(&sessions, vault, key)? {
        record.damaged = Some(reason.to_string());
        let sealed = vault
            .seal(SESSIONS.name(), &session_key(key), &record.encode())
            .into_owned();
        sessions.insert(key, sealed.as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(last_used_ms: u64) -> SessionRecord {
        SessionRecord {
            record_version: records::RECORD_VERSION,
            owner: None,
            created_ms: 1,
            last_used_ms,
            tokens: 3,
            bytes: 0,
            chunks: 0,
            checksum: String::new(),
            model: "m".into(),
            damaged: None,
            compute_profile: None,
            saves: 1,
        }
    }

    fn id(n: u8) -> PageId {
        [n; 32]
    }

    fn put(store: &Store, session: Uuid, last_used: u64, manifest: &[u8], pages: &[(u8, &[u8])]) {
        let refs: Vec<PageId> = pages.iter().map(|(n, _)| id(*n)).collect();
        let bytes: Vec<(PageId, &[u8])> = pages.iter().map(|(n, b)| (id(*n), *b)).collect();
        store
            .put(
                session,
                &record(last_used),
                &PagedPut {
                    manifest,
                    refs: &refs,
                    pages: bytes,
                },
            )
            .unwrap();
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        (dir, store)
    }

    fn keys(dir: &Path, name: &str) -> std::sync::Arc<Keys> {
        let path = dir.join(name);
        crate::keys::KeyFile::generate()
            .unwrap()
            .write(&path, false)
            .unwrap();
        Keys::load(&path).unwrap()
    }

    /// Whether `needle` appears anywhere in the file at `path`.
    fn file_holds(path: &Path, needle: &[u8]) -> bool {
        std::fs::read(path)
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    #[test]
    fn puts_replace_manifests_share_pages_and_list_newest_first() {
        let (_dir, store) = open();
        puts_replace_manifests_share_pages_and_list_newest_first_in(store);
    }

    #[test]
    fn a_sealed_store_keeps_the_same_promises_and_no_value_or_page_id_in_the_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let keys = keys(dir.path(), "keys.toml");
        let store = Store::open_sealed(&path, keys.clone()).unwrap();
        assert!(store.is_sealed());
        let session = Uuid::new_v4();
        let secret_page = b"a page nobody may read in the file".repeat(4);
        put(
            &store,
            session,
            1,
            b"manifest in the clear?",
            &[(7, &secret_page)],
        );
        drop(store);
        assert!(!file_holds(&path, &secret_page[..34]));
        assert!(!file_holds(&path, b"manifest in the clear?"));
        assert!(!file_holds(&path, &id(7)), "the page's content id");
        assert!(!file_holds(&path, b"created_ms"), "records are sealed too");

        let refused = Store::open(&path).err().unwrap().to_string();
        assert!(refused.contains("--encryption-key-file"), "{refused}");
        let stranger = Store::open_sealed(&path, self::keys(dir.path(), "other.toml"));
        assert!(
            stranger
                .err()
                .unwrap()
                .to_string()
                .contains("another key file")
        );

        let store = Store::open_sealed(&path, keys).unwrap();
        assert_eq!(store.page(&id(7)).unwrap().unwrap(), secret_page);
        store.delete(session).unwrap();
        puts_replace_manifests_share_pages_and_list_newest_first_in(store);
    }

    #[test]
    fn a_store_written_in_the_clear_is_sealed_whole_when_opened_with_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let page = b"plaintext page bytes, plainly".repeat(8);
        {
            let store = Store::open(&path).unwrap();
            put(&store, a, 1, b"manifest a", &[(1, &page), (2, b"two")]);
            assert!(store.fork(a, b, &record(2)).unwrap());
            store
                .append_audit(&records::AuditRecord {
                    record_version: 1,
                    at_ms: 3,
                    actor: "open".into(),
                    action: "import".into(),
                    target: a.to_string(),
                    outcome: "ok".into(),
                    detail: None,
                })
                .unwrap();
        }
        assert!(file_holds(&path, &page[..29]));
        let store = Store::open_sealed(&path, keys(dir.path(), "keys.toml")).unwrap();
        assert!(
            !file_holds(&path, &page[..29]),
            "no plaintext left in the file"
        );
        assert!(!file_holds(&path, b"manifest a"));
        assert!(!file_holds(&path, &id(1)));
        assert!(!convert::staging_path(&path).exists());
        assert_eq!(store.manifest(b).unwrap().unwrap(), b"manifest a");
        assert_eq!(store.page(&id(1)).unwrap().unwrap(), page);
        assert_eq!(store.record(a).unwrap().unwrap(), record(1));
        assert_eq!(store.audit(0, 10).unwrap()[0].1.target, a.to_string());
        let stats = store.page_stats().unwrap();
        assert_eq!((stats.pages, stats.references), (2, 4));
        assert!(store.check().unwrap().is_empty());
        assert_eq!(store.list(10, &|_| true).unwrap().len(), 2);
    }

    #[test]
    fn a_rekey_seals_every_value_with_the_new_key_while_the_old_one_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let key_path = dir.path().join("keys.toml");
        let mut file = crate::keys::KeyFile::generate().unwrap();
        file.write(&key_path, false).unwrap();
        let keys = Keys::load(&key_path).unwrap();
        let store = Store::open_sealed(&path, keys.clone()).unwrap();
        let sessions: Vec<Uuid> = (0..70).map(|_| Uuid::new_v4()).collect();
        for (n, session) in sessions.iter().enumerate() {
            put(&store, *session, n as u64, b"m", &[(n as u8, b"page")]);
        }
        store
            .move_out(
                sessions[0],
                &ForwardRecord {
                    record_version: 1,
                    target: "http://b:1".into(),
                    moved_ms: 1,
                },
            )
            .unwrap();

        file.rotate().unwrap();
        file.write(&key_path, true).unwrap();
        keys.reload().unwrap();
        let mut reports = Vec::new();
        let done = store.rekey(&mut |p| reports.push(p)).unwrap();
        // 69 records, manifests and pages, and one forward.
        assert_eq!(done.found, 69 * 3 + 1);
        assert_eq!(done.done, done.found);
        assert!(reports.len() > 2, "progress is reported as it goes");
        assert_eq!(store.rekey(&mut |_| {}).unwrap().found, 0, "nothing left");

        // Without k1 the store still reads whole.
        file.keys.remove("k1");
        file.write(&key_path, true).unwrap();
        drop(store);
        let store = Store::open_sealed(&path, Keys::load(&key_path).unwrap()).unwrap();
        for session in &sessions[1..] {
            assert_eq!(store.manifest(*session).unwrap().unwrap(), b"m");
        }
        assert!(store.forward(sessions[0]).unwrap().is_some());
        assert!(store.check().unwrap().is_empty());
    }

    fn puts_replace_manifests_share_pages_and_list_newest_first_in(store: Store) {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        put(&store, a, 10, b"ma", &[(1, b"one"), (2, b"two")]);
        put(&store, b, 20, b"mb", &[(2, b"two"), (3, b"three")]);
        assert_eq!(store.page_stats().unwrap().pages, 3, "page 2 stored once");
        assert_eq!(store.page_stats().unwrap().references, 4);
        // A later save of `a` keeps 2, drops 1, adds 4: only 4 is written.
        let refs = [id(2), id(4)];
        let stats = store
            .put(
                a,
                &record(30),
                &PagedPut {
                    manifest: b"ma2",
                    refs: &refs,
                    pages: vec![(id(2), b"two"), (id(4), b"four")],
                },
            )
            .unwrap();
        assert_eq!(stats.pages_written, 1);
        assert_eq!(stats.page_bytes_written, 4);
        assert_eq!(
            store.page(&id(1)).unwrap(),
            None,
            "released with its last reference"
        );
        assert_eq!(store.manifest(a).unwrap().unwrap(), b"ma2");
        let ids: Vec<Uuid> = store
            .list(10, &|_| true)
            .unwrap()
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ids, vec![a, b]);
        assert!(store.check().unwrap().is_empty());

        let mut seen = Vec::new();
        store
            .with_pages(&[id(4), id(9), id(2)], &mut |found| {
                seen = found.iter().map(|p| p.map(<[u8]>::to_vec)).collect();
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![Some(b"four".to_vec()), None, Some(b"two".to_vec())]
        );

        assert!(store.delete(a).unwrap());
        assert!(store.manifest(a).unwrap().is_none());
        assert_eq!(store.page(&id(4)).unwrap(), None);
        assert!(store.page(&id(2)).unwrap().is_some(), "b still uses it");
        assert!(store.delete(b).unwrap());
        assert_eq!(store.page_stats().unwrap(), PageStats::default());
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn a_page_referenced_twice_by_one_manifest_is_counted_twice() {
        let (_dir, store) = open();
        let a = Uuid::new_v4();
        put(&store, a, 1, b"m", &[(1, b"x"), (1, b"x")]);
        assert_eq!(store.page_stats().unwrap().references, 2);
        assert!(store.check().unwrap().is_empty());
        store.delete(a).unwrap();
        assert_eq!(store.page_stats().unwrap(), PageStats::default());
    }

    #[test]
    fn a_save_without_the_bytes_of_a_missing_page_is_refused_whole() {
        let (_dir, store) = open();
        let a = Uuid::new_v4();
        put(&store, a, 1, b"m", &[(1, b"x")]);
        let refs = [id(1), id(2)];
        let refused = store.put(
            a,
            &record(2),
            &PagedPut {
                manifest: b"m2",
                refs: &refs,
                pages: Vec::new(),
            },
        );
        assert!(refused.is_err());
        assert_eq!(
            store.manifest(a).unwrap().unwrap(),
            b"m",
            "the previous save stands"
        );
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn forks_share_every_page_and_outlive_their_source() {
        let (_dir, store) = open();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        put(&store, a, 1, b"m", &[(1, b"x"), (2, b"y")]);
        assert!(store.fork(a, b, &record(2)).unwrap());
        assert!(
            !store
                .fork(Uuid::new_v4(), Uuid::new_v4(), &record(3))
                .unwrap()
        );
        let stats = store.page_stats().unwrap();
        assert_eq!((stats.pages, stats.references), (2, 4));
        store.delete(a).unwrap();
        assert_eq!(store.manifest(b).unwrap().unwrap(), b"m");
        assert_eq!(store.page(&id(2)).unwrap().unwrap(), b"y");
        assert!(store.check().unwrap().is_empty());
    }

    #[test]
    fn moving_out_replaces_the_conversation_with_a_forward_and_coming_back_clears_it() {
        let (_dir, store) = open();
        let id = Uuid::new_v4();
        put(&store, id, 5, b"m", &[(1, b"state")]);
        let forward = ForwardRecord {
            record_version: records::RECORD_VERSION,
            target: "http://b:1".into(),
            moved_ms: 9,
        };
        store.move_out(id, &forward).unwrap();
        assert!(store.record(id).unwrap().is_none());
        assert!(store.list(10, &|_| true).unwrap().is_empty());
        assert_eq!(store.forward(id).unwrap(), Some(forward));
        assert_eq!(store.page_stats().unwrap(), PageStats::default());
        put(&store, id, 6, b"back", &[(1, b"state")]);
        assert_eq!(store.forward(id).unwrap(), None);
        assert_eq!(store.manifest(id).unwrap().unwrap(), b"back");
    }

    #[test]
    fn damage_is_recorded_and_the_record_kept() {
        let (_dir, store) = open();
        let id = Uuid::new_v4();
        put(&store, id, 5, b"m", &[(1, b"bytes")]);
        store.mark_damaged(id, "checksum").unwrap();
        assert_eq!(
            store.record(id).unwrap().unwrap().damaged.as_deref(),
            Some("checksum")
        );
        assert!(store.manifest(id).unwrap().is_some());
    }
}
