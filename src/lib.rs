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
//! - `config.rs`: defaults < TOML file < environment < flags.
//! - `server.rs`: start-up order and graceful shutdown.
//!
//! ARCHITECTURE.md has the bird's-eye view and the invariants.

pub mod cli;
pub mod completion;
pub mod compute;
pub mod config;
pub mod engine;
pub mod http;
pub mod inspect;
pub mod migrate;
pub mod sampling;
pub mod server;
pub mod sessions;
pub mod snapshot;
pub mod store;
pub mod wire;
