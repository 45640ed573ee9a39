//! The admin CLI: `kvsnap sessions`, `fork`, `export`, `import`, `import-llama`, `migrate` and
//! `audit`.
//!
//! Every command is a client of the daemon's HTTP API (`client.rs`), so what the CLI can do a
//! script with curl can do too, under the same keys and checks.

mod audit;
pub mod client;
mod files;
mod keys;
mod migrate;
mod sessions;

use std::path::PathBuf;

pub use audit::audit;
pub use client::Client;
pub use files::{ExportFormat, export, import, import_llama};
pub use keys::{new_key_file, rekey, rotate_key_file};
pub use migrate::{MigrateArgs, migrate};
pub use sessions::{SessionsCommand, fork, sessions};

/// Which daemon to talk to, and with which key.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The daemon's base URL
    #[arg(
        long,
        global = true,
        env = "KVSNAP_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// API key to present (admin routes need an admin key) [default: none]
    #[arg(long, global = true, env = "KVSNAP_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

impl ServerArgs {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.server, self.key.clone())
    }
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it, synced, renamed.
fn write_file(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let temporary = path.with_file_name(format!(".{}.part", name.to_string_lossy()));
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path).with_context(|| {
        format!(
            "cannot rename {} to {}",
            temporary.display(),
            path.display()
        )
    })?;
    Ok(())
}
