//! The source's side of the wire: talking to a target instance's admin API.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use reqwest::StatusCode;
use serde::Deserialize;
use uuid::Uuid;

use crate::sessions::FleetMember;
use crate::snapshot::LiveIdentity;

/// Another instance this one may move conversations to.
#[derive(Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Its base URL, such as `http://10.0.0.2:8080` (no trailing slash once validated).
    pub url: String,
    /// One of its admin keys (required: migration routes are never open).
    pub admin_key: Option<String>,
}

/// Keys never reach a log line.
impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = if self.admin_key.is_some() {
            "redacted"
        } else {
            "none"
        };
        write!(f, "{} (admin key {key})", self.url)
    }
}

/// Headers of `PUT /admin/v1/sessions/{id}/import`.
pub const CHECKSUM_HEADER: &str = "x-kvsnap-checksum";
pub const OWNER_HEADER: &str = "x-kvsnap-owner";
pub const CREATED_HEADER: &str = "x-kvsnap-created-ms";

/// Pieces the snapshot is streamed in.
const PIECE_BYTES: usize = 1 << 20;
/// For small requests (identity, a conversation's description).
const SHORT_TIMEOUT: Duration = Duration::from_secs(15);
/// The slowest transfer rate (bytes/s) assumed when no rate limit is set, to size a transfer's
/// timeout: generous, so only a stalled peer hits it.
pub const SLOWEST_RATE: f64 = 5e6;

/// Why talking to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No answer: connection refused, reset mid-transfer, timeout.
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The peer answered with an error; `message` is its sentence.
    #[error("{url} answered {status}: {message}")]
    Refused {
        url: String,
        status: StatusCode,
        message: String,
    },
}

/// What `GET /admin/v1/identity` answers.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct PeerIdentity {
    pub model_id: String,
    pub live: LiveIdentity,
    /// The fleet the instance belongs to, if any (instances before fleets do not say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetMember>,
}

/// What `PUT /admin/v1/sessions/{id}/incoming` answers: the pages to send (hex ids), and how
/// many the target had already (`staged` by an earlier attempt at this transfer, `held` in
/// its store for other conversations).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct IncomingAnswer {
    pub missing: Vec<String>,
    pub staged: usize,
    pub held: usize,
}

/// A target instance, with its admin key.
#[derive(Clone)]
pub struct PeerClient {
    peer: Peer,
    http: reqwest::Client,
}

impl PeerClient {
    pub fn new(peer: Peer, http: reqwest::Client) -> Self {
        Self { peer, http }
    }

    pub fn url(&self) -> &str {
        &self.peer.url
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.peer.url));
        match &self.peer.admin_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// The model and layout the target runs.
    pub async fn identity(&self) -> Result<PeerIdentity, PeerError> {
        let response = self
            .request(reqwest::Method::GET, "/admin/v1/identity")
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let response = self.check(response).await?;
        response.json().await.map_err(|e| self.unreachable(e))
    }

    /// Streams a snapshot file to the target, which verifies it and commits it durably before
    /// answering 200. `checksum` is blake3 of `snapshot`; `sent` is told every piece's size as
    /// it goes; `rate` (bytes per second, 0 for none) paces the pieces.
    #[allow(clippy::too_many_arguments)]
    pub async fn send(
        &self,
        session: Uuid,
        snapshot: Bytes,
        checksum: &str,
        owner: Option<&str>,
        created_ms: u64,
        rate: f64,
        sent: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<(), PeerError> {
        let total = snapshot.len();
        // The whole exchange, the target's verify and fsync included, at the slowest expected
        // rate twice over: a stalled peer fails, a slow one does not.
        let expected = total as f64 / if rate > 0.0 { rate } else { SLOWEST_RATE };
        let timeout = Duration::from_secs_f64(60.0 + 2.0 * expected);
        let started = Instant::now();
        let sent = std::sync::Arc::new(sent);
        let pieces = futures::stream::unfold(0usize, move |offset| {
            let piece = snapshot.slice(offset..total.min(offset + PIECE_BYTES));
            let end = offset + piece.len();
            let sent = sent.clone();
            let length = piece.len() as u64;
            async move {
                if piece.is_empty() {
                    return None;
                }
                if rate > 0.0 {
                    let due = Duration::from_secs_f64(offset as f64 / rate);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                sent(length);
                Some((Ok::<_, std::io::Error>(piece), end))
            }
        });
        let mut request = self
            .request(
                reqwest::Method::PUT,
                &format!("/admin/v1/sessions/{session}/import"),
            )
            .timeout(timeout)
            .header(CHECKSUM_HEADER, checksum)
            .header(CREATED_HEADER, created_ms.to_string())
            .body(reqwest::Body::wrap_stream(pieces));
        if let Some(owner) = owner {
            request = request.header(OWNER_HEADER, owner);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        self.check(response).await?;
        Ok(())
    }

    /// Offers `session` page by page: `manifest` is its manifest, `checksum` blake3 of the
    /// snapshot file it assembles to. `None` when the target predates page transfers (it
    /// takes whole snapshots only).
    pub async fn offer(
        &self,
        session: Uuid,
        manifest: Bytes,
        checksum: &str,
        owner: Option<&str>,
        created_ms: u64,
    ) -> Result<Option<IncomingAnswer>, PeerError> {
        let mut request = self
            .request(
                reqwest::Method::PUT,
                &format!("/admin/v1/sessions/{session}/incoming"),
            )
            .timeout(SHORT_TIMEOUT)
            .header(CHECKSUM_HEADER, checksum)
            .header(CREATED_HEADER, created_ms.to_string())
            .body(manifest);
        if let Some(owner) = owner {
            request = request.header(OWNER_HEADER, owner);
        }
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        if matches!(
            response.status(),
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
        ) {
            return Ok(None);
        }
        let response = self.check(response).await?;
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| self.unreachable(e))
    }

    /// Sends one page of a conversation offered with `offer`; `timeout` covers the whole
    /// exchange.
    pub async fn send_page(
        &self,
        session: Uuid,
        page: &str,
        bytes: Bytes,
        timeout: Duration,
    ) -> Result<(), PeerError> {
        let response = self
            .request(
                reqwest::Method::PUT,
                &format!("/admin/v1/sessions/{session}/incoming/pages/{page}"),
            )
            .timeout(timeout)
            .body(bytes)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.check(response).await?;
        Ok(())
    }

    /// Asks the target to put an offered conversation together, verify it and commit it with
    /// fsync; it answers once that is done.
    pub async fn commit(&self, session: Uuid, timeout: Duration) -> Result<(), PeerError> {
        let response = self
            .request(
                reqwest::Method::POST,
                &format!("/admin/v1/sessions/{session}/incoming/commit"),
            )
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.check(response).await?;
        Ok(())
    }

    /// The checksum of the target's stored snapshot of `session`; `None` if it has none (or
    /// its copy has changed since). Asked when a transfer's outcome is unclear.
    pub async fn stored_checksum(&self, session: Uuid) -> Result<Option<String>, PeerError> {
        let response = self
            .request(reqwest::Method::GET, &format!("/v1/sessions/{session}"))
            .timeout(SHORT_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let info: serde_json::Value = self
            .check(response)
            .await?
            .json()
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(info["checksum"].as_str().map(str::to_string))
    }

    /// A transfer that failed on this side, before or between exchanges: the conversation
    /// stays here.
    pub fn failed(&self, reason: String) -> PeerError {
        PeerError::Unreachable {
            url: self.peer.url.clone(),
            reason,
        }
    }

    fn unreachable(&self, error: reqwest::Error) -> PeerError {
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason = format!("{reason}: {cause}");
            source = cause.source();
        }
        PeerError::Unreachable {
            url: self.peer.url.clone(),
            reason,
        }
    }

    /// Passes a success through; turns an error answer into its sentence.
    async fn check(&self, response: reqwest::Response) -> Result<reqwest::Response, PeerError> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let message = crate::wire::error_sentence(response).await;
        Err(PeerError::Refused {
            url: self.peer.url.clone(),
            status,
            message,
        })
    }
}
