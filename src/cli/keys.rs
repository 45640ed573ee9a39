//! `kvsnap keys new|rotate` (the key file, written here, owner-only) and `kvsnap rekey` (a
//! running daemon seals everything again with the key file's current key).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use reqwest::Method;
use serde_json::Value;

use super::ServerArgs;
use crate::keys::KeyFile;

/// Writes a new key file with fresh random keys; never overwrites one.
pub fn new_key_file(path: &Path) -> anyhow::Result<()> {
    KeyFile::generate()?.write(path, false)?;
    println!(
        "wrote {} (owner-only). Start kvsnap with --encryption-key-file {} and keep a copy \
         somewhere safe: without it nothing stored can be read.",
        path.display(),
        path.display()
    );
    Ok(())
}

/// Adds a fresh key to the key file and makes it current; the old keys stay to open what
/// they sealed.
pub fn rotate_key_file(path: &Path) -> anyhow::Result<()> {
    let mut file = KeyFile::read(path)?;
    let id = file.rotate()?;
    file.write(path, true)?;
    println!(
        "added key {id} to {} and made it current. Run `kvsnap rekey` against each daemon \
         using the file; remove the older keys only after it has finished.",
        path.display()
    );
    Ok(())
}

/// Asks the daemon to reload its key file and seal everything again with the current key,
/// then follows its progress until the pass ends.
pub async fn rekey(server: &ServerArgs) -> anyhow::Result<()> {
    let client = server.client()?;
    let started: Value = client
        .json(client.request(Method::POST, "/admin/v1/rekey"))
        .await?;
    eprintln!(
        "sealing everything on {} with key {}",
        client.base(),
        started["current_key"].as_str().unwrap_or("?")
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} values")
            .context("a progress template")?
            .progress_chars("=> "),
    );
    loop {
        let status: Value = client
            .json(client.request(Method::GET, "/admin/v1/rekey"))
            .await?;
        let count = |part: &str, field: &str| status[part][field].as_u64().unwrap_or(0);
        let in_bucket =
            status["bucket"].is_object() && count("store", "done") >= count("store", "found");
        let part = if in_bucket { "bucket" } else { "store" };
        bar.set_message(if in_bucket { "bucket" } else { "store " });
        bar.set_length(count(part, "found"));
        bar.set_position(count(part, "done"));
        match status["state"].as_str() {
            Some("running") => tokio::time::sleep(Duration::from_millis(200)).await,
            Some("done") => {
                bar.finish_and_clear();
                let bucket = if status["bucket"].is_object() {
                    format!(", {} in the bucket", count("bucket", "done"))
                } else {
                    String::new()
                };
                println!(
                    "done: {} stored values sealed again{bucket}; everything is sealed with key {}",
                    count("store", "done"),
                    status["current_key"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            _ => {
                bar.abandon();
                anyhow::bail!(
                    "the rotation stopped: {}; run `kvsnap rekey` again to finish it",
                    status["error"].as_str().unwrap_or("no reason given")
                );
            }
        }
    }
}
