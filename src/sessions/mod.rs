//! Where conversations' bytes go: the layer between the engine (which only hands a sequence's
//! state out and loads verified state in) and the store.
//!
//! Being pulled out of `engine/` step by step. Here so far: `paging.rs`, a snapshot to and
//! from the page store (a manifest and content-addressed pages), which the engine's
//! `persist.rs` still calls on its own thread. The persist policy, the writer thread off the
//! decode path, restores, eviction and leases are still in `engine/`.

pub mod paging;
