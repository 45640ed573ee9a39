//! `kvsnap audit`: the daemon's audit trail of admin actions, oldest first.

use reqwest::Method;
use serde_json::Value;

use super::ServerArgs;

/// Entries the daemon hands back per request (its most).
const PAGE: u64 = 1000;

/// Prints the trail's entries after `after` (all of them, page by page, unless `limit`), one
/// per line, or the API's JSON entries with `json`.
pub async fn audit(
    server: &ServerArgs,
    after: u64,
    limit: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let client = server.client()?;
    let mut after = after;
    let mut left = limit.unwrap_or(u64::MAX);
    let mut printed = 0u64;
    if !json {
        println!(
            "{:>6}  {:<24}  {:<16}  {:<14}  {:<36}  OUTCOME",
            "SEQ", "TIME (UTC)", "ACTOR", "ACTION", "TARGET"
        );
    }
    while left > 0 {
        let path = format!("/admin/v1/audit?after={after}&limit={}", left.min(PAGE));
        let page: Value = client.json(client.request(Method::GET, &path)).await?;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            break;
        }
        for entry in &entries {
            if json {
                println!("{entry}");
            } else {
                println!("{}", line(entry));
            }
        }
        printed += entries.len() as u64;
        left = left.saturating_sub(entries.len() as u64);
        after = page["next_after"].as_u64().unwrap_or(after);
    }
    eprintln!(
        "{printed} audit entr{} on {}",
        if printed == 1 { "y" } else { "ies" },
        client.base()
    );
    Ok(())
}

fn line(entry: &Value) -> String {
    let text = |key: &str| entry[key].as_str().unwrap_or("").to_string();
    let actor = text("actor");
    // A key's hash is 64 hex digits; its first 12 tell keys apart in a table.
    let actor_short: String = actor.chars().take(16).collect();
    let mut outcome = text("outcome");
    if let Some(detail) = entry["detail"].as_str() {
        outcome = format!("{outcome} ({detail})");
    }
    format!(
        "{:>6}  {:<24}  {:<16}  {:<14}  {:<36}  {outcome}",
        entry["sequence"].as_u64().unwrap_or(0),
        utc(entry["at_ms"].as_u64().unwrap_or(0)),
        actor_short,
        text("action"),
        text("target"),
    )
}

/// Milliseconds since the epoch as an RFC 3339 UTC time, to the millisecond.
fn utc(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_796_226_180_250), "2026-12-02T15:43:00.250Z");
    }
}
