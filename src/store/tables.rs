//! Every redb table, in one place.

use redb::TableDefinition;

/// `"schema_version"` → the last migration applied.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Session id (UUID as u128) → `SessionRecord` (MessagePack, named fields).
pub const SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("sessions");
/// (session id, chunk index) → a piece of a whole snapshot file, at most `CHUNK_BYTES` long.
/// Since step 4 only for conversations the upgrade could not cut into pages (kept whole,
/// marked damaged, downloadable).
pub const CHUNKS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("snapshot_chunks");
/// (last used, session id) → nothing: listing order. Added by schema step 2.
pub const LAST_USED: TableDefinition<(u64, u128), ()> = TableDefinition::new("last_used");

/// Session id → `ForwardRecord` (MessagePack): where a moved conversation went. Step 3.
pub const FORWARDS: TableDefinition<u128, &[u8]> = TableDefinition::new("forwards");

/// Session id → its manifest (`snapshot::manifest`, opaque here). Step 4.
pub const MANIFESTS: TableDefinition<u128, &[u8]> = TableDefinition::new("manifests");
/// Session id → the page ids its manifest references, 32 bytes each, once per reference: what
/// its put added to `PAGE_REFS`, so a delete can take exactly that away. Step 4.
pub const PAGE_LISTS: TableDefinition<u128, &[u8]> = TableDefinition::new("page_lists");
/// Page id → the page's bytes (at most `CHUNK_BYTES`). Step 4.
pub const PAGES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("pages");
/// Page id → how many references the page lists hold. A page lives exactly while this is
/// above zero: every change to it and to `PAGES` is in the transaction that changes a list.
pub const PAGE_REFS: TableDefinition<[u8; 32], u64> = TableDefinition::new("page_refs");

/// Session id → `IncomingRecord` (MessagePack): a conversation arriving page by page from
/// another instance, not yet committed. Step 5.
pub const INCOMING: TableDefinition<u128, &[u8]> = TableDefinition::new("incoming");
/// (session id, page id) → a page of an arriving conversation, checked against its id, kept
/// until the conversation is committed so an interrupted transfer resumes without sending it
/// again. Step 5.
pub const INCOMING_PAGES: TableDefinition<(u128, [u8; 32]), &[u8]> =
    TableDefinition::new("incoming_pages");

pub const SCHEMA_VERSION_KEY: &str = "schema_version";
/// Snapshot files are stored in pieces of this size so no single value is huge.
///
/// Just under 1 MiB on purpose: redb gives a value its own page of a power-of-two size, and a
/// value of exactly 1 MiB plus its key and page header needs a 2 MiB page — twice the bytes
/// written and fsync'd. Measured on this machine, 14 MB in one transaction: 45 ms with 1 MiB
/// pieces, 10 ms with 1 MiB − 4 KiB pieces (the disk's own fsync'd speed). Readers do not
/// depend on the size, so files written with other piece sizes read the same.
pub const CHUNK_BYTES: usize = (1 << 20) - 4096;

/// Sequence number → `AuditRecord` (MessagePack): admin actions, appended in order, never
/// rewritten. Step 6.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// `"page_ids_check"` → which page-naming key a sealed store was written with
/// (`keys::KeyRing::page_ids_check`); absent while the store is not encrypted. Step 7.
pub const SEALING: TableDefinition<&str, &[u8]> = TableDefinition::new("sealing");

/// (owner name, session id) → nothing: which conversations one key owns, so listing or counting
/// one key's conversations opens only its records. The owner name is `Vault::owner_name` of the
/// owner's key hash (a keyed hash when sealed, so the index says nothing of who owns what).
/// Derived from `SESSIONS`: kept in step by every write of a record, and rebuilt at open when
/// `META` lacks `OWNERS_INDEXED_KEY` (a migration could not: it cannot open sealed records).
pub const OWNERS: TableDefinition<([u8; 32], u128), ()> = TableDefinition::new("owners");
pub const OWNERS_INDEXED_KEY: &str = "owners_indexed";

/// Entry id (a UUID as u128) → `EntryRecord` (MessagePack): an unnamed conversation state
/// kept so a later request that starts with its tokens resumes it. Its manifest and page list
/// are in `MANIFESTS` and `PAGE_LISTS` under the same id, beside named conversations'. Step 9.
pub const ENTRIES: TableDefinition<u128, &[u8]> = TableDefinition::new("entries");
/// (index name, entry id) → nothing: the entries whose tokens begin with the prefix the name
/// stands for (`sessions::lookup`: a salted hash of the owner, the model and the tokens up
/// to a boundary, keyed by `Vault::page_name` when sealed). Step 9.
pub const ENTRY_INDEX: TableDefinition<([u8; 32], u128), ()> = TableDefinition::new("entry_index");
/// (last used, entry id) → the entry's index name: the order in which the storage budget drops
/// entries. Step 9.
pub const ENTRY_USED: TableDefinition<(u64, u128), [u8; 32]> = TableDefinition::new("entry_used");
/// Response id (a UUID as u128) → `ResponseRecord` (MessagePack): a stored response of
/// OpenAI's Responses API, whose conversation state is the named conversation of the same id.
/// Step 10.
pub const RESPONSES: TableDefinition<u128, &[u8]> = TableDefinition::new("responses");
/// `META` key: the bytes `PAGES` holds, kept in step by every transaction that adds or
/// removes a page; counted once at open when absent (a store from before step 9, or one
/// just sealed).
pub const PAGE_BYTES_KEY: &str = "page_bytes";
