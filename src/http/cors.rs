//! Cross-origin requests, answered as llama-server answers them, so a browser frontend written
//! for llama-server works here: a preflight (`OPTIONS`, any path) gets 200 without an API key
//! (browsers send none), and every answer names the request's origin in
//! `Access-Control-Allow-Origin` when that origin is allowed.
//!
//! Allowed origins (`--cors-origins`): `localhost` (the default: pages served from this machine,
//! any port), `*` (any origin), or a comma-separated list of exact origins. A page from any other
//! origin still reaches the server, but its browser withholds the answer from it.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

/// Which origins may read kvsnap's answers in a browser.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Origins {
    /// `http(s)://localhost`, `127.0.0.1` or `[::1]`, any port.
    Localhost,
    Any,
    /// Exact origins, as browsers send them (`https://chat.example.com`).
    Listed(Vec<String>),
}

impl Origins {
    /// Parses `--cors-origins`; a sentence for a value no browser could send.
    pub fn parse(text: &str) -> Result<Origins, String> {
        match text.trim() {
            "localhost" => Ok(Origins::Localhost),
            "*" => Ok(Origins::Any),
            list => {
                let origins: Vec<String> = list
                    .split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_string())
                    .filter(|o| !o.is_empty())
                    .collect();
                if origins.is_empty() {
                    return Err(
                        "cors-origins needs `localhost`, `*` or a list of origins such \
                                as https://chat.example.com"
                            .into(),
                    );
                }
                Ok(Origins::Listed(origins))
            }
        }
    }

    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::Localhost => is_localhost(origin),
            Origins::Listed(list) => list.iter().any(|o| o == origin),
        }
    }
}

impl TryFrom<String> for Origins {
    type Error = String;

    fn try_from(text: String) -> Result<Origins, String> {
        Origins::parse(&text)
    }
}

/// Whether the origin's host is this machine, whatever its scheme and port (a bare
/// `localhost` counts too). `localhost.evil.com` and `notlocalhost` do not.
fn is_localhost(origin: &str) -> bool {
    let with_scheme = if origin.contains("://") {
        origin.to_string()
    } else {
        format!("http://{origin}")
    };
    let Ok(url) = url::Url::parse(&with_scheme) else {
        return false;
    };
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Answers preflights before any key check, names the allowed origin on every answer, and
/// refuses requests from pages of other origins.
///
/// A browser sends some cross-origin requests without a preflight (a `text/plain` POST is a
/// "simple" request), and withholds only the answer from the page: the request itself would
/// run (a turn generated, a conversation deleted). Every browser names the page's origin in
/// `Origin`, so a request that carries one not allowed is refused before it runs; clients that
/// are not browsers send none.
pub async fn answer(State(origins): State<Arc<Origins>>, request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).cloned();
    let allowed = origin
        .clone()
        .filter(|value| value.to_str().is_ok_and(|origin| origins.allows(origin)));
    let mut response = if request.method() == Method::OPTIONS {
        preflight()
    } else if let (Some(origin), None) = (&origin, &allowed) {
        super::error::ApiError::forbidden(format!(
            "pages from {} may not use this server; allow their origin with --cors-origins",
            origin.to_str().unwrap_or("an unreadable origin")
        ))
        .into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = allowed {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    }
    response
}

/// What a preflight gets, for any path: the methods and headers kvsnap accepts.
fn preflight() -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    (StatusCode::OK, headers).into_response()
}

#[cfg(test)]
mod tests {
    use super::{Origins, is_localhost};

    #[test]
    fn localhost_means_this_machine_at_any_port() {
        for origin in [
            "http://localhost",
            "http://localhost:8080",
            "https://127.0.0.1:3000",
            "http://[::1]",
            "http://[::1]:3000",
            "localhost",
        ] {
            assert!(is_localhost(origin), "{origin}");
        }
        for origin in [
            "http://web.mydomain.fr",
            "http://evil.com",
            "http://notlocalhost",
            "http://localhost.evil.com",
            "null",
            "",
        ] {
            assert!(!is_localhost(origin), "{origin}");
        }
    }

    #[test]
    fn origins_parse_from_the_flag() {
        assert_eq!(Origins::parse("localhost"), Ok(Origins::Localhost));
        assert_eq!(Origins::parse("*"), Ok(Origins::Any));
        assert_eq!(
            Origins::parse("https://a.example, https://b.example/"),
            Ok(Origins::Listed(vec![
                "https://a.example".into(),
                "https://b.example".into()
            ]))
        );
        assert!(Origins::parse(" , ").is_err());
        assert!(Origins::Listed(vec!["https://a.example".into()]).allows("https://a.example"));
        assert!(!Origins::Listed(vec!["https://a.example".into()]).allows("https://b.example"));
    }
}
