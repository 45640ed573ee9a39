//! Where conversations' bytes go: the layer between the engine (which only hands a sequence's
//! state out and loads verified state in) and the store.
//!
//! Being pulled out of `engine/` step by step. Here so far: `paging.rs`, a snapshot to and
//! from the page store (a manifest and content-addressed pages), and `writer.rs`, the thread
//! that commits a turn's save off the decode path. The engine still decides when to save,
//! restores on its own thread, and evicts; the persist policy and leases are still there.

pub mod paging;
pub mod writer;
