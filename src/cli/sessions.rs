//! `kvsnap sessions ls|show|rm`, and `kvsnap fork`.

use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use super::ServerArgs;
use crate::clock::now_ms;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum SessionsCommand {
    /// List conversations, most recently used first.
    Ls {
        /// Most conversations to list
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print the API's JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Describe one conversation: state, tokens, bytes, model, timestamps.
    Show {
        id: Uuid,
        /// Print the API's JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a conversation and its stored snapshot.
    Rm { id: Uuid },
    /// What the store holds: its page bytes against the storage budget, and how many unnamed
    /// entries (states of requests that named no conversation, dropped first past the budget).
    /// Needs an admin key.
    Usage {
        /// Print the API's JSON
        #[arg(long)]
        json: bool,
    },
}

pub async fn sessions(server: &ServerArgs, command: SessionsCommand) -> anyhow::Result<()> {
    let client = server.client()?;
    match command {
        SessionsCommand::Ls { limit, json } => {
            let path = format!("/v1/sessions?limit={}", limit.clamp(1, 1000));
            let list: Value = client.json(client.request(Method::GET, &path)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            let rows = list["data"].as_array().cloned().unwrap_or_default();
            println!(
                "{:<36}  {:<8}  {:>7}  {:>10}  LAST USED",
                "SESSION", "STATE", "TOKENS", "BYTES"
            );
            for row in &rows {
                println!(
                    "{:<36}  {:<8}  {:>7}  {:>10}  {}",
                    row["session_id"].as_str().unwrap_or("?"),
                    row["state"].as_str().unwrap_or("?"),
                    row["tokens"].as_u64().unwrap_or(0),
                    human_bytes(row["bytes"].as_u64().unwrap_or(0)),
                    age(row["last_used_ms"].as_u64().unwrap_or(0)),
                );
            }
            eprintln!("{} conversation(s) on {}", rows.len(), client.base());
        }
        SessionsCommand::Show { id, json } => {
            let info: Value = client
                .json(client.request(Method::GET, &format!("/v1/sessions/{id}")))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(());
            }
            for key in ["session_id", "state", "tokens", "bytes", "model"] {
                println!("{key:<12} {}", plain(&info[key]));
            }
            for key in ["created_ms", "last_used_ms"] {
                let ms = info[key].as_u64().unwrap_or(0);
                println!("{:<12} {ms} ({})", key.trim_end_matches("_ms"), age(ms));
            }
            if let Some(reason) = info["damaged"].as_str() {
                println!("{:<12} {reason}", "damaged");
            }
        }
        SessionsCommand::Usage { json } => {
            let usage: Value = client
                .json(client.request(Method::GET, "/admin/v1/store"))
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&usage)?);
                return Ok(());
            }
            let budget = usage["budget_bytes"].as_u64().unwrap_or(0);
            println!(
                "pages           {}",
                human_bytes(usage["page_bytes"].as_u64().unwrap_or(0))
            );
            if budget == 0 {
                println!("budget          none");
            } else {
                println!("budget          {}", human_bytes(budget));
            }
            println!(
                "unnamed entries {}",
                usage["unnamed_entries"].as_u64().unwrap_or(0)
            );
        }
        SessionsCommand::Rm { id } => {
            client
                .send(client.request(Method::DELETE, &format!("/v1/sessions/{id}")))
                .await?;
            println!("deleted conversation {id}");
        }
    }
    Ok(())
}

/// `kvsnap fork ID [--into NEW_ID]`: prints the new conversation's id.
pub async fn fork(server: &ServerArgs, id: Uuid, into: Option<Uuid>) -> anyhow::Result<()> {
    let client = server.client()?;
    let body = match into {
        Some(into) => serde_json::json!({ "session_id": into }),
        None => serde_json::json!({}),
    };
    let forked: Value = client
        .json(
            client
                .request(Method::POST, &format!("/v1/sessions/{id}/fork"))
                .json(&body),
        )
        .await?;
    let new = plain(&forked["session_id"]);
    eprintln!(
        "forked conversation {id} into {new} ({} tokens, every stored page shared)",
        forked["tokens"].as_u64().unwrap_or(0)
    );
    println!("{new}");
    Ok(())
}

fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// "3.2 MB", for people; the JSON output keeps exact numbers.
pub(super) fn human_bytes(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < units.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

fn age(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let seconds = now_ms().saturating_sub(ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s ago"),
        60..3600 => format!("{}m ago", seconds / 60),
        3600..86400 => format!("{}h ago", seconds / 3600),
        _ => format!("{}d ago", seconds / 86400),
    }
}
