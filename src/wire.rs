//! What a client of kvsnap's HTTP API reads off its answers, shared by the CLI and by
//! migration's peer client so that neither reaches into `http/`.

/// The sentence of an error answer (`{"error": {"message": ...}}`, as `http/error.rs` writes
/// it); the status line when the body is not one.
pub async fn error_sentence(response: reqwest::Response) -> String {
    let status = response.status();
    response
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|body| body["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.to_string())
}
