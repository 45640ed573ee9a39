//! The `Host` a request names must be one this server answers to.
//!
//! A web page can point a name it controls at 127.0.0.1 (DNS rebinding); its browser then sends
//! the page's own scripts to kvsnap as same-origin requests, `Host: evil.example`, and the page
//! reads every answer. Names are therefore refused unless they are this machine's (`localhost`)
//! or listed (`--allowed-hosts`, plus the host of `--advertise-url`); an IP address is always
//! fine, since no page can rebind one.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The host names this server answers to, beside IP addresses and `localhost`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum AllowedHosts {
    /// Any name (behind a proxy that checks names itself).
    Any,
    /// These names, compared without case or port.
    Listed(Vec<String>),
}

impl Default for AllowedHosts {
    fn default() -> Self {
        AllowedHosts::Listed(Vec::new())
    }
}

impl AllowedHosts {
    /// Parses `--allowed-hosts`: `*`, or names separated by commas.
    pub fn parse(text: &str) -> Result<AllowedHosts, String> {
        if text.trim() == "*" {
            return Ok(AllowedHosts::Any);
        }
        let names = text
            .split(',')
            .map(|name| name.trim().to_ascii_lowercase())
            .filter(|name| !name.is_empty())
            .collect();
        Ok(AllowedHosts::Listed(names))
    }

    /// The same list with one more name (the advertised URL's host).
    pub fn with(self, name: Option<&str>) -> AllowedHosts {
        match (self, name) {
            (AllowedHosts::Listed(mut names), Some(name)) => {
                names.push(name.to_ascii_lowercase());
                AllowedHosts::Listed(names)
            }
            (hosts, _) => hosts,
        }
    }

    /// Whether a `Host` header's value names this server.
    pub fn allows(&self, host: &str) -> bool {
        let Ok(authority) = host.parse::<axum::http::uri::Authority>() else {
            return false;
        };
        let name = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if name.parse::<std::net::IpAddr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        match self {
            AllowedHosts::Any => true,
            AllowedHosts::Listed(names) => names.contains(&name),
        }
    }
}

impl TryFrom<String> for AllowedHosts {
    type Error = String;

    fn try_from(text: String) -> Result<AllowedHosts, String> {
        AllowedHosts::parse(&text)
    }
}

/// Refuses a request whose `Host` names another server. A request without one (HTTP/1.0, no
/// browser) goes on.
pub async fn check(
    State(hosts): State<Arc<AllowedHosts>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(host) = request.headers().get(header::HOST) {
        let named = host.to_str().unwrap_or("");
        if !hosts.allows(named) {
            return ApiError::forbidden(format!(
                "this server does not answer to the host name {named:?}; reach it by IP \
                     address or localhost, or start it with --allowed-hosts {}",
                named.split(':').next().unwrap_or(named)
            ))
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::AllowedHosts;

    #[test]
    fn addresses_and_localhost_always_pass_other_names_only_when_listed() {
        let hosts = AllowedHosts::default().with(Some("kvsnap.internal"));
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.1.2.3:80",
            "localhost",
            "LOCALHOST:3000",
            "app.localhost",
            "kvsnap.internal:8080",
            "KVSNAP.internal",
        ] {
            assert!(hosts.allows(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "",
            "a b",
        ] {
            assert!(!hosts.allows(host), "{host}");
        }
        assert!(AllowedHosts::parse("*").unwrap().allows("evil.example"));
        assert!(
            AllowedHosts::parse("chat.example.com, other.example")
                .unwrap()
                .allows("Chat.Example.com:443")
        );
    }
}
