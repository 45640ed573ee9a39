//! The `kvsnap` command.

use std::process::ExitCode;

use std::future::Future;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kvsnap::cli::{ExportFormat, MigrateArgs, ServerArgs, SessionsCommand};
use kvsnap::config::{Config, ServeArgs, normalize_llama_server_flags};
use tracing_subscriber::EnvFilter;
use uuid::Uuid;

/// The version, with the compute profile: two builds of one version may compute differently.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (compute profile ",
    env!("KVSNAP_NUMERICS"),
    ", target-cpu ",
    env!("KVSNAP_TARGET_CPU"),
    ")"
);

/// kvsnap serves a llama.cpp model over HTTP and keeps each conversation's cache.
///
/// Start it with `kvsnap serve` (or `make run`), then talk to it with any OpenAI or
/// llama-server client. Name a conversation with a UUID in `session_id` or the `X-Session-Id`
/// header, and its next turn evaluates only what is new.
#[derive(Debug, Parser)]
#[command(name = "kvsnap", version = VERSION, propagate_version = true)]
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
        file: PathBuf,
    },
    /// List, describe or delete conversations on a running daemon.
    Sessions {
        #[command(flatten)]
        server: ServerArgs,
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Fork a conversation: a new one that continues exactly as the source would.
    ///
    /// For an agent handing its exact context to another: the fork has the source's owner,
    /// history and random stream, and shares every stored page with it (nothing is copied;
    /// a resident source with unsaved changes is saved first). Prints the new id.
    Fork {
        #[command(flatten)]
        server: ServerArgs,
        /// The conversation to fork
        id: Uuid,
        /// The new conversation's id [default: a new one, printed]
        #[arg(long)]
        into: Option<Uuid>,
    },
    /// Download a conversation into a file.
    ///
    /// The default format is kvsnap's snapshot file: self-describing (model, layout, tokens,
    /// random stream, llama.cpp state) and checksummed; `kvsnap import` puts it back on any
    /// instance running the same model and layout. `--format llama` writes llama.cpp's own
    /// `ggsq` v4 sequence file instead.
    Export {
        #[command(flatten)]
        server: ServerArgs,
        /// The conversation's id
        id: Uuid,
        /// The file to write (written whole or not at all)
        #[arg(short = 'o', long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "kvsnap")]
        format: ExportFormat,
        /// Seal the file with the daemon's current encryption key (XChaCha20-Poly1305): only
        /// an instance with the same key file can import it. Needs encryption at rest on.
        #[arg(long)]
        sealed: bool,
    },
    /// Upload a snapshot file (from `kvsnap export`) as a conversation.
    ///
    /// The daemon verifies it completely (checksum, model, layout, tokens, llama.cpp state)
    /// before it commits; a file that does not fit gets a sentence saying why. A sealed file
    /// (`export --sealed`) is opened by the daemon with its key file.
    Import {
        #[command(flatten)]
        server: ServerArgs,
        /// The snapshot file
        file: PathBuf,
        /// The conversation id to give it [default: a new one, printed]
        #[arg(long)]
        session: Option<Uuid>,
    },
    /// Upload a llama.cpp sequence state file (ggsq v3 or v4) as a conversation (admin key).
    ///
    /// Files from llama-server's /slots save (v3) and from llama_state_seq_save_file (v4) are
    /// translated to this context's layout and verified before llama.cpp sees a byte.
    ImportLlama {
        #[command(flatten)]
        server: ServerArgs,
        /// The ggsq file
        file: PathBuf,
        /// The conversation id to give it [default: a new one, printed]
        #[arg(long)]
        session: Option<Uuid>,
    },
    /// Move conversations to another instance, with a progress bar and a summary.
    ///
    /// The source snapshots each conversation, streams it to the target, and deletes its copy
    /// only after the target has verified and committed it; requests that still reach the
    /// source are redirected. A conversation that fails to move stays on the source, and
    /// running the same command again retries it. Needs the source's admin key, and the
    /// target configured on the source as a peer (--peer URL=ADMIN_KEY).
    Migrate(MigrateArgs),
    /// Read the audit trail of admin actions, oldest first (admin key).
    ///
    /// Every import, migration request and move, lease takeover, and delete, upload,
    /// download, export or fork made with an admin key is one entry: its time, who acted (the
    /// hash of the key presented, never the key; `instance:ID` for what an instance did on
    /// its own), the conversation, and `ok` or the status and sentence it ended with.
    /// Refused attempts on admin routes are entries too.
    Audit {
        #[command(flatten)]
        server: ServerArgs,
        /// Only entries after this sequence number
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Most entries to print [default: all]
        #[arg(long)]
        limit: Option<u64>,
        /// Print each entry as the API's JSON, one per line
        #[arg(long)]
        json: bool,
    },
    /// Make or rotate the key file for encryption at rest (--encryption-key-file).
    ///
    /// The file holds a page-naming key (which never changes for a store's life) and one or
    /// more encryption keys, one of them current. It is written owner-only (0600); kvsnap
    /// refuses a key file anyone else may read.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Seal everything a daemon stores with its key file's current key (admin key).
    ///
    /// After `kvsnap keys rotate`: the daemon reloads its key file and, while it keeps
    /// serving, seals every value of its store (and its fleet bucket's objects) that an older
    /// key sealed. Shows progress; an interrupted rotation is finished by running it again.
    /// Remove an old key from the file only after this has finished on every daemon using it.
    Rekey {
        #[command(flatten)]
        server: ServerArgs,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Write a new key file with fresh random keys (never overwrites one).
    New {
        /// Where to write it
        file: PathBuf,
    },
    /// Add a fresh key to a key file and make it current; then run `kvsnap rekey`.
    Rotate {
        /// The key file
        file: PathBuf,
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
        Command::Sessions { server, command } => {
            client_command(kvsnap::cli::sessions(&server, command))
        }
        Command::Audit {
            server,
            after,
            limit,
            json,
        } => client_command(kvsnap::cli::audit(&server, after, limit, json)),
        Command::Fork { server, id, into } => client_command(kvsnap::cli::fork(&server, id, into)),
        Command::Export {
            server,
            id,
            output,
            format,
            sealed,
        } => client_command(kvsnap::cli::export(&server, id, &output, format, sealed)),
        Command::Keys { command } => {
            let done = match command {
                KeysCommand::New { file } => kvsnap::cli::new_key_file(&file),
                KeysCommand::Rotate { file } => kvsnap::cli::rotate_key_file(&file),
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("kvsnap: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Rekey { server } => client_command(kvsnap::cli::rekey(&server)),
        Command::Import {
            server,
            file,
            session,
        } => client_command(kvsnap::cli::import(&server, &file, session)),
        Command::ImportLlama {
            server,
            file,
            session,
        } => client_command(kvsnap::cli::import_llama(&server, &file, session)),
        Command::Migrate(args) => match block_on(kvsnap::cli::migrate(&args)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("kvsnap: {error:#}");
                ExitCode::FAILURE
            }
        },
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

/// Runs a client command; its error is one sentence on stderr and exit code 1.
fn client_command(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    match block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvsnap: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on<T>(future: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}
