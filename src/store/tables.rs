//! Every redb table, in one place.

use redb::TableDefinition;

/// `"schema_version"` → the last migration applied.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Session id (UUID as u128) → `SessionRecord` (MessagePack, named fields).
pub const SESSIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("sessions");
/// (session id, chunk index) → a piece of the snapshot file, at most `CHUNK_BYTES` long.
pub const CHUNKS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("snapshot_chunks");
/// (last used, session id) → nothing: listing order. Added by schema step 2.
pub const LAST_USED: TableDefinition<(u64, u128), ()> = TableDefinition::new("last_used");

/// Session id → `ForwardRecord` (MessagePack): where a moved conversation went. Step 3.
pub const FORWARDS: TableDefinition<u128, &[u8]> = TableDefinition::new("forwards");

pub const SCHEMA_VERSION_KEY: &str = "schema_version";
/// Snapshot files are stored in pieces of this size so no single value is huge.
///
/// Just under 1 MiB on purpose: redb gives a value its own page of a power-of-two size, and a
/// value of exactly 1 MiB plus its key and page header needs a 2 MiB page — twice the bytes
/// written and fsync'd. Measured on this machine, 14 MB in one transaction: 45 ms with 1 MiB
/// pieces, 10 ms with 1 MiB − 4 KiB pieces (the disk's own fsync'd speed). Readers do not
/// depend on the size, so files written with other piece sizes read the same.
pub const CHUNK_BYTES: usize = (1 << 20) - 4096;
