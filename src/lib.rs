//! kvsnap: a llama.cpp daemon whose conversations are durable.
//!
//! The map, from the outside in:
//! - `http/`: the API (OpenAI- and llama-server-compatible), thin over the engine.
//! - `completion.rs`: engine token events → text (UTF-8 assembly, stop strings).
//! - `sessions/`: where conversations' bytes go (the page store's read and write paths so far).
//! - `engine/`: the only code that touches llama.cpp; one thread, reached by messages.
//! - `compute/`: the compute profile this build runs (its numerics), checked and recorded.
//! - `sampling/`: token choice in our own code, with a random stream that can be stored.
//! - `migrate/`: moving conversations between instances (protocol, peers, jobs).
//! - `cli/`: the admin CLI, a client of the HTTP API.
//! - `keys/`: encryption at rest: the key file, sealing, keyed page names.
//! - `config.rs`: defaults < TOML file < environment < flags.
//! - `server.rs`: start-up order and graceful shutdown.
//!
//! ARCHITECTURE.md has the bird's-eye view and the invariants.
//!
//! The modules that reach llama.cpp, themselves or through the engine, build only with the
//! `engine` feature (on by default); the rest (the snapshot format, the store, sampling,
//! `inspect`) are pure and build without it, which is how the fuzz targets (tests/fuzz) use
//! the crate.

#[cfg(feature = "engine")]
pub mod cli;
pub mod clock;
#[cfg(feature = "engine")]
pub mod completion;
pub mod compute;
#[cfg(feature = "engine")]
pub mod config;
#[cfg(feature = "engine")]
pub mod engine;
#[cfg(feature = "engine")]
pub mod http;
pub mod inspect;
pub mod keys;
#[cfg(feature = "engine")]
pub mod migrate;
pub mod sampling;
#[cfg(feature = "engine")]
pub mod server;
#[cfg(feature = "engine")]
pub mod sessions;
pub mod snapshot;
pub mod store;
pub mod wire;
