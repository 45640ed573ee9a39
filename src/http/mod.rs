//! The HTTP API: thin handlers over the engine.
//!
//! - `error.rs`: the one error→status mapping.
//! - `auth.rs`: bearer keys.
//! - `audit.rs`: the audit trail: admin actions recorded as they are answered, and read back.
//! - `extract.rs`: JSON bodies and session ids, with 4xx sentences for bad input.
//! - `generate.rs`: what the generation routes share (sampling fields, stop strings, SSE).
//! - `openai.rs`: `/v1/chat/completions`, `/v1/completions`.
//! - `native.rs`: llama-server's `/completion`, `/tokenize`, `/detokenize`.
//! - `info.rs`: `/health`, `/v1/models`, `/metrics`.
//! - `slots.rs`: llama-server's `/slots` (list, save, restore, erase), files confined to a folder.
//! - `sessions.rs`: `/v1/sessions` — list, describe, delete, save, download, upload.
//! - `migrate.rs`: `/admin/v1/…` routes that move conversations between instances.
//! - `moved.rs`: requests for conversations that moved away: 307 to their new instance or 410.

mod anthropic;
mod audit;
mod auth;
pub mod cors;
mod error;
mod extract;
mod generate;
pub mod hosts;
mod info;
mod keys;
mod migrate;
mod moved;
mod native;
mod openai;
mod responses;
mod sessions;
mod slots;
mod tool_calls;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::store::Store;

pub use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    /// Everything asked of a conversation (describe, fork, export, uploads, the quota) goes
    /// through here, which makes the fleet's claim first.
    pub conversations: Arc<crate::sessions::Conversations>,
    pub store: Arc<Store>,
    /// `--slot-save-path`: the only folder `/slots` may read or write.
    pub slot_dir: Option<Arc<std::path::PathBuf>>,
    pub metrics: PrometheusHandle,
    /// Moves conversations to other instances; holds the running jobs.
    pub migrator: Arc<crate::migrate::Migrator>,
    /// Set when a shutdown signal arrived: `/health` answers 503 from then on.
    pub shutting_down: Arc<AtomicBool>,
    /// The fleet's shared bucket, if this instance is part of one.
    pub fleet: Option<Arc<crate::sessions::Fleet>>,
    /// Key rotation (`POST /admin/v1/rekey`).
    pub rekeys: Arc<crate::sessions::Rekeys>,
    /// Server-wide request defaults and optional routes (llama-server's flags).
    pub options: Arc<ServerOptions>,
    /// Finished requests' figures, for `/metrics`.
    pub totals: Arc<crate::completion::ServingTotals>,
    /// When this process started, for `/metrics`' `Process-Start-Time-Unix` header.
    pub started_unix: u64,
    /// Uploads being read and verified now: each holds its file in memory, so only
    /// `UPLOADS_AT_ONCE` may; one more is told to retry.
    pub uploads: Arc<tokio::sync::Semaphore>,
}

/// Snapshot and llama.cpp file uploads read and verified at once.
pub const UPLOADS_AT_ONCE: usize = 2;

/// What llama-server's command line decides for every request: the defaults of requests that
/// name no temperature, seed or token limit, the model's names, and which optional routes answer.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub temperature: f32,
    /// For requests that continue no conversation's own random stream.
    pub seed: Option<u64>,
    /// Most tokens a request that names no limit generates.
    pub n_predict: Option<u32>,
    /// Replies carry `__verbose` unless the request says otherwise.
    pub verbose: bool,
    /// The model's names in `/v1/models`; the first (in sorted order, as llama-server lists
    /// them) is its id. Empty: the model file's name.
    pub aliases: Vec<String>,
    pub tags: Vec<String>,
    pub metrics: bool,
    pub slots: bool,
}

impl ServerOptions {
    pub fn from_config(config: &Config) -> Self {
        let mut aliases = config.aliases.clone();
        aliases.sort();
        aliases.dedup();
        Self {
            temperature: config.temperature,
            seed: u64::try_from(config.seed).ok(),
            n_predict: u32::try_from(config.n_predict).ok(),
            verbose: config.verbose,
            aliases,
            tags: config.tags.clone(),
            metrics: config.metrics,
            slots: config.slots,
        }
    }

    /// A request's token limit: its own, else the server's (llama-server's rule: `--n-predict`
    /// is a default, not a cap).
    pub fn token_limit(&self, requested: Option<u32>) -> Option<u32> {
        requested.or(self.n_predict)
    }
}

impl AppState {
    /// The largest file an upload of this model's conversations can be: a full sequence's
    /// state, its tokens, and room for the envelope and a sealed file's framing. Anything larger
    /// cannot be a conversation this server could load.
    pub fn upload_limit(&self) -> usize {
        let info = self.engine.info();
        match &info.live {
            Ok(live) => live
                .layout
                .largest_state_bytes()
                .saturating_add(8 * info.n_ctx_per_sequence as usize)
                .saturating_add(1 << 20)
                .min(SNAPSHOT_BODY_LIMIT),
            Err(_) => SNAPSHOT_BODY_LIMIT,
        }
    }

    /// A place among the uploads read at once, or 503 with a sentence.
    pub fn upload_place(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.uploads.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable(
                format!("{UPLOADS_AT_ONCE} uploads are being read already; retry shortly"),
                2,
            )
        })
    }
}

/// Largest snapshot upload when the model's state cannot be parsed (no layout to size it by).
pub(crate) const SNAPSHOT_BODY_LIMIT: usize = 1 << 30;
/// A manifest holds a conversation's tokens and positions, not its rows: kilobytes per
/// thousand tokens.
const MANIFEST_BODY_LIMIT: usize = 64 << 20;
/// Pages are just under 1 MiB (`snapshot::pages::PAGE_BYTES_MAX`).
const PAGE_BODY_LIMIT: usize = 2 << 20;

/// Builds the router for `state`, applying `config`'s keys and body limit.
pub fn router(state: AppState, config: &Config) -> Router {
    let keys = Arc::new(auth::Keys {
        user: config.api_keys.clone(),
        admin: config.admin_api_keys.clone(),
    });
    let user_routes = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/chat/completions", post(openai::chat_completions))
        .route("/apply-template", post(openai::apply_template))
        .route("/chat/completions/input_tokens", post(openai::input_tokens))
        .route(
            "/v1/chat/completions/input_tokens",
            post(openai::input_tokens),
        )
        .route("/v1/completions", post(openai::completions))
        .route("/v1/responses", post(responses::create))
        .route("/responses", post(responses::create))
        .route("/v1/responses/input_tokens", post(responses::input_tokens))
        .route(
            "/v1/responses/{id}",
            get(responses::show).delete(responses::delete),
        )
        .route("/completion", post(native::completion))
        .route("/completions", post(native::completion))
        .route("/tokenize", post(native::tokenize))
        .route("/detokenize", post(native::detokenize))
        .route("/v1/models", get(info::models))
        .route("/models", get(info::models))
        .route("/metrics", get(info::metrics))
        .route("/props", get(info::props))
        .route("/v1/sessions", get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::show).delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/save", post(sessions::save))
        .route("/v1/sessions/{id}/fork", post(sessions::fork))
        .route(
            "/v1/sessions/{id}/snapshot",
            get(sessions::download)
                .put(sessions::upload)
                // Snapshots are megabytes per thousand tokens.
                .layer(DefaultBodyLimit::max(SNAPSHOT_BODY_LIMIT)),
        )
        .route("/v1/sessions/{id}/export", get(sessions::export))
        .route("/slots", get(slots::list))
        .route("/slots/{id}", post(slots::action))
        .route_layer(middleware::from_fn_with_state(
            keys.clone(),
            auth::require_key,
        ));
    // Anthropic's SDKs read errors in Anthropic's shape, a refused key's too.
    let anthropic_routes = Router::new()
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route_layer(middleware::from_fn_with_state(
            keys.clone(),
            auth::require_key,
        ))
        .route_layer(middleware::map_response(anthropic::anthropic_errors));
    let admin_routes = Router::new()
        .route("/admin/v1/audit", get(audit::read))
        .route("/admin/v1/rekey", post(keys::start).get(keys::status))
        .route("/admin/v1/store", get(info::store_usage))
        .route(
            "/admin/v1/import/llama",
            post(sessions::import_llama).layer(DefaultBodyLimit::max(SNAPSHOT_BODY_LIMIT)),
        )
        .route_layer(middleware::from_fn_with_state(
            keys.clone(),
            auth::require_admin,
        ));
    // Never open, even with auth off: see `auth::require_admin_configured`.
    let migration_routes = Router::new()
        .route("/admin/v1/identity", get(migrate::identity))
        .route("/admin/v1/sessions/{id}/import", put(migrate::import))
        .route(
            "/admin/v1/sessions/{id}/incoming",
            put(migrate::offer).layer(DefaultBodyLimit::max(MANIFEST_BODY_LIMIT)),
        )
        .route(
            "/admin/v1/sessions/{id}/incoming/pages/{page}",
            put(migrate::receive_page).layer(DefaultBodyLimit::max(PAGE_BODY_LIMIT)),
        )
        .route(
            "/admin/v1/sessions/{id}/incoming/commit",
            post(migrate::commit_incoming),
        )
        .route(
            "/admin/v1/sessions/{id}/migrate",
            post(migrate::migrate_one),
        )
        .route("/admin/v1/migrate", post(migrate::migrate_many))
        .route("/admin/v1/jobs/{id}", get(migrate::job))
        .route_layer(middleware::from_fn_with_state(
            keys,
            auth::require_admin_configured,
        ));
    Router::new()
        .route("/health", get(info::health))
        .merge(user_routes)
        .merge(anthropic_routes)
        .merge(admin_routes)
        .merge(migration_routes)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .layer(middleware::from_fn_with_state(
            Arc::new(config.moved_sessions),
            moved::answer_moved,
        ))
        .layer(middleware::from_fn(count_requests))
        .layer(middleware::from_fn(body_deadline))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        // A browser's preflight carries no key, and every answer (errors too) must name its
        // allowed origin for the page to read it.
        .layer(middleware::from_fn_with_state(
            Arc::new(config.cors_origins.clone()),
            cors::answer,
        ))
        // Outermost: a request for another host name is nobody's (DNS rebinding).
        .layer(middleware::from_fn_with_state(
            Arc::new(allowed_hosts(config)),
            hosts::check,
        ))
        .with_state(state)
}

/// `--allowed-hosts`, and the names of `--advertise-url` (how other members of a fleet reach
/// this one) and of `--peer`s (in a group of peers that name each other, their own names).
fn allowed_hosts(config: &Config) -> hosts::AllowedHosts {
    let host = |url: &str| url::Url::parse(url).ok()?.host_str().map(str::to_string);
    let names = config
        .advertise_url
        .iter()
        .chain(config.peers.iter().map(|p| &p.url))
        .filter_map(|url| host(url));
    names.fold(config.allowed_hosts.clone(), |hosts, name| {
        hosts.with(Some(&name))
    })
}

/// A request body's time to arrive: this, plus its declared length at `MIN_BODY_RATE`.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// The slowest upload rate a body is waited for, in bytes per second.
const MIN_BODY_RATE: f64 = 256.0 * 1024.0;

/// Gives every request body a deadline. Headers must arrive within 20 s (`server.rs`), but a
/// body trickled one byte a minute held its connection, or an upload place, for ever: past the
/// deadline the body fails, and so does the request (400 with a sentence).
async fn body_deadline(request: Request, next: Next) -> Response {
    use futures::StreamExt;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared == Some(0) {
        return next.run(request).await;
    }
    let allowed = BODY_DEADLINE
        + std::time::Duration::from_secs_f64(declared.unwrap_or(0) as f64 / MIN_BODY_RATE);
    let (parts, body) = request.into_parts();
    let deadline = Box::pin(tokio::time::sleep(allowed));
    let seconds = allowed.as_secs();
    let chunks = futures::stream::unfold(
        Some((body.into_data_stream(), deadline)),
        move |state| async move {
            let (mut chunks, mut deadline) = state?;
            tokio::select! {
                chunk = chunks.next() => chunk.map(|c| (c, Some((chunks, deadline)))),
                () = &mut deadline => Some((
                    Err(axum::Error::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the request body did not arrive within {seconds} s"),
                    ))),
                    None,
                )),
            }
        },
    );
    let body = axum::body::Body::from_stream(chunks);
    next.run(Request::from_parts(parts, body)).await
}

/// Counts requests and their latency by route template and status.
async fn count_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await.into_response();
    let status = response.status().as_u16().to_string();
    metrics::counter!("kvsnap_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("kvsnap_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
