//! The redb schema, step by step. `store::Store::open` applies every step above the file's
//! recorded version, each in one write transaction together with the new version number, so a
//! crash mid-upgrade leaves the previous version whole.
//!
//! Never edit a step once released: add the next one. `tests/fixtures/store/v1.redb` is a file
//! written by step 1 alone; `tests/store.rs` opens it and checks the upgrade.

#[path = "v10_responses.rs"]
mod v10_responses;
#[path = "v1_initial.rs"]
mod v1_initial;
#[path = "v2_last_used_index.rs"]
mod v2_last_used_index;
#[path = "v3_forwards.rs"]
mod v3_forwards;
#[path = "v4_pages.rs"]
mod v4_pages;
#[path = "v5_incoming.rs"]
mod v5_incoming;
#[path = "v6_audit.rs"]
mod v6_audit;
#[path = "v7_sealing.rs"]
mod v7_sealing;
#[path = "v8_owners.rs"]
mod v8_owners;
#[path = "v9_entries.rs"]
mod v9_entries;

use redb::WriteTransaction;

/// One schema step: the version it produces and the change.
pub struct Migration {
    pub version: u64,
    pub name: &'static str,
    pub apply: fn(&WriteTransaction) -> Result<(), redb::Error>,
}

/// Every step, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "sessions, snapshot chunks and schema version",
        apply: v1_initial::apply,
    },
    Migration {
        version: 2,
        name: "last-used index for listing newest first",
        apply: v2_last_used_index::apply,
    },
    Migration {
        version: 3,
        name: "forwarding records for conversations moved to another instance",
        apply: v3_forwards::apply,
    },
    Migration {
        version: 4,
        name: "conversations as manifests and content-addressed pages",
        apply: v4_pages::apply,
    },
    Migration {
        version: 5,
        name: "conversations arriving page by page from another instance",
        apply: v5_incoming::apply,
    },
    Migration {
        version: 6,
        name: "the audit trail of admin actions",
        apply: v6_audit::apply,
    },
    Migration {
        version: 7,
        name: "the record of a store's encryption at rest",
        apply: v7_sealing::apply,
    },
    Migration {
        version: 8,
        name: "the owner index, for one key's listing and quota",
        apply: v8_owners::apply,
    },
    Migration {
        version: 9,
        name: "unnamed entries found by their tokens, and the storage budget's page count",
        apply: v9_entries::apply,
    },
    Migration {
        version: 10,
        name: "stored responses of OpenAI's Responses API",
        apply: v10_responses::apply,
    },
];
