//! `kvsnap migrate --from URL --to URL (--session ID... | --all) [--dry-run]`.

use std::time::{Duration, Instant};

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use serde_json::json;
use uuid::Uuid;

use super::Client;
use super::sessions::human_bytes;
use crate::migrate::report::{JobStatus, Plan};

#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The instance the conversations are on now (its base URL)
    #[arg(long, env = "KVSNAP_SERVER")]
    pub from: String,
    /// The instance to move them to; the source must list it as a peer (--peer URL=KEY)
    #[arg(long)]
    pub to: String,
    /// A conversation to move; repeat for several
    #[arg(
        long = "session",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub sessions: Vec<Uuid>,
    /// Move every conversation on the source
    #[arg(long)]
    pub all: bool,
    /// Only list what would move and what would be refused, and why
    #[arg(long)]
    pub dry_run: bool,
    /// The source's admin key [default: none]
    #[arg(long, env = "KVSNAP_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

/// Returns whether every conversation moved (or, for a dry run, would).
pub async fn migrate(args: &MigrateArgs) -> anyhow::Result<bool> {
    let client = Client::new(&args.from, args.key.clone())?;
    let body = if args.all {
        json!({ "target": args.to, "all": true, "dry_run": args.dry_run })
    } else {
        json!({ "target": args.to, "sessions": args.sessions, "dry_run": args.dry_run })
    };
    let request = client
        .request(Method::POST, "/admin/v1/migrate")
        .json(&body);
    if args.dry_run {
        let plan: Plan = client.json(request).await?;
        print_plan(&plan, client.base());
        return Ok(plan.refused.is_empty());
    }
    let started: JobStatus = client.json(request).await?;
    let finished = follow(&client, started).await?;
    print_summary(&finished);
    Ok(finished.failures.is_empty() && finished.error.is_none())
}

fn print_plan(plan: &Plan, source: &str) {
    let bytes: u64 = plan.would_move.iter().map(|m| m.bytes).sum();
    println!(
        "dry run: {} conversation(s) would move from {source} to {} ({} stored; resident ones \
         are snapshotted as they go)",
        plan.would_move.len(),
        plan.target,
        human_bytes(bytes)
    );
    for planned in &plan.would_move {
        println!(
            "  move    {}  {:<8} {:>7} tokens  {:>10}  {}",
            planned.session_id,
            planned.state,
            planned.tokens,
            human_bytes(planned.bytes),
            if planned.bit_exact {
                "bit-exact"
            } else {
                "NOT bit-exact"
            }
        );
    }
    let inexact: Vec<_> = plan.would_move.iter().filter(|m| !m.bit_exact).collect();
    if let Some(first) = inexact.first() {
        println!(
            "{} would continue on the target with other numerics ({}): {}",
            inexact.len(),
            plan.target_compute_profile
                .as_deref()
                .unwrap_or("the target names no compute profile"),
            first.exactness.as_deref().unwrap_or("")
        );
    }
    if !plan.refused.is_empty() {
        println!("{} would be refused:", plan.refused.len());
        for refusal in &plan.refused {
            println!("  refuse  {}  {}", refusal.session_id, refusal.reason);
        }
    }
}

/// Polls the job until it finishes, drawing sessions and bytes on a progress bar.
async fn follow(client: &Client, mut status: JobStatus) -> anyhow::Result<JobStatus> {
    let bar = ProgressBar::new(status.sessions_total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} conversations  {msg}  {elapsed}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let path = format!("/admin/v1/jobs/{}", status.job_id);
    loop {
        bar.set_position(status.sessions_done as u64);
        let rate = status.bytes_done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        bar.set_message(format!(
            "{} sent, {}/s, {} failed",
            human_bytes(status.bytes_done),
            human_bytes(rate as u64),
            status.failures.len()
        ));
        if status.state == "finished" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        status = match client.json(client.request(Method::GET, &path)).await {
            Ok(status) => status,
            Err(error) => {
                bar.abandon();
                bail!("lost track of job {}: {error:#}", status.job_id)
            }
        };
    }
    bar.finish_and_clear();
    Ok(status)
}

fn print_summary(status: &JobStatus) {
    let seconds = status
        .finished_ms
        .unwrap_or(status.started_ms)
        .saturating_sub(status.started_ms) as f64
        / 1e3;
    let rate = status.bytes_done as f64 / seconds.max(1e-3);
    println!(
        "moved {} of {} conversation(s) to {} in {seconds:.1} s: {} at {}/s, {:.1} conversations/s",
        status.sessions_moved,
        status.sessions_total,
        status.target,
        human_bytes(status.bytes_done),
        human_bytes(rate as u64),
        status.sessions_moved as f64 / seconds.max(1e-3)
    );
    if let Some(error) = &status.error {
        println!("the job ended early: {error}");
    }
    if !status.failures.is_empty() {
        println!(
            "{} failed (they stay on the source; run the same command again to retry):",
            status.failures.len()
        );
        for failure in &status.failures {
            println!("  {}  {}", failure.session_id, failure.reason);
        }
    }
}
