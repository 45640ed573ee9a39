//! The `kvsnap` command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvsnap::config::{Config, ServeArgs, normalize_llama_server_flags};
use tracing_subscriber::EnvFilter;

/// kvsnap serves a llama.cpp model over HTTP and keeps each conversation's cache.
///
/// Start it with `kvsnap serve` (or `make run`), then talk to it with any OpenAI or
/// llama-server client. Name a conversation with a UUID in `session_id` or the `X-Session-Id`
/// header, and its next turn evaluates only what is new.
#[derive(Debug, Parser)]
#[command(name = "kvsnap", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the model and serve the HTTP API until SIGINT/SIGTERM.
    ///
    /// Options come from defaults < config/kvsnap.toml < KVSNAP_* environment < these flags.
    /// llama-server's spellings work too: -m, -c, -np, -t, -b, -ub, -fa, --api-key.
    Serve(Box<ServeArgs>),
    /// Tell what a state file is and what it holds.
    ///
    /// Reads kvsnap snapshots (as downloaded from /v1/sessions/{id}/snapshot) and llama.cpp's
    /// own files: sequence states (ggsq v3 and v4) and whole-context states (ggsn). Prints the
    /// tokens, caches, layers, K/V types, cell counts, sizes and, for snapshots, whether the
    /// checksum holds. A malformed file gets a sentence and exit code 1.
    Inspect {
        /// The file to read.
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(normalize_llama_server_flags(std::env::args()));
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("KVSNAP_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info,llama_cpp_2=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Inspect { file } => {
            let bytes = match std::fs::read(&file) {
                Ok(bytes) => bytes,
                Err(error) => {
                    eprintln!("kvsnap: cannot read {}: {error}", file.display());
                    return ExitCode::FAILURE;
                }
            };
            match kvsnap::inspect::inspect(&bytes) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(reason) => {
                    eprintln!("kvsnap: {}: {reason}", file.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => {
            let config = match Config::load(&args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("kvsnap: {error}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("kvsnap: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(kvsnap::server::serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kvsnap: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
