//! The daemon's configuration: defaults < `config/kvsnap.toml` < `KVSNAP_*` environment < flags.
//!
//! `ServeArgs` (clap) carries the flags and their environment variables; `FileConfig` is the
//! TOML file; `Config` is the validated result everyone else reads. Every option, its default and
//! its meaning is documented in `config/kvsnap.toml`, which a test keeps in step with this file.

pub use crate::migrate::peer::Peer;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::engine::{CacheType, EngineConfig};
use crate::http::cors::Origins;
use crate::http::hosts::AllowedHosts;
use crate::sessions::{PersistPolicy, RemoteDurability};

/// The default config file, read when it exists and `--config` names no other.
pub const DEFAULT_CONFIG_FILE: &str = "config/kvsnap.toml";

/// Options of `kvsnap serve`. Flags follow llama-server's names where they mean the same.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file [default: config/kvsnap.toml when it exists]
    #[arg(long, env = "KVSNAP_CONFIG")]
    pub config: Option<PathBuf>,
    /// GGUF model file [default: models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(short = 'm', long, env = "KVSNAP_MODEL")]
    pub model: Option<PathBuf>,
    /// Address to listen on, or several separated by commas [default: 127.0.0.1]
    #[arg(long, env = "KVSNAP_HOST")]
    pub host: Option<String>,
    /// Port to listen on; 0 picks a free one and prints it [default: 8080]
    #[arg(long, env = "KVSNAP_PORT")]
    pub port: Option<u16>,
    /// Total context in tokens, shared equally by the parallel sequences [default: 16384]
    #[arg(short = 'c', long = "ctx-size", env = "KVSNAP_CTX_SIZE")]
    pub ctx_size: Option<u32>,
    /// Conversations decoded at once (llama.cpp sequences) [default: 4]
    #[arg(long = "parallel", env = "KVSNAP_PARALLEL")]
    pub parallel: Option<u32>,
    /// CPU threads for llama.cpp [default: all cores]
    #[arg(short = 't', long, env = "KVSNAP_THREADS")]
    pub threads: Option<i32>,
    /// Logical batch size: most tokens in one decode call [default: 2048]
    #[arg(short = 'b', long = "batch-size", env = "KVSNAP_BATCH_SIZE")]
    pub batch_size: Option<u32>,
    /// Physical batch size [default: 512]
    #[arg(long = "ubatch-size", env = "KVSNAP_UBATCH_SIZE")]
    pub ubatch_size: Option<u32>,
    /// Flash attention: on or off (restores are exact either way; a quantized V cache needs
    /// it) [default: off]
    #[arg(long = "flash-attn", env = "KVSNAP_FLASH_ATTN", value_parser = parse_switch)]
    pub flash_attn: Option<bool>,
    /// Origins whose browser pages may read answers: localhost (any port), * (any), or a
    /// comma-separated list such as https://chat.example.com [default: localhost]
    #[arg(long = "cors-origins", env = "KVSNAP_CORS_ORIGINS", value_parser = Origins::parse)]
    pub cors_origins: Option<Origins>,
    /// Host names the server answers to beside IP addresses and localhost (a guard against DNS
    /// rebinding): comma-separated names, or * for any [default: none]
    #[arg(long = "allowed-hosts", env = "KVSNAP_ALLOWED_HOSTS", value_parser = AllowedHosts::parse)]
    pub allowed_hosts: Option<AllowedHosts>,
    /// Decode generating conversations together, in groups small enough that each one's tokens
    /// stay exactly what they would be alone; off decodes each alone (on or off) [default: on]
    #[arg(long = "shared-batches", env = "KVSNAP_SHARED_BATCHES", value_parser = parse_switch)]
    pub shared_batches: Option<bool>,
    /// Requests that may wait for a free sequence before new ones get 503 [default: 64]
    #[arg(long = "queue-size", env = "KVSNAP_QUEUE_SIZE")]
    pub queue_size: Option<usize>,
    /// API key for user routes; repeat or comma-separate for several [default: none, auth off]
    #[arg(long = "api-key", env = "KVSNAP_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,
    /// API key for admin routes (also valid on user routes); repeatable [default: none]
    #[arg(
        long = "admin-api-key",
        env = "KVSNAP_ADMIN_API_KEY",
        value_delimiter = ','
    )]
    pub admin_api_keys: Vec<String>,
    /// Seconds in-flight streams may take to finish after SIGINT/SIGTERM [default: 10]
    #[arg(long = "shutdown-grace", env = "KVSNAP_SHUTDOWN_GRACE")]
    pub shutdown_grace_secs: Option<u64>,
    /// Largest request body in bytes [default: 8388608]
    #[arg(long = "max-body-bytes", env = "KVSNAP_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Open connections at most; further clients wait to be accepted, so memory stays within
    /// this many request bodies [default: 512]
    #[arg(long = "max-connections", env = "KVSNAP_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Conversations one user key may keep; a new one beyond it gets 429 (0: no limit)
    /// [default: 1000]
    #[arg(
        long = "max-conversations-per-key",
        env = "KVSNAP_MAX_CONVERSATIONS_PER_KEY"
    )]
    pub max_conversations_per_key: Option<usize>,
    /// The redb file that keeps conversations [default: data/kvsnap.redb]
    #[arg(long = "data", env = "KVSNAP_DATA")]
    pub data_path: Option<PathBuf>,
    /// Keep the state of requests that name no conversation (chat frontends that send the
    /// whole history), so the next request that starts with it resumes it, also after a
    /// restart (on or off) [default: on]
    #[arg(long = "keep-unnamed", env = "KVSNAP_KEEP_UNNAMED", value_parser = parse_switch)]
    pub keep_unnamed: Option<bool>,
    /// Bytes of pages the store may hold before unnamed states go, least recently used first
    /// (named conversations are never dropped for it; 0: no budget) [default: 4294967296]
    #[arg(long = "store-budget", env = "KVSNAP_STORE_BUDGET")]
    pub store_budget: Option<u64>,
    /// When conversations are written to the store: after every turn, only when evicted, only
    /// at shutdown, or never (off: a plain server, no request may name a conversation)
    /// [default: turn]
    #[arg(long = "persist", env = "KVSNAP_PERSIST", value_enum)]
    pub persist: Option<PersistPolicy>,
    /// Folder for llama-server's /slots save and restore; files never leave it [default: none,
    /// slot files off]
    #[arg(long = "slot-save-path", env = "KVSNAP_SLOT_SAVE_PATH")]
    pub slot_save_path: Option<PathBuf>,
    /// Chat template: a llama.cpp built-in name such as gemma, chatml, llama3
    /// [default: the model's own, else chosen from its architecture]
    #[arg(long = "chat-template", env = "KVSNAP_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    /// Chat template read from this file (llama-server's --chat-template-file); the same
    /// styles as --chat-template are recognised in it [default: none]
    #[arg(long = "chat-template-file", env = "KVSNAP_CHAT_TEMPLATE_FILE")]
    pub chat_template_file: Option<PathBuf>,
    /// Temperature of requests that name none [default: 0.8]
    #[arg(long = "temp", env = "KVSNAP_TEMP")]
    pub temperature: Option<f32>,
    /// Seed of requests that name none and continue no conversation's own random stream;
    /// -1 draws a fresh one each time [default: -1]
    #[arg(long = "seed", env = "KVSNAP_SEED", allow_negative_numbers = true)]
    pub seed: Option<i64>,
    /// Most tokens a request that names no limit generates; -1 for no limit but the
    /// conversation's context [default: -1]
    #[arg(
        short = 'n',
        long = "n-predict",
        env = "KVSNAP_N_PREDICT",
        allow_negative_numbers = true
    )]
    pub n_predict: Option<i64>,
    /// Names the model answers to in /v1/models (comma-separated; llama-server's --alias)
    /// [default: the model file's name]
    #[arg(
        short = 'a',
        long = "alias",
        env = "KVSNAP_ALIAS",
        value_delimiter = ','
    )]
    pub aliases: Vec<String>,
    /// Tags listed with the model in /v1/models (comma-separated) [default: none]
    #[arg(long = "tags", env = "KVSNAP_TAGS", value_delimiter = ',')]
    pub tags: Vec<String>,
    /// Serve GET /metrics (Prometheus); --no-metrics answers it with 501 [default: on]
    #[arg(long = "metrics", overrides_with = "no_metrics")]
    pub metrics: bool,
    #[arg(long = "no-metrics", hide = true)]
    pub no_metrics: bool,
    /// Serve GET /slots; --no-slots answers it with 501 [default: on]
    #[arg(long = "slots", overrides_with = "no_slots")]
    pub slots: bool,
    #[arg(long = "no-slots", hide = true)]
    pub no_slots: bool,
    /// Every reply carries __verbose, the prompt as rendered and the request's settings, unless
    /// the request says "verbose": false [default: off]
    #[arg(long = "verbose")]
    pub verbose: bool,
    /// llama-server switches kvsnap takes so that their command lines start it unchanged, but
    /// whose choice kvsnap makes itself: --kv-unified and --swa-full (each conversation keeps
    /// its own equal share of the context, laid out as its snapshots need). Each is logged.
    #[arg(long = "kv-unified", hide = true)]
    pub kv_unified: bool,
    #[arg(long = "swa-full", hide = true)]
    pub swa_full: bool,
    /// Render chats with the model's own Jinja template (or --chat-template-file's), as
    /// llama-server's --jinja does: an earlier reply's thinking (reasoning_content, Anthropic
    /// thinking blocks) reaches templates that show it. Off: llama.cpp's built-in templates
    /// [default: off]
    #[arg(long = "jinja", overrides_with = "no_jinja")]
    pub jinja: bool,
    #[arg(long = "no-jinja", hide = true)]
    pub no_jinja: bool,
    /// KV cache element type of K (llama-server's -ctk); q8_0 halves a snapshot's bytes
    /// [default: f16]
    #[arg(long = "cache-type-k", env = "KVSNAP_CACHE_TYPE_K", value_enum)]
    pub cache_type_k: Option<CacheType>,
    /// KV cache element type of V (-ctv); a quantized V needs flash attention (-fa on)
    /// [default: f16]
    #[arg(long = "cache-type-v", env = "KVSNAP_CACHE_TYPE_V", value_enum)]
    pub cache_type_v: Option<CacheType>,
    /// Unload the model after this many seconds with no request (every conversation saved
    /// first); the next request loads it again, and every conversation resumes exactly. 0
    /// never sleeps [default: 0]
    #[arg(long = "sleep-idle-seconds", env = "KVSNAP_SLEEP_IDLE_SECONDS")]
    pub sleep_idle_seconds: Option<u64>,
    /// Another kvsnap instance conversations may be moved to, as URL=ADMIN_KEY (one of its
    /// admin keys); repeat or comma-separate for several [default: none]
    #[arg(long = "peer", env = "KVSNAP_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<Peer>,
    /// What a request for a conversation that moved away gets: redirect (307 to its new
    /// instance) or gone (410 naming it) [default: redirect]
    #[arg(long = "moved-sessions", env = "KVSNAP_MOVED_SESSIONS", value_enum)]
    pub moved_sessions: Option<MovedSessions>,
    /// Most MiB per second one migration sends to its target; 0 for no limit [default: 0]
    #[arg(long = "migrate-rate-limit", env = "KVSNAP_MIGRATE_RATE_LIMIT")]
    pub migrate_rate_limit: Option<f64>,
    /// A shared S3-compatible bucket for a fleet, as s3://bucket/prefix: every save is uploaded
    /// there and a conversation this instance lacks is fetched from it. Endpoint, region and
    /// credentials come from AWS_ENDPOINT, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY and AWS_ALLOW_HTTP, or the config file [default: none]
    #[arg(long = "remote", env = "KVSNAP_REMOTE")]
    pub remote: Option<String>,
    /// How this instance is reached by the others of its fleet, for redirects to the
    /// conversations it holds [default: http://HOST:PORT as bound]
    #[arg(long = "advertise-url", env = "KVSNAP_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Seconds a fleet member holds a conversation after its last use; meanwhile the others
    /// redirect its requests there, after it another may take it over [default: 30]
    #[arg(long = "lease-seconds", env = "KVSNAP_LEASE_SECONDS")]
    pub lease_seconds: Option<u64>,
    /// When a turn is durable for the fleet: async (at the local fsync; uploaded in the
    /// background, retried) or remote-sync (once in the bucket) [default: async]
    #[arg(
        long = "remote-durability",
        env = "KVSNAP_REMOTE_DURABILITY",
        value_enum
    )]
    pub remote_durability: Option<RemoteDurability>,
    /// Encrypt everything stored (the redb file, the bucket) with the keys of this file, which
    /// must be owner-only (chmod 600); `kvsnap keys new FILE` makes one. A store written without
    /// encryption is rewritten encrypted at start [default: no encryption]
    #[arg(long = "encryption-key-file", env = "KVSNAP_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

/// How a conversation that moved to another instance is answered at its old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MovedSessions {
    /// 307 Temporary Redirect to the same path on the new instance: clients that follow
    /// redirects keep working unchanged.
    Redirect,
    /// 410 Gone with a sentence naming the new instance.
    Gone,
}

/// The TOML file: every key optional, unknown keys refused so a typo is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub model: Option<PathBuf>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub ctx_size: Option<u32>,
    pub parallel: Option<u32>,
    pub threads: Option<i32>,
    pub batch_size: Option<u32>,
    pub ubatch_size: Option<u32>,
    pub flash_attn: Option<bool>,
    pub cache_type_k: Option<CacheType>,
    pub cache_type_v: Option<CacheType>,
    pub sleep_idle_seconds: Option<u64>,
    pub shared_batches: Option<bool>,
    pub cors_origins: Option<Origins>,
    pub allowed_hosts: Option<AllowedHosts>,
    pub queue_size: Option<usize>,
    pub api_keys: Option<Vec<String>>,
    pub admin_api_keys: Option<Vec<String>>,
    pub shutdown_grace_secs: Option<u64>,
    pub max_body_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_conversations_per_key: Option<usize>,
    pub chat_template: Option<String>,
    pub jinja: Option<bool>,
    pub temperature: Option<f32>,
    pub seed: Option<i64>,
    pub n_predict: Option<i64>,
    pub aliases: Option<Vec<String>>,
    pub tags: Option<Vec<String>>,
    pub metrics: Option<bool>,
    pub slots: Option<bool>,
    pub verbose: Option<bool>,
    pub data_path: Option<PathBuf>,
    pub persist: Option<PersistPolicy>,
    pub keep_unnamed: Option<bool>,
    pub store_budget: Option<u64>,
    pub slot_save_path: Option<PathBuf>,
    pub peers: Option<Vec<Peer>>,
    pub moved_sessions: Option<MovedSessions>,
    pub migrate_rate_limit: Option<f64>,
    pub remote: Option<String>,
    pub remote_durability: Option<RemoteDurability>,
    pub advertise_url: Option<String>,
    pub lease_seconds: Option<u64>,
    pub remote_endpoint: Option<String>,
    pub remote_region: Option<String>,
    pub remote_access_key_id: Option<String>,
    pub remote_secret_access_key: Option<String>,
    pub remote_allow_http: Option<bool>,
    pub encryption_key_file: Option<PathBuf>,
}

/// The effective, validated configuration.
#[derive(Clone)]
pub struct Config {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub ctx_size: u32,
    pub parallel: u32,
    pub threads: i32,
    pub batch_size: u32,
    pub ubatch_size: u32,
    pub flash_attn: bool,
    pub cache_type_k: CacheType,
    pub cache_type_v: CacheType,
    /// Seconds with no request before the model is unloaded; 0 never.
    pub sleep_idle_seconds: u64,
    pub shared_batches: bool,
    /// Origins whose browser pages may read answers (`http::cors`).
    pub cors_origins: Origins,
    /// Host names answered beside IP addresses and localhost (`http::hosts`).
    pub allowed_hosts: AllowedHosts,
    pub queue_size: usize,
    pub api_keys: Vec<String>,
    pub admin_api_keys: Vec<String>,
    pub shutdown_grace_secs: u64,
    pub max_body_bytes: usize,
    /// Connections served at once (`server.rs`): with `max_body_bytes`, the bound on request
    /// bodies held in memory.
    pub max_connections: usize,
    /// Conversations a user key may keep (admin keys and an open API: no limit); 0: no limit.
    pub max_conversations_per_key: usize,
    /// `None`: the model's own template, else one chosen from its architecture.
    pub chat_template: Option<String>,
    /// Chats rendered by the Jinja template itself (`--jinja`), not llama.cpp's built-ins.
    pub jinja: bool,
    /// What a request that names no temperature, seed, token limit or verbosity gets.
    pub temperature: f32,
    /// Negative: a fresh seed per request.
    pub seed: i64,
    /// Negative: no limit but the conversation's context.
    pub n_predict: i64,
    /// Names of the model in `/v1/models`; empty: the model file's name.
    pub aliases: Vec<String>,
    pub tags: Vec<String>,
    pub verbose: bool,
    /// `GET /metrics` and `GET /slots` served (else 501, as llama-server without the flags).
    pub metrics: bool,
    pub slots: bool,
    pub data_path: PathBuf,
    pub persist: PersistPolicy,
    /// Requests that name no conversation are kept as unnamed entries (`sessions::lookup`).
    pub keep_unnamed: bool,
    /// Page bytes past which unnamed entries are dropped, least recently used first; 0: none.
    pub store_budget: u64,
    /// `None`: `/slots` save and restore are refused.
    pub slot_save_path: Option<PathBuf>,
    /// Instances conversations may be moved to.
    pub peers: Vec<Peer>,
    pub moved_sessions: MovedSessions,
    /// MiB/s per migration; 0 is no limit.
    pub migrate_rate_limit: f64,
    /// `s3://bucket/prefix` of the fleet's shared bucket; `None`: this instance stands alone.
    pub remote: Option<String>,
    pub remote_durability: RemoteDurability,
    /// `None`: `http://HOST:PORT` as bound.
    pub advertise_url: Option<String>,
    pub lease_seconds: u64,
    /// Bucket settings from the config file; unset ones come from the `AWS_*` environment.
    pub remote_settings: crate::store::remote::RemoteSettings,
    /// `None`: nothing is encrypted at rest.
    pub encryption_key_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // Instruction-tuned, so a first chat reads like chat; the tests run Gemma 3 270M.
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            host: "127.0.0.1".into(),
            port: 8080,
            ctx_size: 16384,
            parallel: 4,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
            batch_size: 2048,
            ubatch_size: 512,
            flash_attn: false,
            cache_type_k: CacheType::F16,
            cache_type_v: CacheType::F16,
            sleep_idle_seconds: 0,
            shared_batches: true,
            cors_origins: Origins::Localhost,
            allowed_hosts: AllowedHosts::default(),
            queue_size: 64,
            api_keys: Vec::new(),
            admin_api_keys: Vec::new(),
            shutdown_grace_secs: 10,
            max_body_bytes: 8 * 1024 * 1024,
            max_connections: 512,
            max_conversations_per_key: 1000,
            chat_template: None,
            jinja: false,
            temperature: 0.8,
            seed: -1,
            n_predict: -1,
            aliases: Vec::new(),
            tags: Vec::new(),
            verbose: false,
            metrics: true,
            slots: true,
            data_path: PathBuf::from("data/kvsnap.redb"),
            persist: PersistPolicy::Turn,
            keep_unnamed: true,
            store_budget: 4 << 30,
            slot_save_path: None,
            peers: Vec::new(),
            moved_sessions: MovedSessions::Redirect,
            migrate_rate_limit: 0.0,
            remote: None,
            remote_durability: RemoteDurability::Async,
            advertise_url: None,
            lease_seconds: 30,
            remote_settings: Default::default(),
            encryption_key_file: None,
        }
    }
}

/// Secrets never reach a log line.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |keys: &[String]| format!("[{} redacted]", keys.len());
        f.debug_struct("Config")
            .field("model", &self.model)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("ctx_size", &self.ctx_size)
            .field("parallel", &self.parallel)
            .field("threads", &self.threads)
            .field("batch_size", &self.batch_size)
            .field("ubatch_size", &self.ubatch_size)
            .field("flash_attn", &self.flash_attn)
            .field("cache_type_k", &self.cache_type_k)
            .field("cache_type_v", &self.cache_type_v)
            .field("sleep_idle_seconds", &self.sleep_idle_seconds)
            .field("shared_batches", &self.shared_batches)
            .field("cors_origins", &self.cors_origins)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("queue_size", &self.queue_size)
            .field("api_keys", &redact(&self.api_keys))
            .field("admin_api_keys", &redact(&self.admin_api_keys))
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_connections", &self.max_connections)
            .field("max_conversations_per_key", &self.max_conversations_per_key)
            .field("chat_template", &self.chat_template)
            .field("jinja", &self.jinja)
            .field("temperature", &self.temperature)
            .field("seed", &self.seed)
            .field("n_predict", &self.n_predict)
            .field("aliases", &self.aliases)
            .field("tags", &self.tags)
            .field("verbose", &self.verbose)
            .field("metrics", &self.metrics)
            .field("slots", &self.slots)
            .field("data_path", &self.data_path)
            .field("persist", &self.persist)
            .field("keep_unnamed", &self.keep_unnamed)
            .field("store_budget", &self.store_budget)
            .field("slot_save_path", &self.slot_save_path)
            .field("peers", &self.peers)
            .field("moved_sessions", &self.moved_sessions)
            .field("migrate_rate_limit", &self.migrate_rate_limit)
            .field("remote", &self.remote)
            .field("remote_durability", &self.remote_durability)
            .field("advertise_url", &self.advertise_url)
            .field("lease_seconds", &self.lease_seconds)
            .field("remote_settings", &self.remote_settings)
            .field("encryption_key_file", &self.encryption_key_file)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
}

impl Config {
    /// Layers the file (if any) and the flags/environment over the defaults, then validates.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => Some(read_file(path)?),
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                Some(read_file(Path::new(DEFAULT_CONFIG_FILE))?)
            }
            None => None,
        };
        let mut config = Config::default();
        if let Some(file) = file {
            config.apply_file(file);
        }
        config.apply_args(args);
        if let Some(path) = &args.chat_template_file {
            let template = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cannot read the chat template file {}: {e}",
                    path.display()
                ))
            })?;
            config.chat_template = Some(template);
        }
        // llama.cpp's own rule: a physical batch never exceeds the logical one, so `-b 32`
        // alone means calls of 32 tokens, not a refusal.
        if config.ubatch_size > config.batch_size && args.ubatch_size.is_none() {
            config.ubatch_size = config.batch_size;
        }
        // A plain server keeps nothing, the states of requests that name no conversation
        // included.
        if config.persist == PersistPolicy::Off {
            config.keep_unnamed = false;
        }
        log_llama_server_switches(args);
        config.validate()?;
        Ok(config)
    }

    fn apply_file(&mut self, file: FileConfig) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = file.$field { self.$field = v; } )* };
        }
        take!(
            model,
            host,
            port,
            ctx_size,
            parallel,
            threads,
            batch_size,
            ubatch_size,
            flash_attn,
            cache_type_k,
            cache_type_v,
            sleep_idle_seconds,
            shared_batches,
            cors_origins,
            allowed_hosts,
            queue_size,
            api_keys,
            admin_api_keys,
            shutdown_grace_secs,
            max_body_bytes,
            max_connections,
            max_conversations_per_key,
            data_path,
            persist,
            keep_unnamed,
            store_budget,
            peers,
            moved_sessions,
            migrate_rate_limit,
            temperature,
            seed,
            n_predict,
            aliases,
            tags,
            metrics,
            slots,
            verbose,
            jinja
        );
        if file.chat_template.is_some() {
            self.chat_template = file.chat_template;
        }
        if file.slot_save_path.is_some() {
            self.slot_save_path = file.slot_save_path;
        }
        if file.encryption_key_file.is_some() {
            self.encryption_key_file = file.encryption_key_file;
        }
        if file.remote.is_some() {
            self.remote = file.remote;
        }
        if let Some(durability) = file.remote_durability {
            self.remote_durability = durability;
        }
        if file.advertise_url.is_some() {
            self.advertise_url = file.advertise_url;
        }
        if let Some(seconds) = file.lease_seconds {
            self.lease_seconds = seconds;
        }
        self.remote_settings = crate::store::remote::RemoteSettings {
            endpoint: file.remote_endpoint,
            region: file.remote_region,
            access_key_id: file.remote_access_key_id,
            secret_access_key: file.remote_secret_access_key,
            allow_http: file.remote_allow_http,
        };
    }

    fn apply_args(&mut self, args: &ServeArgs) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = args.$field.clone() { self.$field = v; } )* };
        }
        take!(
            model,
            host,
            port,
            ctx_size,
            parallel,
            threads,
            batch_size,
            ubatch_size,
            flash_attn,
            cache_type_k,
            cache_type_v,
            sleep_idle_seconds,
            shared_batches,
            cors_origins,
            allowed_hosts,
            queue_size,
            shutdown_grace_secs,
            max_body_bytes,
            max_connections,
            max_conversations_per_key,
            data_path,
            persist,
            keep_unnamed,
            store_budget,
            moved_sessions,
            migrate_rate_limit,
            temperature,
            seed,
            n_predict
        );
        if !args.aliases.is_empty() {
            self.aliases = args.aliases.clone();
        }
        if !args.tags.is_empty() {
            self.tags = args.tags.clone();
        }
        if args.metrics || args.no_metrics {
            self.metrics = args.metrics;
        }
        if args.slots || args.no_slots {
            self.slots = args.slots;
        }
        if args.verbose {
            self.verbose = true;
        }
        if args.jinja || args.no_jinja {
            self.jinja = args.jinja;
        }
        if !args.peers.is_empty() {
            self.peers = args.peers.clone();
        }
        if args.chat_template.is_some() {
            self.chat_template = args.chat_template.clone();
        }
        if args.slot_save_path.is_some() {
            self.slot_save_path = args.slot_save_path.clone();
        }
        if args.encryption_key_file.is_some() {
            self.encryption_key_file = args.encryption_key_file.clone();
        }
        if args.remote.is_some() {
            self.remote = args.remote.clone();
        }
        if let Some(durability) = args.remote_durability {
            self.remote_durability = durability;
        }
        if args.advertise_url.is_some() {
            self.advertise_url = args.advertise_url.clone();
        }
        if let Some(seconds) = args.lease_seconds {
            self.lease_seconds = seconds;
        }
        if !args.api_keys.is_empty() {
            self.api_keys = args.api_keys.clone();
        }
        if !args.admin_api_keys.is_empty() {
            self.admin_api_keys = args.admin_api_keys.clone();
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.parallel == 0 || self.parallel > 64 {
            return invalid("parallel must be between 1 and 64");
        }
        if self.ctx_size < MIN_CTX_PER_SEQUENCE * self.parallel {
            return Err(ConfigError::Invalid(format!(
                "ctx_size must give each parallel sequence at least {MIN_CTX_PER_SEQUENCE} \
                 tokens (ctx_size is shared equally by the {} parallel sequences)",
                self.parallel
            )));
        }
        if !(0.0..=100.0).contains(&self.temperature) {
            return invalid("temp must be between 0 and 100");
        }
        if self
            .aliases
            .iter()
            .chain(&self.tags)
            .any(|a| a.trim().is_empty())
        {
            return invalid("an alias or tag is empty");
        }
        if self.threads < 1 {
            return invalid("threads must be at least 1");
        }
        if self.ubatch_size == 0 || self.batch_size < self.ubatch_size {
            return invalid("batch_size must be at least ubatch_size, and both above 0");
        }
        // llama.cpp reserves room for one output per sequence in a logical batch and aborts the
        // process at start when it has less (`n_outputs_max <= cparams.n_outputs_max`).
        if self.batch_size < self.parallel {
            return Err(ConfigError::Invalid(format!(
                "batch_size ({}) must be at least parallel ({}): every sequence may need its \
                 logits from one decode call; raise -b or lower -np",
                self.batch_size, self.parallel
            )));
        }
        if self.queue_size == 0 {
            return invalid("queue_size must be at least 1");
        }
        if self.max_connections == 0 {
            return invalid("max_connections must be at least 1");
        }
        if self
            .api_keys
            .iter()
            .chain(&self.admin_api_keys)
            .any(|k| k.trim().is_empty())
        {
            return invalid("an API key is empty");
        }
        if self.hosts().any(|h| h.parse::<std::net::IpAddr>().is_err()) {
            return invalid(
                "host must be an IP address such as 127.0.0.1 or 0.0.0.0, or several \
                 separated by commas such as 127.0.0.1,::1",
            );
        }
        for peer in &self.peers {
            check_peer_url(&peer.url).map_err(ConfigError::Invalid)?;
            if peer
                .admin_key
                .as_deref()
                .is_none_or(|k| k.trim().is_empty())
            {
                return Err(ConfigError::Invalid(format!(
                    "peer {} needs one of its admin keys: --peer {}=ADMIN_KEY (conversations \
                     only move between instances that each have an admin key)",
                    peer.url, peer.url
                )));
            }
        }
        if !(self.migrate_rate_limit >= 0.0 && self.migrate_rate_limit.is_finite()) {
            return invalid("migrate_rate_limit must be 0 (no limit) or a positive MiB/s");
        }
        if self.lease_seconds == 0 {
            return invalid("lease_seconds must be at least 1");
        }
        if let Some(url) = &self.advertise_url {
            check_peer_url(url).map_err(ConfigError::Invalid)?;
        }
        // llama.cpp's own rule, said before the model loads: a quantized V is stored by row,
        // and only flash attention reads it so.
        if self.cache_type_v.is_quantized() && !self.flash_attn {
            return Err(ConfigError::Invalid(format!(
                "a {} V cache needs flash attention: add -fa on (or keep -ctv f16)",
                self.cache_type_v.name()
            )));
        }
        if self.persist == PersistPolicy::Off && self.remote.is_some() {
            return invalid(
                "--persist off keeps no conversations, so it cannot share them through a fleet \
                 bucket; choose turn, evict or shutdown, or leave --remote out",
            );
        }
        if let Some(remote) = &self.remote {
            crate::store::remote::Remote::open(remote, &self.remote_settings)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    /// The configured peer with this base URL (trailing slashes ignored).
    /// What the migrator needs of this configuration: the peers, the transfer rate limit.
    pub fn migrator_options(&self) -> crate::migrate::MigratorOptions {
        crate::migrate::MigratorOptions {
            peers: self.peers.clone(),
            rate_limit_mib_s: self.migrate_rate_limit,
        }
    }

    /// Each address of `host` (llama-server takes a comma-separated list).
    fn hosts(&self) -> impl Iterator<Item = &str> {
        self.host.split(',').map(str::trim)
    }

    /// Where to listen: every address of `host` on `port`. The first is the main one.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.hosts()
            .map(|h| {
                let ip = h.parse().expect("validated in Config::validate");
                SocketAddr::new(ip, self.port)
            })
            .collect()
    }

    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            model_path: self.model.clone(),
            ctx_size: self.ctx_size,
            parallel: self.parallel,
            threads: self.threads,
            batch_size: self.batch_size,
            ubatch_size: self.ubatch_size,
            flash_attention: self.flash_attn,
            shared_batches: self.shared_batches,
            queue_size: self.queue_size,
            chat_template: self.chat_template.clone(),
            jinja: self.jinja,
            keep_state: self.persist != PersistPolicy::Off,
            cache_type_k: self.cache_type_k,
            cache_type_v: self.cache_type_v,
            sleep_idle: (self.sleep_idle_seconds > 0)
                .then(|| std::time::Duration::from_secs(self.sleep_idle_seconds)),
        }
    }
}

/// The smallest share of the context a sequence may have: a prompt and a few tokens.
const MIN_CTX_PER_SEQUENCE: u32 = 64;

/// Logs each llama-server switch kvsnap accepts but decides itself, so nobody believes it took
/// effect.
fn log_llama_server_switches(args: &ServeArgs) {
    let switches = [
        (
            args.kv_unified,
            "--kv-unified",
            "each conversation keeps its own equal share of the context",
        ),
        (
            args.swa_full,
            "--swa-full",
            "the sliding-window cache keeps llama.cpp's default size",
        ),
    ];
    for (given, flag, instead) in switches {
        if given {
            tracing::warn!(
                "{flag} is accepted for llama-server's command lines and has no effect: {instead}"
            );
        }
    }
}

/// Accepts llama-server's `on`/`off` as well as `true`/`false`.
fn parse_switch(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got {value:?}")),
    }
}

/// `URL=ADMIN_KEY`, split at the first `=` (a peer's base URL has no query string). A missing
/// key is refused by `Config::validate`, with a sentence.
fn parse_peer(value: &str) -> Result<Peer, String> {
    let (url, key) = match value.split_once('=') {
        Some((url, key)) => (url, Some(key.to_string())),
        None => (value, None),
    };
    let url = url.trim_end_matches('/').to_string();
    check_peer_url(&url)?;
    Ok(Peer {
        url,
        admin_key: key,
    })
}

/// A peer is named by a plain base URL: http(s), a host, no path, query or fragment.
fn check_peer_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("peer {url:?} is not a URL ({e}); write it as http://host:port"))?;
    let plain = matches!(parsed.scheme(), "http" | "https")
        && parsed.host().is_some()
        && parsed.path() == "/"
        && parsed.query().is_none()
        && parsed.fragment().is_none()
        && !url.ends_with('/');
    if !plain {
        return Err(format!(
            "peer {url:?} must be a base URL such as http://host:port, without a path"
        ));
    }
    Ok(())
}

/// Rewrites llama-server's multi-letter single-dash flags (`-np 4`) into their long forms, which
/// is all clap can parse; the rest of the command line is left as it is.
pub fn normalize_llama_server_flags(args: impl IntoIterator<Item = String>) -> Vec<String> {
    args.into_iter()
        .map(|arg| match arg.as_str() {
            "-np" => "--parallel".to_string(),
            "-ub" => "--ubatch-size".to_string(),
            "-fa" => "--flash-attn".to_string(),
            "-ctk" => "--cache-type-k".to_string(),
            "-ctv" => "--cache-type-v".to_string(),
            _ => arg,
        })
        .collect()
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_default_file_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_FILE);
        let file = read_file(&path).expect("config/kvsnap.toml parses");
        let mut from_file = Config::default();
        from_file.apply_file(file);
        // `threads` depends on the machine, so the file leaves it commented out.
        assert_eq!(format!("{from_file:?}"), format!("{:?}", Config::default()));
    }

    #[test]
    fn flags_override_the_file_and_secrets_are_redacted() {
        let mut config = Config::default();
        config.apply_file(FileConfig {
            port: Some(9000),
            parallel: Some(2),
            ..FileConfig::default()
        });
        config.apply_args(&ServeArgs {
            port: Some(9100),
            api_keys: vec!["sk-secret".into()],
            ..ServeArgs::default()
        });
        assert_eq!(config.port, 9100);
        assert_eq!(config.parallel, 2);
        assert!(!format!("{config:?}").contains("sk-secret"));
    }

    #[test]
    fn persist_off_keeps_nothing_and_joins_no_fleet() {
        let file = std::env::temp_dir().join(format!("kvsnap-empty-{}.toml", std::process::id()));
        std::fs::write(&file, "").unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            persist: Some(PersistPolicy::Off),
            ..ServeArgs::default()
        };
        let config = Config::load(&args).unwrap();
        assert!(!config.keep_unnamed, "unnamed entries are saves too");
        assert!(!config.engine().keep_state);
        let in_a_fleet = ServeArgs {
            remote: Some("s3://bucket".into()),
            ..args
        };
        let refused = Config::load(&in_a_fleet).unwrap_err().to_string();
        std::fs::remove_file(&file).unwrap();
        assert!(
            refused.contains("--persist off keeps no conversations"),
            "{refused}"
        );
    }

    #[test]
    fn a_quantized_v_cache_needs_flash_attention() {
        let quantized = Config {
            cache_type_k: CacheType::Q8_0,
            cache_type_v: CacheType::Q8_0,
            ..Config::default()
        };
        let refused = quantized.validate().unwrap_err().to_string();
        assert!(
            refused.contains("q8_0 V cache needs flash attention"),
            "{refused}"
        );
        let with_flash_attention = Config {
            flash_attn: true,
            ..quantized
        };
        with_flash_attention.validate().unwrap();
        let quantized_k_only = Config {
            cache_type_k: CacheType::Q4_0,
            ..Config::default()
        };
        quantized_k_only.validate().unwrap();
    }

    #[test]
    fn peers_are_base_urls_with_an_optional_key_that_is_never_logged() {
        let peer = parse_peer("http://10.0.0.2:8080/=sk-peer=").unwrap();
        assert_eq!(peer.url, "http://10.0.0.2:8080");
        assert_eq!(peer.admin_key.as_deref(), Some("sk-peer="));
        let keyless = Config {
            peers: vec![parse_peer("http://b:1").unwrap()],
            ..Config::default()
        };
        let refused = keyless.validate().unwrap_err().to_string();
        assert!(refused.contains("needs one of its admin keys"), "{refused}");
        assert!(parse_peer("b:1").is_err());
        assert!(parse_peer("http://b:1/v1").is_err());
        let config = Config {
            peers: vec![peer],
            ..Config::default()
        };
        assert!(!format!("{config:?}").contains("sk-peer"));
        let options = config.migrator_options();
        assert!(
            options
                .peers
                .iter()
                .any(|p| p.url == "http://10.0.0.2:8080")
        );
    }
}
