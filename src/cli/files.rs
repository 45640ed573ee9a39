//! `kvsnap export`, `kvsnap import` and `kvsnap import-llama`: conversations to and from files.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use super::sessions::human_bytes;
use super::{Client, ServerArgs, write_file};
use crate::snapshot::{Snapshot, llama_file};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// kvsnap's snapshot file: self-describing, checksummed, verified on import
    Kvsnap,
    /// llama.cpp's `ggsq` v4 sequence state, for llama_state_seq_load_file and llama-server's
    /// /slots restore
    Llama,
}

/// Downloads conversation `id` into `output` (written whole or not at all).
pub async fn export(
    server: &ServerArgs,
    id: Uuid,
    output: &PathBuf,
    format: ExportFormat,
    sealed: bool,
) -> anyhow::Result<()> {
    let client = server.client()?;
    let name = match format {
        ExportFormat::Kvsnap => "kvsnap",
        ExportFormat::Llama => "llama",
    };
    let path = format!("/v1/sessions/{id}/export?format={name}&sealed={sealed}");
    let bytes = client
        .download(client.request(Method::GET, &path), "export")
        .await?;
    write_file(output, &bytes)?;
    println!(
        "wrote conversation {id} to {} ({}, {name} format{})",
        output.display(),
        human_bytes(bytes.len() as u64),
        if sealed { ", sealed" } else { "" }
    );
    Ok(())
}

/// Uploads a snapshot file as conversation `session` (a new id when `None`). The file's
/// checksum is checked here first; the daemon then verifies it completely before it commits.
pub async fn import(server: &ServerArgs, file: &Path, session: Option<Uuid>) -> anyhow::Result<()> {
    let bytes = read(file)?;
    if is_llama_file(&bytes, llama_file::SEQ_MAGIC)
        || is_llama_file(&bytes, llama_file::CONTEXT_MAGIC)
    {
        bail!(
            "{} is a llama.cpp state file, not a kvsnap snapshot; use `kvsnap import-llama`",
            file.display()
        );
    }
    // A sealed file is opened, and checked, by the daemon that holds its key.
    let tokens = if crate::keys::is_sealed_file(&bytes) {
        0
    } else {
        Snapshot::decode(&bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?
            .tokens
            .len()
    };
    let id = session.unwrap_or_else(Uuid::new_v4);
    let client = server.client()?;
    let request = client
        .request(Method::PUT, &format!("/v1/sessions/{id}/snapshot"))
        .body(Client::upload_body(bytes, "import"));
    let info: Value = client.json(request).await?;
    println!(
        "imported {} as conversation {id} ({} tokens, model {})",
        file.display(),
        info["tokens"].as_u64().unwrap_or(tokens as u64),
        info["model"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// Uploads a llama.cpp `ggsq` file (v3 or v4) as a conversation; needs an admin key.
pub async fn import_llama(
    server: &ServerArgs,
    file: &Path,
    session: Option<Uuid>,
) -> anyhow::Result<()> {
    let bytes = read(file)?;
    if !is_llama_file(&bytes, llama_file::SEQ_MAGIC) {
        bail!(
            "{} is not a llama.cpp sequence state file (ggsq); `kvsnap inspect` tells what it is",
            file.display()
        );
    }
    let client = server.client()?;
    let path = match session {
        Some(id) => format!("/admin/v1/import/llama?session_id={id}"),
        None => "/admin/v1/import/llama".to_string(),
    };
    let request = client
        .request(Method::POST, &path)
        .body(Client::upload_body(bytes, "import"));
    let info: Value = client.json(request).await?;
    println!(
        "imported {} as conversation {} ({} tokens)",
        file.display(),
        info["session_id"].as_str().unwrap_or("?"),
        info["tokens"].as_u64().unwrap_or(0)
    );
    Ok(())
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

/// llama.cpp writes its magic as a little-endian `u32`.
fn is_llama_file(bytes: &[u8], magic: u32) -> bool {
    bytes.starts_with(&magic.to_le_bytes())
}
