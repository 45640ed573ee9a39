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
pub const CHUNK_BYTES: usize = 1 << 20;
