//! The HTTP client behind the admin CLI: the same API any other client uses.

use std::time::Duration;

use anyhow::{Context, bail};
use axum::body::Bytes;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

/// A daemon's base URL and the key to present to it.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_string();
        reqwest::Url::parse(&base)
            .with_context(|| format!("{base:?} is not a URL; write it as http://host:port"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Show where a conversation moved instead of silently following it.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { base, key, http })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// Sends `request`; an error answer becomes the server's own sentence.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let message = crate::wire::error_sentence(response).await;
        match location {
            Some(location) if status.is_redirection() => {
                bail!("{message} (now at {location})")
            }
            _ => bail!("{message} ({} {})", status.as_u16(), reason(status)),
        }
    }

    pub async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        let response = self.send(request).await?;
        response.json().await.with_context(|| {
            format!(
                "{} answered something that is not the expected JSON",
                self.base
            )
        })
    }

    /// Downloads a body with a progress bar of its bytes.
    pub async fn download(&self, request: RequestBuilder, what: &str) -> anyhow::Result<Vec<u8>> {
        let response = self.send(request).await?;
        let bar = bytes_bar(response.content_length().unwrap_or(0), what);
        let mut bytes = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.context("the download broke off before its end")?;
            bytes.extend_from_slice(&piece);
            bar.inc(piece.len() as u64);
        }
        bar.finish_and_clear();
        Ok(bytes)
    }

    /// A body that advances a progress bar as it is sent.
    pub fn upload_body(bytes: Vec<u8>, what: &str) -> reqwest::Body {
        let bar = bytes_bar(bytes.len() as u64, what);
        let bytes = Bytes::from(bytes);
        let total = bytes.len();
        let pieces = futures::stream::iter((0..total).step_by(1 << 20).map(move |start| {
            let piece = bytes.slice(start..total.min(start + (1 << 20)));
            bar.inc(piece.len() as u64);
            if bar.position() >= total as u64 {
                bar.finish_and_clear();
            }
            Ok::<_, std::io::Error>(piece)
        }));
        reqwest::Body::wrap_stream(pieces)
    }
}

fn reason(status: reqwest::StatusCode) -> &'static str {
    status.canonical_reason().unwrap_or("")
}

/// A bar of bytes on stderr; hidden when stderr is not a terminal.
fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
