//! `make batch-probe`: the instrument of issue 14. Does a conversation's next-token distribution
//! depend on what else is in its decode call?
//!
//! One conversation (A) is decoded alone for a few steps, and its logits are kept. Then it is
//! decoded again, fed the same tokens (teacher forcing), inside batches of S = 2..=8 rows, at
//! every position p of the batch, beside neighbours of different lengths. Each run's logits are
//! compared with the alone run's bit for bit. A second table prefills A's prompt in different
//! chunk schedules and compares the logits that follow, since a prompt's cache could depend on
//! how it was cut into decode calls. `PROBE_SPEED=1` prices batch compositions instead, and
//! `PROBE_RESTORE=1` compares a conversation past the sliding window continuing live with the
//! same conversation restored from its saved state. `PROBE_PREFIX=1` asks issue 30's question:
//! does a new conversation that restores another's state at a shared prefix continue exactly
//! as its cold start, for several ways of cutting prompts?
//!
//! This harness talks to llama.cpp directly (not through kvsnap's engine) on purpose: it measures
//! the kernels, with the context settings the engine uses (one KV stream per sequence, flash
//! attention off unless `PROBE_FLASH=1`). Runtime switches of ggml (`GGML_CPU_TILED_MM=0`) are
//! read from the environment; build switches come from the compute profile.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

const SEQUENCES: u32 = 9;
const CELLS_PER_SEQUENCE: u32 = 2048;
const STEPS: usize = 12;
const CHUNK: usize = 512;
/// Greedy steps compared after a prefix restore (differences past the window appeared 2 to 22
/// steps after a restore in issue 14).
const PREFIX_STEPS: usize = 32;

const SENTENCES: [&str; 6] = [
    "The harbour woke slowly under a grey sky while gulls argued over the fishing boats.",
    "Merchants rolled barrels of salted cod along the quay and shouted prices to each other.",
    "Far up the hill the bell of the old chapel rang for the morning service.",
    "Children ran between the nets, daring each other to touch the cold water.",
    "An old woman sold bread from a basket and told anyone who listened about the storm.",
    "A lighthouse keeper counted the ships and wrote their names in a thick blue ledger.",
];

/// Prose of about `sentences` sentences, starting at a different sentence for each `seed`.
fn prose(seed: usize, sentences: usize) -> String {
    (0..sentences)
        .map(|i| SENTENCES[(seed + i * (seed + 1)) % SENTENCES.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

struct Probe<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    /// Tokens in each sequence's cache.
    lengths: Vec<usize>,
}

impl Probe<'_> {
    fn reset(&mut self) {
        self.ctx.clear_kv_cache();
        self.lengths.iter_mut().for_each(|n| *n = 0);
    }

    /// Evaluates `tokens` into sequence `seq` in decode calls of the sizes in `schedule` (the
    /// last size repeats); returns the logits after the last token.
    fn prefill(&mut self, seq: usize, tokens: &[LlamaToken], schedule: &[usize]) -> Vec<f32> {
        let mut done = 0;
        let mut call = 0;
        while done < tokens.len() {
            let size = schedule[call.min(schedule.len() - 1)].min(tokens.len() - done);
            call += 1;
            self.batch.clear();
            for (i, &token) in tokens[done..done + size].iter().enumerate() {
                let last = done + i + 1 == tokens.len();
                let pos = (self.lengths[seq] + i) as i32;
                self.batch
                    .add(token, pos, &[seq as i32], last)
                    .expect("batch holds a chunk");
            }
            self.ctx.decode(&mut self.batch).expect("prefill decodes");
            self.lengths[seq] += size;
            done += size;
        }
        self.ctx.get_logits_ith(self.batch.n_tokens() - 1).to_vec()
    }

    /// Decodes one token for each (sequence, token) in one call; returns each row's logits.
    fn step(&mut self, rows: &[(usize, LlamaToken)]) -> Vec<Vec<f32>> {
        self.batch.clear();
        for &(seq, token) in rows {
            let pos = self.lengths[seq] as i32;
            self.batch
                .add(token, pos, &[seq as i32], true)
                .expect("batch holds a step");
        }
        self.ctx.decode(&mut self.batch).expect("step decodes");
        rows.iter()
            .enumerate()
            .map(|(i, &(seq, _))| {
                self.lengths[seq] += 1;
                self.ctx.get_logits_ith(i as i32).to_vec()
            })
            .collect()
    }

    fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), true, false)
    }
}

fn argmax(logits: &[f32]) -> LlamaToken {
    let (best, _) = logits
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, &v)| {
                if v > acc.1 { (i, v) } else { acc }
            },
        );
    LlamaToken(best as i32)
}

/// How one run's logits compare with the reference's, over all steps.
#[derive(Default)]
struct Difference {
    first_step: Option<usize>,
    floats: usize,
    max_abs: f32,
    argmax_changed: usize,
}

impl Difference {
    fn add(&mut self, step: usize, reference: &[f32], run: &[f32]) {
        let mut differing = 0;
        for (a, b) in reference.iter().zip(run) {
            if a.to_bits() != b.to_bits() {
                differing += 1;
                self.max_abs = self.max_abs.max((a - b).abs());
            }
        }
        if differing > 0 && self.first_step.is_none() {
            self.first_step = Some(step);
        }
        self.floats += differing;
        if argmax(reference) != argmax(run) {
            self.argmax_changed += 1;
        }
    }

    fn verdict(&self) -> String {
        match self.first_step {
            None => "identical".into(),
            Some(step) => format!(
                "DIFFERS from step {step}: {} floats, max |d| {:.3e}, argmax changed in {} steps",
                self.floats, self.max_abs, self.argmax_changed
            ),
        }
    }
}

fn main() {
    let model_path =
        std::env::var("KVSNAP_MODEL").unwrap_or_else(|_| "models/gemma-3-270m-q4_k_m.gguf".into());
    let threads: i32 = std::env::var("PROBE_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let flash = std::env::var("PROBE_FLASH").is_ok_and(|v| v == "1");
    let mut backend = LlamaBackend::init().expect("llama backend");
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &model_path, &LlamaModelParams::default())
        .expect("the model loads (make model)");
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(SEQUENCES * CELLS_PER_SEQUENCE))
        .with_n_batch(2048)
        .with_n_ubatch(512)
        .with_n_seq_max(SEQUENCES)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(if flash {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        })
        .with_kv_unified(false)
        .with_swa_full(false);
    let ctx = model.new_context(&backend, params).expect("context");
    let mut probe = Probe {
        model: &model,
        ctx,
        batch: LlamaBatch::new(2048, SEQUENCES as i32),
        lengths: vec![0; SEQUENCES as usize],
    };
    println!(
        "batch-invariance probe: profile {}, threads {threads}, flash attention {}, \
         GGML_CPU_TILED_MM={}",
        env!("KVSNAP_COMPUTE_PROFILE"),
        if flash { "on" } else { "off" },
        std::env::var("GGML_CPU_TILED_MM").unwrap_or_else(|_| "(default)".into()),
    );

    let prompt_a = probe.tokenize(&prose(0, 14));
    if std::env::var("PROBE_SPEED").is_ok_and(|v| v == "1") {
        speed(&mut probe, &prompt_a);
        return;
    }
    if std::env::var("PROBE_RESTORE").is_ok_and(|v| v == "1") {
        restore(&mut probe);
        return;
    }
    if std::env::var("PROBE_PREFIX").is_ok_and(|v| v == "1") {
        prefix(&mut probe);
        return;
    }
    // Neighbours from 30 to 1,200 tokens, so the padded KV length of a batch varies.
    let neighbours: Vec<Vec<LlamaToken>> = (1..SEQUENCES as usize)
        .map(|i| probe.tokenize(&prose(i, [2, 60, 8, 30, 4, 45, 12, 3][i - 1])))
        .collect();
    let filler = probe.tokenize(&prose(5, 3));

    // The reference: A alone in sequence 0, greedy.
    probe.reset();
    let mut logits = probe.prefill(0, &prompt_a, &[CHUNK]);
    let mut forced = Vec::new();
    let mut reference = Vec::new();
    for _ in 0..STEPS {
        let token = argmax(&logits);
        forced.push(token);
        logits = probe.step(&[(0, token)]).remove(0);
        reference.push(logits.clone());
    }

    // Runs A at batch position `position` of `size` rows (sequence ids 0..size, A's is
    // `position`), the other rows holding neighbours, all fed fixed tokens.
    let mut run = |size: usize, position: usize| -> Difference {
        probe.reset();
        let mut others = neighbours.iter();
        for seq in 0..size {
            if seq == position {
                probe.prefill(seq, &prompt_a, &[CHUNK]);
            } else {
                probe.prefill(seq, others.next().expect("8 neighbours"), &[CHUNK]);
            }
        }
        let mut difference = Difference::default();
        for (step, &token) in forced.iter().enumerate() {
            let rows: Vec<(usize, LlamaToken)> = (0..size)
                .map(|seq| {
                    if seq == position {
                        (seq, token)
                    } else {
                        (seq, filler[(step + seq) % filler.len()])
                    }
                })
                .collect();
            let logits = probe.step(&rows);
            difference.add(step, &reference[step], &logits[position]);
        }
        difference
    };

    println!("\nA decoded alone, in another sequence (control):");
    println!("  S=1 p=0 (seq 0 again): {}", run(1, 0).verdict());
    println!("\nA decoded inside a batch of S rows, at position p (logits vs alone, bit for bit):");
    for size in 2..=8 {
        for position in 0..size {
            println!("  S={size} p={position}: {}", run(size, position).verdict());
        }
    }

    println!(
        "\nA's prompt ({} tokens) prefilled in different decode-call sizes:",
        prompt_a.len()
    );
    let n = prompt_a.len();
    let schedules: Vec<(String, Vec<usize>)> = vec![
        (format!("[{n}]"), vec![n]),
        (format!("[{}, 1]", n - 1), vec![n - 1, 1]),
        (format!("[{}, 3]", n - 3), vec![n - 3, 3]),
        (format!("[{}, 4]", n - 4), vec![n - 4, 4]),
        (format!("[{}, 7]", n - 7), vec![n - 7, 7]),
        (format!("[{}, 9]", n - 9), vec![n - 9, 9]),
        ("[64, 64, ...]".into(), vec![64]),
        ("[7, 7, ...]".into(), vec![7]),
    ];
    let mut first: Option<Vec<Vec<f32>>> = None;
    for (name, schedule) in schedules {
        probe.reset();
        let mut logits = probe.prefill(0, &prompt_a, &schedule);
        let mut all = vec![logits.clone()];
        for &token in forced.iter().take(4) {
            logits = probe.step(&[(0, token)]).remove(0);
            all.push(logits.clone());
        }
        match &first {
            None => {
                println!("  {name}: (reference)");
                first = Some(all);
            }
            Some(reference) => {
                let mut difference = Difference::default();
                for (step, (r, l)) in reference.iter().zip(&all).enumerate() {
                    difference.add(step, r, l);
                }
                println!("  {name}: {}", difference.verdict());
            }
        }
    }
}

/// Prices the batch compositions: prefill speed alone, and generation steps for 4 and 8
/// conversations decoded in groups of the given sizes (median of 5 rounds of 16 steps).
fn speed(probe: &mut Probe, prompt: &[LlamaToken]) {
    let long: Vec<LlamaToken> = probe.tokenize(&prose(3, 70));
    let mut prefill = Vec::new();
    for _ in 0..5 {
        probe.reset();
        let started = Instant::now();
        probe.prefill(0, &long, &[2048]);
        prefill.push(long.len() as f64 / started.elapsed().as_secs_f64());
    }
    println!(
        "prefill, {} tokens alone: {:.0} tok/s (median of 5)",
        long.len(),
        median(prefill)
    );
    let compositions: [&[usize]; 14] = [
        &[1],
        &[2],
        &[3],
        &[4],
        &[5],
        &[6],
        &[7],
        &[8],
        &[1, 1, 1, 1],
        &[3, 1],
        &[4, 4],
        &[7, 1],
        &[3, 3, 2],
        &[1, 1, 1, 1, 1, 1, 1, 1],
    ];
    for groups in compositions {
        let rows: usize = groups.iter().sum();
        let mut rates = Vec::new();
        for _ in 0..5 {
            probe.reset();
            for seq in 0..rows {
                probe.prefill(seq, prompt, &[CHUNK]);
            }
            let started = Instant::now();
            for step in 0..16 {
                let mut first = 0;
                for &size in groups {
                    let group: Vec<(usize, LlamaToken)> = (first..first + size)
                        .map(|seq| (seq, prompt[(step + seq) % prompt.len()]))
                        .collect();
                    probe.step(&group);
                    first += size;
                }
            }
            rates.push((16 * rows) as f64 / started.elapsed().as_secs_f64());
        }
        println!(
            "generation, {rows} conversations in calls of {groups:?}: {:.1} tok/s",
            median(rates)
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A conversation's state saved past the sliding window and loaded into another sequence (and
/// into its own, cleared), then fed the same tokens: are the logits those of the live one?
fn restore(probe: &mut Probe) {
    for sentences in [20, 40, 60, 80, 100, 120] {
        let prompt = probe.tokenize(&prose(2, sentences));
        probe.reset();
        let mut logits = probe.prefill(0, &prompt, &[2048]);
        for _ in 0..4 {
            let token = argmax(&logits);
            logits = probe.step(&[(0, token)]).remove(0);
        }
        let saved = probe
            .ctx
            .state_seq_get(0, LlamaStateSeqFlags::empty())
            .expect("state of sequence 0");
        let length = probe.lengths[0];
        let mut forced = Vec::new();
        let mut live = Vec::new();
        for _ in 0..32 {
            let token = argmax(&logits);
            forced.push(token);
            logits = probe.step(&[(0, token)]).remove(0);
            live.push(logits.clone());
        }
        let mut restored = Vec::new();
        for seq in [1usize, 0] {
            probe
                .ctx
                .clear_kv_cache_seq(Some(seq as u32), None, None)
                .expect("clear");
            probe
                .ctx
                .state_seq_set(&saved, seq as i32)
                .expect("load state");
            probe.lengths[seq] = length;
            let mut run = Vec::new();
            for &token in &forced {
                run.push(probe.step(&[(seq, token)]).remove(0));
            }
            restored.push(run);
        }
        let compare = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            let mut difference = Difference::default();
            for (step, (x, y)) in a.iter().zip(b).enumerate() {
                difference.add(step, x, y);
            }
            difference.verdict()
        };
        println!(
            "restore at {length} tokens (window 512): restored vs live: {}; restored into \
             another sequence vs into its own, cleared: {}",
            compare(&live, &restored[0]),
            compare(&restored[0], &restored[1]),
        );
    }
}

/// How a prompt is cut into decode calls, and whether the window cache is laid out as a restore
/// lays it out at each grid boundary.
#[derive(Clone, Copy)]
struct Cuts {
    /// Calls end at multiples of this absolute position (`None`: calls of 2,048 counted from
    /// the turn's start, the engine's rule today).
    grid: Option<usize>,
    relayout: bool,
}

impl Probe<'_> {
    /// Reads sequence `seq`'s state and loads it back: its cells packed as a restore packs them.
    fn relayout(&mut self, seq: usize) {
        let state = self
            .ctx
            .state_seq_get(seq as i32, LlamaStateSeqFlags::empty())
            .expect("state of the sequence");
        self.ctx
            .clear_kv_cache_seq(Some(seq as u32), None, None)
            .expect("clear");
        self.ctx
            .state_seq_set(&state, seq as i32)
            .expect("load state");
    }

    /// Evaluates `tokens` after what `seq` holds, cut as `cuts` says, the last token in a call
    /// of its own; `at` is called with the sequence's length at every grid boundary reached.
    /// Returns the logits after the last token.
    fn prefill_cut(
        &mut self,
        seq: usize,
        tokens: &[LlamaToken],
        cuts: Cuts,
        at: &mut dyn FnMut(&mut Self, usize),
    ) -> Vec<f32> {
        let body = &tokens[..tokens.len() - 1];
        let mut done = 0;
        while done < body.len() {
            let position = self.lengths[seq];
            let size = match cuts.grid {
                Some(grid) => (grid - position % grid).min(body.len() - done),
                None => 2048.min(body.len() - done),
            };
            self.prefill(seq, &body[done..done + size], &[size]);
            done += size;
            if let Some(grid) = cuts.grid
                && self.lengths[seq].is_multiple_of(grid)
            {
                if cuts.relayout {
                    self.relayout(seq);
                }
                at(self, self.lengths[seq]);
            }
        }
        self.prefill(seq, &tokens[tokens.len() - 1..], &[1])
    }

    /// `STEPS` greedy steps from `logits` (or the `forced` tokens); each step's logits.
    fn steps(
        &mut self,
        seq: usize,
        mut logits: Vec<f32>,
        forced: Option<&[LlamaToken]>,
    ) -> (Vec<LlamaToken>, Vec<Vec<f32>>) {
        let mut tokens = Vec::new();
        let mut all = vec![logits.clone()];
        for step in 0..PREFIX_STEPS {
            let token = forced.map_or_else(|| argmax(&logits), |f| f[step]);
            tokens.push(token);
            logits = self.step(&[(seq, token)]).remove(0);
            all.push(logits.clone());
        }
        (tokens, all)
    }
}

/// Issue 30: conversation B starts with the prefix conversation A shares with it. Cold: B
/// evaluated from nothing. Warm: A evaluated first, its state kept at the last grid boundary
/// inside the shared prefix, loaded into an empty sequence, and B's rest evaluated after it.
fn prefix(probe: &mut Probe) {
    for sentences in [40, 70, 100, 120] {
        prefix_at(probe, sentences);
    }
}

fn prefix_at(probe: &mut Probe, sentences: usize) {
    let shared = probe.tokenize(&prose(3, sentences));
    let tail_a = probe.model.vocab().tokenize(
        b" The first question: what did the lighthouse keeper write today?",
        false,
        false,
    );
    let tail_b = probe.model.vocab().tokenize(
        b" Another question: why did the children dare each other to touch the water?",
        false,
        false,
    );
    let a: Vec<LlamaToken> = shared.iter().chain(&tail_a).copied().collect();
    let b: Vec<LlamaToken> = shared.iter().chain(&tail_b).copied().collect();
    println!(
        "shared prefix {} tokens, A {} and B {} (window 512)",
        shared.len(),
        a.len(),
        b.len()
    );
    let schedules = [
        ("today: calls of 2,048 from the turn's start", None, false),
        ("calls end at multiples of 512", Some(512), false),
        (
            "multiples of 512, laid out as restored at each",
            Some(512),
            true,
        ),
        (
            "multiples of 256, laid out as restored at each",
            Some(256),
            true,
        ),
        (
            "multiples of 128, laid out as restored at each",
            Some(128),
            true,
        ),
        (
            "multiples of 64, laid out as restored at each",
            Some(64),
            true,
        ),
    ];
    for (name, grid, relayout) in schedules {
        let cuts = Cuts { grid, relayout };
        // The boundary warm B starts from: the last grid point inside the shared prefix (or,
        // with today's rule, the shared prefix's end, where a slot's cache would be cut back).
        let boundary = grid.map_or(shared.len(), |g| shared.len() / g * g);
        probe.reset();
        let logits = probe.prefill_cut(0, &b, cuts, &mut |_, _| {});
        let (forced, cold) = probe.steps(0, logits, None);

        probe.reset();
        let mut kept = None;
        let mut keep_at = |p: &mut Probe, length: usize| {
            if length == boundary {
                kept = Some(
                    p.ctx
                        .state_seq_get(0, LlamaStateSeqFlags::empty())
                        .expect("state at the boundary"),
                );
            }
        };
        if grid.is_none() {
            // Today's rule: A evaluated whole and answered, then its sequence cut back to the
            // prefix (as a slot's cache is for the next prompt sharing it).
            let logits = probe.prefill_cut(0, &a, cuts, &mut |_, _| {});
            probe.steps(0, logits, None);
            probe
                .ctx
                .clear_kv_cache_seq(Some(0), Some(boundary as u32), None)
                .expect("trim");
            probe.lengths[0] = boundary;
            kept = Some(
                probe
                    .ctx
                    .state_seq_get(0, LlamaStateSeqFlags::empty())
                    .expect("state of the cut sequence"),
            );
        } else {
            let logits = probe.prefill_cut(0, &a, cuts, &mut keep_at);
            probe.steps(0, logits, None);
        }
        let Some(state) = kept else {
            println!("{name}: no state at {boundary}");
            continue;
        };
        probe
            .ctx
            .clear_kv_cache_seq(Some(1), None, None)
            .expect("clear");
        probe.ctx.state_seq_set(&state, 1).expect("load the prefix");
        probe.lengths[1] = boundary;
        let logits = probe.prefill_cut(1, &b[boundary..], cuts, &mut |_, _| {});
        let (_, warm) = probe.steps(1, logits, Some(&forced));
        let mut difference = Difference::default();
        for (step, (x, y)) in cold.iter().zip(&warm).enumerate() {
            difference.add(step, x, y);
        }
        println!(
            "{name}: warm from {boundary} vs cold: {}",
            difference.verdict()
        );
    }
}
