//! `make bench`: what a stored conversation costs and saves, each figure beside its baseline
//! measured in the same run.
//!
//! - time to first token of the next turn: resumed from the store (after a restart) vs the same
//!   prompt re-read on a fresh conversation;
//! - save and restore MB/s vs this disk's own fsync'd sequential write;
//! - snapshot bytes per token vs llama.cpp's raw sequence state;
//! - kvsnap's restore (store read, checks, llama.cpp load) vs llama.cpp's own
//!   `llama_state_seq_load_file` of the same state;
//! - then, at 2,048 tokens, each real model and cache type side by side (issue 31): bytes per
//!   token, bytes a 64-token turn writes against the rows it adds, restore vs llama.cpp's load,
//!   resume vs re-read.
//!
//! The llama.cpp baselines load the model in this process with the daemon's context settings;
//! this measuring code is the only place outside `src/engine/` that calls llama.cpp.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::num::NonZeroU32;
use std::time::Instant;

use common::{Daemon, first_token, long_prose};
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;
use serde_json::{Value, json};
use uuid::Uuid;

/// Restarts (the cold figures) are slow: 3 of them. Saves and warm restores are cheap and this
/// machine is noisy: 9.
const REPEATS: usize = 3;
const QUICK_REPEATS: usize = 9;
const ARGS: [&str; 6] = ["-c", "16384", "-np", "2", "-t", "2"];
const HISTORIES: [usize; 3] = [512, 2048, 4096];
/// The history of the model and cache type table.
const SETUP_HISTORY: usize = 2048;
/// Tokens of the turn whose written bytes are counted.
const TURN_TOKENS: u64 = 64;

/// A model and cache type, as the daemon and the in-process llama.cpp baseline both run it.
struct Setup {
    name: &'static str,
    model: std::path::PathBuf,
    /// `-ctk`/`-ctv` name; a quantized V runs with flash attention, as llama.cpp requires.
    cache_type: &'static str,
}

impl Setup {
    fn quantized(&self) -> bool {
        self.cache_type != "f16"
    }

    fn daemon_args(&self) -> Vec<&'static str> {
        let mut args = ARGS.to_vec();
        if self.quantized() {
            args.extend([
                "-fa",
                "on",
                "-ctk",
                self.cache_type,
                "-ctv",
                self.cache_type,
            ]);
        }
        args
    }

    fn llama_type(&self) -> KvCacheType {
        match self.cache_type {
            "f16" => KvCacheType::F16,
            "q8_0" => KvCacheType::Q8_0,
            "q4_0" => KvCacheType::Q4_0,
            other => panic!("no baseline for cache type {other}"),
        }
    }
}

/// Every setup; the tiny hybrid (LFM2 with random weights: a cache, then a recurrent state) is
/// written into `dir`.
fn setups(dir: &std::path::Path) -> Vec<Setup> {
    let gemma = common::model_path();
    let smollm2 = common::smollm2_path();
    let hybrid = common::tiny_model("lfm2", dir);
    let setup = |name, model: &std::path::Path, cache_type| Setup {
        name,
        model: model.to_path_buf(),
        cache_type,
    };
    vec![
        setup("gemma3-270m", &gemma, "f16"),
        setup("gemma3-270m", &gemma, "q8_0"),
        setup("gemma3-270m", &gemma, "q4_0"),
        setup("smollm2-135m", &smollm2, "f16"),
        setup("smollm2-135m", &smollm2, "q8_0"),
        setup("smollm2-135m", &smollm2, "q4_0"),
        setup("tiny-lfm2", &hybrid, "f16"),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mb_per_s(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds
}

/// A prose prompt of about `tokens` tokens (this prose is ~1.1 tokens a word).
fn history(tokens: usize) -> String {
    long_prose(tokens * 10 / 11).trim_end().to_string()
}

/// Sum and count of a Prometheus summary, from `/metrics`.
async fn metric_mean(d: &Daemon, name: &str) -> Option<f64> {
    let (sum, count) = metric_sum_count(d, name).await?;
    Some(sum / count)
}

async fn metric_sum_count(d: &Daemon, name: &str) -> Option<(f64, f64)> {
    let text = d
        .client
        .get(d.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
    };
    Some((value("sum")?, value("count")?))
}

async fn timed(d: &Daemon, path: &str, body: Value) -> (f64, Value) {
    let started = Instant::now();
    let reply = d.ok(path, body).await;
    (started.elapsed().as_secs_f64(), reply)
}

struct KvsnapFigures {
    tokens: u64,
    snapshot_bytes: u64,
    resumed_ttft: f64,
    reread_ttft: f64,
    save_seconds: f64,
    /// The disk's fsync'd sequential write of the snapshot's size, MB/s.
    disk_rate: f64,
    restore_seconds: f64,
    warm_restore_seconds: f64,
    warm_resumed_ttft: f64,
    prompt_tokens: Vec<i32>,
    /// Page bytes a turn of `TURN_TOKENS` generated tokens wrote (on a fork of the history).
    turn_bytes: u64,
    /// Bytes of one position's rows in every cache that holds it (the snapshot's layout).
    row_bytes: u64,
    /// Bytes of the recurrent state's rows (recurrent and hybrid models; else 0).
    recurrent_bytes: u64,
}

async fn measure_kvsnap(setup: &Setup, target: usize, dir: &std::path::Path) -> KvsnapFigures {
    let data = dir.join(format!("bench-{target}-{}.redb", Uuid::new_v4()));
    let session = Uuid::new_v4().to_string();
    let text = history(target);
    let args = setup.daemon_args();
    let start = || {
        Daemon::try_start_model_on(dir, &data, &setup.model, &args)
            .unwrap_or_else(|log| panic!("the daemon did not start:\n{log}"))
    };
    let d = start();
    let first = d
        .ok(
            "/completion",
            json!({"prompt": text, "n_predict": 1, "temperature": 0,
                                  "session_id": session}),
        )
        .await;
    let tokens = first["tokens_evaluated"].as_u64().unwrap();
    let file = d
        .get_bytes(&format!("/v1/sessions/{session}/snapshot"))
        .await;
    let layout = kvsnap::snapshot::Snapshot::decode(&file)
        .expect("a downloaded snapshot decodes")
        .layout;
    let row_bytes = layout
        .caches
        .iter()
        .flat_map(|c| &c.layers)
        .map(|l| l.k_row_size + l.v_cell_size)
        .sum();
    let recurrent_bytes = layout.recurrent.as_ref().map_or(0, |r| r.row_bytes());
    let prompt_tokens: Vec<i32> = serde_json::from_value(
        d.ok("/tokenize", json!({"content": text, "add_special": true}))
            .await["tokens"]
            .clone(),
    )
    .unwrap();

    // Each save is followed by the disk's own write of as many bytes, so both figures see the
    // same moment of this (shared, noisy) disk.
    let mut saves = Vec::new();
    let mut disk_rates = Vec::new();
    let mut snapshot_bytes = 0;
    for _ in 0..QUICK_REPEATS {
        let (seconds, saved) = timed(&d, &format!("/v1/sessions/{session}/save"), json!({})).await;
        snapshot_bytes = saved["bytes"].as_u64().unwrap();
        saves.push(seconds);
        disk_rates.push(disk_fsync_write(dir, snapshot_bytes));
    }
    let mut rereads = Vec::new();
    // Ends mid-sentence so the first token is a word, streamed before the turn's save.
    let next = format!("{text} And then the");
    for _ in 0..REPEATS {
        let (seconds, _) = first_token(
            &d,
            json!({"prompt": next, "n_predict": 1, "temperature": 0, "cache_prompt": false}),
        )
        .await;
        rereads.push(seconds);
    }
    d.stop();

    // The next turn of the stored conversation: its time to first token, after checking the
    // history came from the snapshot.
    let resume = async |d: &Daemon| {
        let body = json!({"prompt": next, "n_predict": 1, "temperature": 0, "session_id": session});
        let (seconds, reply) = first_token(d, body).await;
        let cached = reply["timings"]["cache_n"].as_u64().unwrap();
        assert!(cached >= tokens - 1, "{reply}");
        seconds
    };
    let mut resumes = Vec::new();
    let mut restores = Vec::new();
    for _ in 0..REPEATS {
        // A fresh process: the conversation exists only in the store.
        let d = start();
        let seconds = resume(&d).await;
        resumes.push(seconds);
        restores.push(
            metric_mean(&d, "kvsnap_snapshot_restore_seconds")
                .await
                .unwrap(),
        );
        d.stop();
    }
    // A running daemon restoring the conversation again and again, as eviction churn does:
    // two short conversations take both sequences, then the long one comes back.
    let d = start();
    let fillers = [Uuid::new_v4().to_string(), Uuid::new_v4().to_string()];
    let (mut warm, mut warm_resumes) = (Vec::new(), Vec::new());
    for round in 0..=QUICK_REPEATS {
        for filler in &fillers {
            d.ok(
                "/completion",
                json!({"prompt": "A short conversation.", "n_predict": 1, "temperature": 0,
                       "session_id": filler}),
            )
            .await;
        }
        let (sum, count) = metric_sum_count(&d, "kvsnap_snapshot_restore_seconds")
            .await
            .unwrap_or((0.0, 0.0));
        let seconds = resume(&d).await;
        let (sum_after, count_after) = metric_sum_count(&d, "kvsnap_snapshot_restore_seconds")
            .await
            .unwrap();
        assert_eq!(count_after, count + 1.0, "one restore per return");
        // The first round warms the process up; it is not counted.
        if round > 0 {
            warm.push(sum_after - sum);
            warm_resumes.push(seconds);
        }
    }
    // A turn of `TURN_TOKENS` on a fork of the history: what it writes beyond the pages the
    // two share.
    let fork = d
        .ok(&format!("/v1/sessions/{session}/fork"), json!({}))
        .await;
    let written_before = d.metric("kvsnap_page_bytes_written_total").await;
    d.ok(
        "/completion",
        json!({"prompt": next, "n_predict": TURN_TOKENS, "temperature": 0, "ignore_eos": true,
               "session_id": fork["session_id"]}),
    )
    .await;
    let turn_bytes = (d.metric("kvsnap_page_bytes_written_total").await - written_before) as u64;
    d.stop();
    KvsnapFigures {
        warm_restore_seconds: median(warm),
        warm_resumed_ttft: median(warm_resumes),
        tokens,
        snapshot_bytes,
        resumed_ttft: median(resumes),
        reread_ttft: median(rereads),
        save_seconds: median(saves),
        disk_rate: median(disk_rates),
        restore_seconds: median(restores),
        prompt_tokens,
        turn_bytes,
        row_bytes,
        recurrent_bytes,
    }
}

/// llama.cpp's own file save and load of the same history, with the daemon's context settings.
struct LlamaFigures {
    raw_bytes: u64,
    /// Repeated in one context: memory already touched, like a running daemon's restores.
    load_seconds: f64,
    /// The first load into a newly made context, like a restarted daemon's first restore.
    fresh_load_seconds: f64,
}

fn measure_llama(
    backend: &LlamaBackend,
    model: &LlamaModel,
    setup: &Setup,
    tokens: &[i32],
    dir: &std::path::Path,
) -> LlamaFigures {
    let flash_attention = if setup.quantized() {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    };
    let params = || {
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(16384))
            .with_n_batch(2048)
            .with_n_ubatch(512)
            .with_n_seq_max(2)
            .with_n_threads(2)
            .with_n_threads_batch(2)
            .with_flash_attention_policy(flash_attention)
            .with_type_k(setup.llama_type())
            .with_type_v(setup.llama_type())
            .with_kv_unified(false)
    };
    let mut ctx = model.new_context(backend, params()).expect("context");
    let mut batch = LlamaBatch::new(2048, 1);
    for (start, chunk) in (0..).step_by(2048).zip(tokens.chunks(2048)) {
        batch.clear();
        for (i, &t) in chunk.iter().enumerate() {
            let last = start + i + 1 == tokens.len();
            batch
                .add(LlamaToken(t), (start + i) as i32, &[0], last)
                .unwrap();
        }
        ctx.decode(&mut batch).expect("decode");
    }
    let path = dir.join("llama.ggsq");
    let llama_tokens: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t)).collect();
    ctx.state_seq_save_file(&path, 0, &llama_tokens)
        .expect("save");
    let raw_bytes = std::fs::metadata(&path).unwrap().len() - 12 - 4 * tokens.len() as u64;
    let mut loads = Vec::new();
    for _ in 0..REPEATS {
        let _ = ctx.clear_kv_cache_seq(Some(1), None, None);
        let started = Instant::now();
        ctx.state_seq_load_file(&path, 1, tokens.len() + 16)
            .expect("load");
        loads.push(started.elapsed().as_secs_f64());
    }
    drop(ctx);
    let mut fresh_loads = Vec::new();
    for _ in 0..REPEATS {
        let mut ctx = model.new_context(backend, params()).expect("context");
        let started = Instant::now();
        ctx.state_seq_load_file(&path, 0, tokens.len() + 16)
            .expect("load");
        fresh_loads.push(started.elapsed().as_secs_f64());
    }
    LlamaFigures {
        raw_bytes,
        load_seconds: median(loads),
        fresh_load_seconds: median(fresh_loads),
    }
}

/// This disk's sequential write of `bytes` to a new file with one fdatasync (what a save of
/// that size must at least do), in the directory the stores use; MB/s.
fn disk_fsync_write(dir: &std::path::Path, bytes: u64) -> f64 {
    let chunk = vec![0x5au8; 1 << 20];
    let path = dir.join("disk-probe");
    let started = Instant::now();
    let mut file = std::fs::File::create(&path).unwrap();
    let mut left = bytes as usize;
    while left > 0 {
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    file.sync_data().unwrap();
    let rate = mb_per_s(bytes, started.elapsed().as_secs_f64());
    std::fs::remove_file(&path).unwrap();
    rate
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("bench dir on this disk");
    println!(
        "kvsnap snapshot benchmark: medians of {REPEATS} restarts, {QUICK_REPEATS} saves and warm returns; daemon {}",
        ARGS.join(" ")
    );
    let setups = setups(dir.path());
    let default = &setups[0];
    let mut rows = Vec::new();
    for target in HISTORIES {
        rows.push(measure_kvsnap(default, target, dir.path()).await);
    }
    let mut by_setup = Vec::new();
    for setup in &setups {
        by_setup.push(measure_kvsnap(setup, SETUP_HISTORY, dir.path()).await);
    }
    let backend = LlamaBackend::init().expect("llama.cpp backend");
    let load = |path: &std::path::Path| {
        LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default()).expect("model")
    };
    let model = load(&default.model);
    let llama: Vec<LlamaFigures> = rows
        .iter()
        .map(|r| measure_llama(&backend, &model, default, &r.prompt_tokens, dir.path()))
        .collect();
    drop(model);
    let mut llama_by_setup = Vec::new();
    for (setup, r) in setups.iter().zip(&by_setup) {
        let model = load(&setup.model);
        llama_by_setup.push(measure_llama(
            &backend,
            &model,
            setup,
            &r.prompt_tokens,
            dir.path(),
        ));
    }

    println!();
    println!(
        "{:>7} | {:>10} {:>10} {:>10} | {:>8} {:>8}",
        "tokens", "re-read ms", "resume ms", "warm ms", "ratio", "warm"
    );
    for r in &rows {
        println!(
            "{:>7} | {:>10.1} {:>10.1} {:>10.1} | {:>8} {:>8}",
            r.tokens,
            r.reread_ttft * 1e3,
            r.resumed_ttft * 1e3,
            r.warm_resumed_ttft * 1e3,
            format!("1/{:.0}", r.reread_ttft / r.resumed_ttft),
            format!("1/{:.0}", r.reread_ttft / r.warm_resumed_ttft),
        );
    }
    println!();
    println!(
        "{:>7} | {:>9} {:>9} {:>8} | {:>10} {:>10} | {:>15} {:>15} {:>13}",
        "tokens",
        "save MB/s",
        "disk MB/s",
        "of disk",
        "B/token",
        "llama B/t",
        "restore ms f/w",
        "llama ms f/w",
        "ratio f/w"
    );
    for (r, l) in rows.iter().zip(&llama) {
        let save_rate = mb_per_s(r.snapshot_bytes, r.save_seconds);
        let disk = r.disk_rate;
        println!(
            "{:>7} | {:>9.0} {:>9.0} {:>7.0}% | {:>10.0} {:>10.0} | {:>15} {:>15} {:>13}",
            r.tokens,
            save_rate,
            disk,
            100.0 * save_rate / disk,
            r.snapshot_bytes as f64 / r.tokens as f64,
            l.raw_bytes as f64 / r.tokens as f64,
            format!(
                "{:.1} / {:.1}",
                r.restore_seconds * 1e3,
                r.warm_restore_seconds * 1e3
            ),
            format!(
                "{:.1} / {:.1}",
                l.fresh_load_seconds * 1e3,
                l.load_seconds * 1e3
            ),
            format!(
                "{:.2} / {:.2}",
                r.restore_seconds / l.fresh_load_seconds,
                r.warm_restore_seconds / l.load_seconds
            ),
        );
    }
    println!();
    println!("Times to first token are to the first streamed token (a turn's save follows it).");
    println!("re-read = the next turn's first token with the history evaluated from scratch (a");
    println!("conversation the daemon does not know); resume = the same from the stored");
    println!("conversation in a freshly started daemon (after a restart); warm = the same in a");
    println!("running daemon after the conversation was evicted by others (eviction churn).");
    println!("restore = kvsnap's store read, checks and llama.cpp load (server-side): f = the");
    println!("first restore in a freshly started daemon, w = a running daemon's (eviction churn);");
    println!(
        "llama = llama_state_seq_load_file of the same state: f = the first load into a newly"
    );
    println!("made context, w = repeated in one context. Each ratio compares like with like.");
    println!("save = POST /v1/sessions/{{id}}/save including HTTP and the");
    println!(
        "fsync'd commit, median of {QUICK_REPEATS} in one process; disk = writing the same number of"
    );
    println!("bytes to a new file with one fdatasync, right after each save (median).");
    println!("Targets: resume <= 1/50 of re-read at 2,048 tokens; restore within 1.5x of");
    println!("llama.cpp's load; save at >= 50% of the disk's fsync'd bandwidth.");

    print_setups(&setups, &by_setup, &llama_by_setup);
}

/// The model and cache type table: each row beside llama.cpp's own figures for the same state,
/// and each quantized row's bytes against its model's f16 row.
fn print_setups(setups: &[Setup], rows: &[KvsnapFigures], llama: &[LlamaFigures]) {
    println!();
    println!(
        "Models and cache types at {SETUP_HISTORY} tokens (quantized: flash attention on, as \
         llama.cpp requires):"
    );
    println!(
        "{:<13} {:>5} | {:>8} {:>7} | {:>11} {:>9} {:>6} | {:>11} {:>11} {:>5} | {:>9} {:>9} {:>6}",
        "model",
        "cache",
        "B/token",
        "of f16",
        "turn bytes",
        "new rows",
        "ratio",
        "restore ms",
        "llama ms",
        "ratio",
        "re-read",
        "resume",
        "ratio"
    );
    for ((setup, r), l) in setups.iter().zip(rows).zip(llama) {
        let per_token = r.snapshot_bytes as f64 / r.tokens as f64;
        let f16 = setups
            .iter()
            .zip(rows)
            .find(|(s, _)| s.name == setup.name && !s.quantized())
            .map(|(_, f)| f.snapshot_bytes as f64 / f.tokens as f64);
        // The rows the turn adds: one per cache and layer for each of its tokens, and a
        // recurrent model's whole running state, which every token changes.
        let new_rows = (TURN_TOKENS * r.row_bytes + r.recurrent_bytes) as f64;
        println!(
            "{:<13} {:>5} | {:>8.0} {:>7} | {:>11} {:>9.0} {:>6.2} | {:>11.1} {:>11.1} {:>5.2} | {:>8.0}ms {:>7.1}ms {:>6}",
            setup.name,
            setup.cache_type,
            per_token,
            f16.map_or("-".into(), |f| format!("{:.2}x", per_token / f)),
            r.turn_bytes,
            new_rows,
            r.turn_bytes as f64 / new_rows,
            r.restore_seconds * 1e3,
            l.fresh_load_seconds * 1e3,
            r.restore_seconds / l.fresh_load_seconds,
            r.reread_ttft * 1e3,
            r.resumed_ttft * 1e3,
            format!("1/{:.0}", r.reread_ttft / r.resumed_ttft),
        );
    }
    println!("turn bytes = page bytes written by a {TURN_TOKENS}-token turn on a fork of the");
    println!(
        "history; new rows = the K and V rows of {TURN_TOKENS} positions in every cache, and a \
         recurrent model's running state."
    );
    println!("restore and llama: the first restore in a fresh daemon, the first load into a new");
    println!(
        "context. Targets: q8_0 at most 0.55x of f16's bytes; restore at most 1.5x llama.cpp's"
    );
    println!("own load.");
}
