//! The engine thread: owns the llama.cpp model and context, and runs continuous batching.
//!
//! Each turn of the loop takes whatever commands arrived, gives waiting requests a free
//! sequence, then makes one `llama_decode` call holding one token for every generating request
//! and as many prompt tokens of prefilling requests as fit in the batch — llama-server's slots.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, TryRecvError};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

use super::grammar::Grammar;
use super::jinja::{JinjaTemplate, SpecialEnds};
use super::model_info::{
    LLAMA_BUILD, ModelInfo, attention_window, first_needed_position, hash_file, probe_layout,
};
use super::scratch::Scratch;
use super::slots::{Placement, Slot, common_prefix, place, unnamed_reuse};
use super::state_io;
use super::stops::StopScanner;
use super::vocab::{Vocabulary, check_ids, check_prompt};
use super::{
    CacheType, Command, EngineConfig, EngineError, Event, FinishReason, Keeper, Requester, Shared,
    Started,
};
use super::{Candidate, ProbsRequest, TokenProbs};
use crate::clock::now_ms;
use crate::sampling::{self, RngState, SamplingParams};
use crate::snapshot::{LayoutIdentity, LiveIdentity, ModelIdentity};

type Ready = mpsc::Sender<Result<(ModelInfo, Vocabulary), EngineError>>;

/// Thread entry point: load, report readiness, serve until told to stop.
pub(super) fn run(
    config: EngineConfig,
    keeper: Box<dyn Keeper>,
    commands: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    ready: Ready,
) {
    // llama.cpp's own log lines go through `tracing` (filtered by KVSNAP_LOG) instead of stderr.
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let backend = match LlamaBackend::init() {
        Ok(backend) => backend,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!("llama.cpp backend: {e}"))));
            return;
        }
    };
    let path = &config.model_path;
    if !path.is_file() {
        let _ = ready.send(Err(EngineError::Load(format!(
            "there is no model file at {}; run `make model` to fetch the default model, \
             or pass -m PATH to a GGUF file",
            path.display()
        ))));
        return;
    }
    let (file_hash, file_bytes) = match hash_file(path) {
        Ok(hash) => hash,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "cannot read {}: {e}",
                path.display()
            ))));
            return;
        }
    };
    // The model, and beside it (on a second thread: both build the vocabulary, about half a
    // second for Gemma's) a copy of its vocabulary alone, over which tokenizing and templates
    // run off this thread.
    let (model, vocab_model) = std::thread::scope(|scope| {
        let vocab = scope.spawn(|| {
            let vocab_only = LlamaModelParams::default().with_vocab_only(true);
            LlamaModel::load_from_file(&backend, path, &vocab_only)
        });
        let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default());
        (model, vocab.join())
    });
    let model = match model {
        Ok(model) => model,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "{} is not a GGUF model llama.cpp can load ({e}); check the file or fetch it \
                 again with `make model`",
                path.display()
            ))));
            return;
        }
    };
    let vocab_model = match vocab_model {
        Ok(Ok(model)) => model,
        Ok(Err(e)) => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "cannot read {}'s vocabulary: {e}",
                path.display()
            ))));
            return;
        }
        Err(_) => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "reading {}'s vocabulary stopped unexpectedly",
                path.display()
            ))));
            return;
        }
    };
    let mut ctx = match model.new_context(&backend, context_params(&config)) {
        Ok(ctx) => ctx,
        Err(e) => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "cannot create a llama.cpp context of {} tokens for {} sequences: {e}",
                config.ctx_size, config.parallel
            ))));
            return;
        }
    };

    if let Err(reason) = warm_up(&model, &mut ctx, config.batch_size) {
        let _ = ready.send(Err(EngineError::Load(reason)));
        return;
    }

    let architecture = model
        .meta_val_str("general.architecture")
        .unwrap_or_else(|_| "unknown".into());
    let (n_swa, window_kind) = attention_window(&model, &architecture);
    let n_ctx = ctx.n_ctx();
    let chat_template =
        choose_chat_template(&model, &architecture, config.chat_template.as_deref());
    let info = ModelInfo {
        id: path
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        file_hash,
        file_bytes,
        architecture,
        n_layer: model.n_layer(),
        n_embd: model.n_embd(),
        n_vocab: model.n_vocab(),
        n_ctx_train: model.n_ctx_train(),
        n_ctx,
        n_ctx_per_sequence: n_ctx / config.parallel,
        parallel: config.parallel as usize,
        n_swa,
        window_kind,
        recurrent: model.is_recurrent() || model.is_hybrid(),
        chat_template: chat_template
            .as_ref()
            .and_then(|t| t.to_string().ok())
            .unwrap_or_default(),
        bos_token: special_text(&model, model.vocab().bos()),
        eos_token: special_text(&model, model.vocab().eos()),
        eog_tokens: (0..model.n_vocab())
            .filter(|&id| model.vocab().is_eog(LlamaToken(id)))
            .collect(),
        // Set below, once the template is compiled.
        hermes_tool_calls: false,
        // Probed below, once the context exists.
        live: Err(String::new()),
    };
    let jinja = config
        .jinja
        .then(|| jinja_template(chat_template.as_ref(), &info, &model))
        .flatten();
    let probed = probe_layout(
        &model,
        &mut ctx,
        info.n_ctx_per_sequence,
        &info.architecture,
    );
    let live = match probed {
        Ok(probed) => {
            let live = LiveIdentity {
                model: ModelIdentity {
                    file_hash: info.file_hash.clone(),
                    architecture: info.architecture.clone(),
                    n_layer: info.n_layer,
                    n_embd: info.n_embd,
                    n_vocab: info.n_vocab,
                },
                layout: LayoutIdentity {
                    flash_attention: config.flash_attention,
                    n_ctx_per_sequence: info.n_ctx_per_sequence,
                    n_swa: info.n_swa,
                    n_ubatch: config.ubatch_size,
                    llama_build: LLAMA_BUILD.into(),
                    cell_ext: probed.cell_ext,
                    caches: probed.caches,
                    compute_profile: Some(crate::compute::THIS_BUILD.into()),
                    recurrent: probed.recurrent,
                },
            };
            Ok(live)
        }
        // Refused, not served with every save failing in the log: a daemon that keeps
        // conversations must be able to keep this model's.
        Err(reason) if config.keep_state => {
            let _ = ready.send(Err(EngineError::Load(format!(
                "kvsnap cannot keep the state of {}: {reason}. It could not save, restore or \
                 move its conversations; start it with --persist off to serve it as a plain \
                 server that keeps none",
                info.id
            ))));
            return;
        }
        Err(reason) => {
            tracing::info!(%reason, "this model's state cannot be kept (--persist off)");
            Err(reason)
        }
    };
    let info = ModelInfo {
        live: live.clone(),
        hermes_tool_calls: jinja.as_ref().is_some_and(JinjaTemplate::hermes_tool_calls),
        ..info
    };
    let mut worker = Worker::new(&model, ctx, keeper, shared.clone(), &config, info.clone());
    let vocab = Vocabulary::new(
        vocab_model,
        chat_template,
        jinja,
        info.n_ctx_per_sequence as usize,
    );
    if ready.send(Ok((info.clone(), vocab))).is_err() {
        return;
    }
    if let Served::Stopped = worker.serve(&commands, config.sleep_idle) {
        return;
    }
    let keeper = worker.into_keeper();
    drop(model);
    super::sleep::sleep_then_serve(keeper, &backend, &config, &commands, shared, &info);
}

/// The reused buffers with the restore frame mapped (`Scratch::with_frame_mapped`), timed.
fn mapped_frame(frame_bytes: usize) -> Scratch {
    let started = std::time::Instant::now();
    let scratch = Scratch::with_frame_mapped(frame_bytes);
    tracing::debug!(
        bytes = scratch.frame.len(),
        millis = started.elapsed().as_secs_f64() * 1e3,
        "restore frame mapped"
    );
    scratch
}

/// A prompt of this many tokens, then one generated token, runs before the port opens.
const WARM_UP_PROMPT: usize = 32;

/// Real decodes before the port opens, as llama-server does at start: a short prompt (the
/// batched kernels) and one generation step (the one-row kernels), then the sequence is
/// emptied. A kernel that cannot run on this host (an instruction it lacks, a crash like
/// ggml's AMX one, llama.cpp #20824) takes the process down here, at start, never on a
/// user's request.
/// The context every start (and every wake from sleep) creates.
pub(super) fn context_params(config: &EngineConfig) -> LlamaContextParams {
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(config.ctx_size))
        .with_n_batch(config.batch_size)
        .with_n_ubatch(config.ubatch_size)
        .with_n_seq_max(config.parallel)
        .with_n_threads(config.threads)
        .with_n_threads_batch(config.threads)
        .with_type_k(kv_cache_type(config.cache_type_k))
        .with_type_v(kv_cache_type(config.cache_type_v))
        .with_flash_attention_policy(if config.flash_attention {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
        } else {
            llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
        })
        // One stream per sequence: each conversation gets `n_ctx / parallel` cells of its own,
        // and its state can be saved and restored without touching the others.
        .with_kv_unified(false)
        .with_swa_full(false)
}

/// llama-cpp-2's name for a cache type.
fn kv_cache_type(cache_type: CacheType) -> KvCacheType {
    match cache_type {
        CacheType::F32 => KvCacheType::F32,
        CacheType::F16 => KvCacheType::F16,
        CacheType::Bf16 => KvCacheType::BF16,
        CacheType::Q8_0 => KvCacheType::Q8_0,
        CacheType::Q4_0 => KvCacheType::Q4_0,
        CacheType::Q4_1 => KvCacheType::Q4_1,
        CacheType::Iq4Nl => KvCacheType::IQ4_NL,
        CacheType::Q5_0 => KvCacheType::Q5_0,
        CacheType::Q5_1 => KvCacheType::Q5_1,
    }
}

fn warm_up(model: &LlamaModel, ctx: &mut LlamaContext<'_>, n_batch: u32) -> Result<(), String> {
    let started = std::time::Instant::now();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let mut tokens: Vec<LlamaToken> = model
        .vocab()
        .tokenize(text.as_bytes(), true, false)
        .into_iter()
        .take(WARM_UP_PROMPT.min(n_batch as usize))
        .collect();
    if tokens.is_empty() {
        tokens.push(LlamaToken(0));
    }
    let failed = |e: &dyn std::fmt::Display| format!("the warm-up decode at start failed: {e}");
    let mut batch = LlamaBatch::new(tokens.len(), 1);
    let last = tokens.len() - 1;
    for (position, &token) in tokens.iter().enumerate() {
        batch
            .add(token, position as i32, &[0], position == last)
            .map_err(|e| failed(&e))?;
    }
    let decoded = ctx.decode(&mut batch);
    decoded.map_err(|e| failed(&e))?;
    batch.clear();
    batch
        .add(tokens[0], tokens.len() as i32, &[0], true)
        .map_err(|e| failed(&e))?;
    let decoded = ctx.decode(&mut batch);
    let _ = ctx.clear_kv_cache_seq(Some(0), None, None);
    decoded.map_err(|e| failed(&e))?;
    tracing::info!(
        compute_profile = crate::compute::THIS_BUILD,
        prompt_tokens = tokens.len(),
        millis = started.elapsed().as_secs_f64() * 1e3,
        "warm-up decode done"
    );
    Ok(())
}

/// The configured template, else the model's own, else llama.cpp's built-in one for the family.
///
/// Some GGUF files (the default Gemma 3 270M among them) carry no template; llama.cpp still knows
/// each family's format by name.
/// A special token's text (`<bos>`), empty for a model without it.
fn special_text(model: &LlamaModel, token: LlamaToken) -> String {
    if token.0 < 0 {
        return String::new();
    }
    String::from_utf8_lossy(&model.vocab().token_to_piece(token, true, None)).into_owned()
}

fn choose_chat_template(
    model: &LlamaModel,
    architecture: &str,
    configured: Option<&str>,
) -> Option<LlamaChatTemplate> {
    if let Some(name) = configured {
        return LlamaChatTemplate::new(name).ok();
    }
    if let Ok(template) = model.chat_template(None) {
        return Some(template);
    }
    let family = if architecture.starts_with("gemma") {
        "gemma"
    } else if architecture.starts_with("llama") {
        "llama3"
    } else {
        "chatml"
    };
    tracing::info!(
        family,
        "the model has no chat template; using llama.cpp's built-in one"
    );
    LlamaChatTemplate::new(family).ok()
}

/// `--jinja`'s template: the chosen template's own text, compiled. A llama.cpp built-in name
/// (`--chat-template chatml`, or the fallback of a model without a template) has no Jinja text,
/// and a template minijinja cannot compile is not served half-working: both keep llama.cpp's
/// built-in rendering, with a warning that says so.
fn jinja_template(
    chosen: Option<&LlamaChatTemplate>,
    info: &ModelInfo,
    model: &LlamaModel,
) -> Option<JinjaTemplate> {
    let source = chosen.and_then(|t| t.to_string().ok()).unwrap_or_default();
    if !source.contains("{%") && !source.contains("{{") {
        tracing::warn!(
            template = %source,
            "--jinja: the chat template is a llama.cpp built-in name, not a Jinja template; \
             chats are rendered by llama.cpp's built-in templates"
        );
        return None;
    }
    let ends = SpecialEnds {
        bos_token: info.bos_token.clone(),
        eos_token: info.eos_token.clone(),
        adds_bos: model.vocab().should_add_bos(),
        adds_eos: model.vocab().should_add_eos(),
    };
    match JinjaTemplate::new(source, ends) {
        Ok(template) => Some(template),
        Err(reason) => {
            tracing::warn!(
                %reason,
                "--jinja: chats are rendered by llama.cpp's built-in templates instead"
            );
            None
        }
    }
}

/// The request's next token from `logits` (its grammar, if any, consulted) and, when asked for,
/// its probabilities.
fn choose(logits: &[f32], recent: &[i32], job: &mut Job) -> (i32, Option<sampling::TokenProbs>) {
    let draw = |logits: &[f32], rng: &mut RngState| match job.probs {
        Some(ProbsRequest {
            n,
            after_sampling: true,
        }) => {
            let (token, probs) = sampling::sample_with_probs(logits, recent, &job.sampling, rng, n);
            (token, Some(probs))
        }
        Some(ProbsRequest { n, .. }) => {
            let token = sampling::sample(logits, recent, &job.sampling, rng);
            (token, Some(sampling::model_probs(logits, token, n)))
        }
        None => (sampling::sample(logits, recent, &job.sampling, rng), None),
    };
    let Some(grammar) = job.grammar.as_mut() else {
        return draw(logits, &mut job.rng);
    };
    // First the unmasked choice, on a copy of the stream; kept only if the grammar allows it.
    let mut tentative = job.rng;
    let (token, probs) = draw(logits, &mut tentative);
    let (token, probs) = if grammar.allows(token) {
        job.rng = tentative;
        (token, probs)
    } else {
        let masked = grammar.mask(logits);
        draw(&masked, &mut job.rng)
    };
    grammar.accept(token);
    (token, probs)
}

/// A request that has been tokenized and waits for a sequence.
pub(super) struct Pending {
    pub(super) session: Option<Uuid>,
    pub(super) tokens: Vec<i32>,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    seed: Option<u64>,
    pub(super) cache_prompt: bool,
    ignore_eos: bool,
    pub(super) requester: Requester,
    events: UnboundedSender<Event>,
    grammar: Option<Grammar>,
    probs: Option<ProbsRequest>,
    stops: StopScanner,
}

/// A request running in a sequence.
pub(super) struct Job {
    session: Option<Uuid>,
    events: UnboundedSender<Event>,
    sampling: SamplingParams,
    max_tokens: Option<u32>,
    ignore_eos: bool,
    rng: RngState,
    grammar: Option<Grammar>,
    probs: Option<ProbsRequest>,
    /// Watches the reply's text for the request's stop strings.
    stops: StopScanner,
    /// Prompt tokens not yet in the sequence; `evaluated` of them have been decoded.
    to_evaluate: Vec<i32>,
    evaluated: usize,
    generated: u32,
    /// Sampled and sent, not yet decoded: the next step decodes it.
    next_token: Option<i32>,
    prompt_done: bool,
    /// The sequence holds, and this turn's prompt is adding, only what a cold start of its
    /// tokens computes (from an empty sequence or a checkpoint): its grid boundaries may be
    /// kept as checkpoints.
    pub(super) canonical: bool,
}

/// Why a conversation is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Its snapshot is on its way to another instance.
    Moving,
    /// A new version of it is being verified and stored.
    Replacing,
}

/// How `Worker::serve` ended.
pub(super) enum Served {
    /// Told to stop (or every handle is gone): the engine ends.
    Stopped,
    /// Idle for `--sleep-idle-seconds`, every conversation saved: the model may be unloaded.
    Asleep,
}

pub(super) struct Worker<'m> {
    pub(super) model: &'m LlamaModel,
    pub(super) ctx: LlamaContext<'m>,
    /// Keeps conversations out of their sequences: the store, through `sessions/`.
    pub(super) keeper: Box<dyn Keeper>,
    pub(super) batch: LlamaBatch<'static>,
    pub(super) slots: Vec<Slot>,
    /// `jobs[i]` runs in `slots[i]`; `slots[i].busy` mirrors `jobs[i].is_some()`.
    pub(super) jobs: Vec<Option<Job>>,
    pub(super) pending: VecDeque<Pending>,
    /// Each conversation's random stream, so a turn without a seed continues it.
    pub(super) streams: HashMap<Uuid, RngState>,
    pub(super) shared: Arc<Shared>,
    pub(super) n_batch: usize,
    /// Most generating sequences decoded in one call: `compute::EXACT_BATCH_ROWS` with shared
    /// batches on, else 1.
    pub(super) rows_per_call: usize,
    pub(super) info: ModelInfo,
    pub(super) clock: u64,
    /// Conversations whose bytes travel (sent to another instance, or being replaced by an
    /// upload): every change to them is refused.
    pub(super) held: HashMap<Uuid, Held>,
    /// Buffers reused by every save and restore (`scratch.rs`).
    pub(super) scratch: Scratch,
    /// State buffers back from the writer, for the next queued save.
    pub(super) raw_pool: Vec<Vec<u8>>,
    /// The shutdown deadline passed (`CancelAll`): a request arriving after it (its prompt
    /// was still being tokenized) is cancelled at once, or it would run past the deadline.
    pub(super) past_deadline: bool,
}

impl<'m> Worker<'m> {
    /// A worker on a loaded model and a fresh context, its sequences empty.
    pub(super) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        keeper: Box<dyn Keeper>,
        shared: Arc<Shared>,
        config: &EngineConfig,
        info: ModelInfo,
    ) -> Self {
        let frame_bytes = info
            .live
            .as_ref()
            .map_or(0, |l| l.layout.largest_state_bytes() + state_io::HEADER);
        Worker {
            model,
            ctx,
            keeper,
            batch: LlamaBatch::new(config.batch_size as usize, 1),
            slots: (0..config.parallel as i32).map(Slot::new).collect(),
            jobs: (0..config.parallel).map(|_| None).collect(),
            pending: VecDeque::new(),
            streams: HashMap::new(),
            shared,
            n_batch: config.batch_size as usize,
            rows_per_call: if config.shared_batches {
                crate::compute::EXACT_BATCH_ROWS
            } else {
                1
            },
            info,
            clock: 0,
            held: HashMap::new(),
            // Before the start is announced, not after: mapped after it, the first request
            // after a restart waited behind the mapping (the bench's resume then took 10-27%
            // longer than the whole-snapshot store's), while a start of about a second hardly
            // notices it.
            scratch: mapped_frame(frame_bytes),
            raw_pool: Vec::new(),
            past_deadline: false,
        }
    }

    /// The keeper back, everything else (the context, its buffers) freed.
    pub(super) fn into_keeper(self) -> Box<dyn Keeper> {
        self.keeper
    }

    /// Runs commands and decodes until told to stop, or, with `sleep_idle`, until nothing
    /// happened for that long: then every conversation is saved (named ones as conversations,
    /// the others as unnamed entries) and the caller unloads the model.
    pub(super) fn serve(
        &mut self,
        commands: &mpsc::Receiver<Command>,
        sleep_idle: Option<std::time::Duration>,
    ) -> Served {
        loop {
            if self.pending.is_empty() && self.jobs.iter().all(Option::is_none) {
                // Nothing to compute: wait until a command arrives (or fall asleep).
                let next = match sleep_idle {
                    // A conversation held for a move or an upload keeps the engine awake.
                    Some(idle) if self.held.is_empty() => match commands.recv_timeout(idle) {
                        Ok(command) => Some(command),
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            self.save_dirty();
                            return Served::Asleep;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => None,
                    },
                    _ => commands.recv().ok(),
                };
                match next {
                    Some(command) => {
                        if !self.handle(command) {
                            return Served::Stopped;
                        }
                    }
                    None => {
                        self.save_dirty();
                        return Served::Stopped;
                    }
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            return Served::Stopped;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.cancel_all();
                        self.save_dirty();
                        return Served::Stopped;
                    }
                }
            }
            self.take_saved();
            self.drop_abandoned();
            self.admit();
            self.step();
        }
    }

    /// Returns false when the engine must stop.
    pub(super) fn handle(&mut self, command: Command) -> bool {
        // Whatever reads or changes a conversation's stored version sees its latest save.
        if let Some(session) = command.stored_session() {
            self.wait_saved(Some(session));
        }
        match command {
            Command::Generate {
                request,
                tokens,
                events,
            } => {
                if self.past_deadline {
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = events.send(Event::Finished(FinishReason::Cancelled));
                    return true;
                }
                let here = request.session.map_or(Ok(()), |id| self.check_here(id));
                let admitted = here.and_then(|()| {
                    // Tokenized by the handle; checked again before llama.cpp sees them.
                    check_ids(&tokens, self.info.n_vocab)?;
                    check_prompt(&tokens, self.info.n_ctx_per_sequence as usize)?;
                    let grammar = match &request.constraint {
                        Some(constraint) => Some(Grammar::new(self.model, constraint)?),
                        None => None,
                    };
                    Ok(grammar)
                });
                match admitted {
                    Ok(grammar) => self.pending.push_back(Pending {
                        grammar,
                        probs: request.probs,
                        stops: StopScanner::new(&request.stops),
                        session: request.session,
                        tokens,
                        max_tokens: request.max_tokens,
                        sampling: request.sampling,
                        seed: request.seed,
                        cache_prompt: request.cache_prompt,
                        ignore_eos: request.ignore_eos,
                        requester: request.requester,
                        events,
                    }),
                    Err(error) => {
                        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                        let _ = events.send(Event::Failed(error));
                    }
                }
                true
            }
            Command::CancelAll => {
                self.past_deadline = true;
                self.cancel_all();
                true
            }
            Command::Save {
                session,
                requester,
                reply,
            } => {
                let _ = reply.send(
                    self.check_here(session)
                        .and_then(|()| self.save_now(session, &requester)),
                );
                true
            }
            Command::Look {
                session,
                requester,
                reply,
            } => {
                let _ = reply.send(
                    self.check_here(session)
                        .and_then(|()| self.look(session, &requester)),
                );
                true
            }
            Command::Wake { reply } => {
                let _ = reply.send(());
                true
            }
            Command::Resident { reply } => {
                let _ = reply.send(self.resident());
                true
            }
            Command::DropResident { session, reply } => {
                let result = match self.resident_slot(session) {
                    Some(index) if self.slots[index].busy => Err(EngineError::Conflict(format!(
                        "conversation {session} is generating here; retry when its turn ends"
                    ))),
                    Some(index) => {
                        self.drop_resident(index);
                        self.streams.remove(&session);
                        Ok(())
                    }
                    None => Ok(()),
                };
                let _ = reply.send(result);
                true
            }
            Command::CheckOut {
                session,
                requester,
                reply,
            } => {
                let _ = reply.send(
                    self.check_here(session)
                        .and_then(|()| self.check_out(session, &requester)),
                );
                true
            }
            Command::Hold {
                session,
                requester,
                purpose,
                reply,
            } => {
                let _ = reply.send(self.hold(session, &requester, purpose));
                true
            }
            Command::Release {
                session,
                replaced,
                reply,
            } => {
                self.release(session, replaced);
                let _ = reply.send(());
                true
            }
            Command::BeginMove { session, reply } => {
                let _ = reply.send(self.begin_move(session));
                true
            }
            Command::EndMove {
                session,
                moved,
                reply,
            } => {
                let _ = reply.send(self.end_move(session, moved));
                true
            }
            Command::Slots { reply } => {
                let _ = reply.send(self.slots_info());
                true
            }
            Command::SlotSave { slot, path, reply } => {
                let _ = reply.send(self.slot_save(slot, &path));
                true
            }
            Command::SlotRestore {
                slot,
                path,
                requester,
                reply,
            } => {
                let _ = reply.send(self.slot_restore(slot, &path, &requester));
                true
            }
            Command::SlotErase { slot, reply } => {
                let _ = reply.send(self.slot_erase(slot));
                true
            }
            Command::Shutdown { reply } => {
                self.cancel_all();
                // Every conversation survives a restart, whatever the persist policy.
                self.save_dirty();
                let _ = reply.send(());
                false
            }
        }
    }

    /// Forgets requests whose client went away.
    fn drop_abandoned(&mut self) {
        let before = self.pending.len();
        self.pending.retain(|p| !p.events.is_closed());
        let gone = before - self.pending.len();
        self.shared.waiting.fetch_sub(gone, Ordering::SeqCst);
        for index in 0..self.jobs.len() {
            if self.jobs[index]
                .as_ref()
                .is_some_and(|job| job.events.is_closed())
            {
                self.finish(index, FinishReason::Cancelled);
            }
        }
    }

    fn cancel_all(&mut self) {
        for pending in self.pending.drain(..) {
            self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = pending
                .events
                .send(Event::Finished(FinishReason::Cancelled));
        }
        for index in 0..self.jobs.len() {
            if self.jobs[index].is_some() {
                self.finish(index, FinishReason::Cancelled);
            }
        }
    }

    /// Gives waiting requests a sequence, in arrival order where they can run.
    fn admit(&mut self) {
        let mut index = 0;
        while index < self.pending.len() {
            let request = &self.pending[index];
            let tenant = request.requester.tenant();
            match place(&self.slots, request.session, &tenant, &request.tokens) {
                Placement::Slot(slot) => {
                    let request = self.pending.remove(index).expect("index is in range");
                    self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    match self.prepare_slot(slot, &request) {
                        Ok(own_cache) => self.begin(slot, request, own_cache),
                        Err(error) => {
                            let _ = request.events.send(Event::Failed(error));
                        }
                    }
                }
                Placement::Wait => index += 1,
            }
        }
    }

    /// Makes slot `index` ready for `request`'s conversation: checks the owner, saves and evicts
    /// the conversation that held the slot, and restores the request's conversation from the
    /// store when it is not resident.
    ///
    /// Returns whether the slot's cache is the request's own (its conversation's, or anonymous
    /// for an anonymous request): only then may its prefix be reused. A conversation's cache is
    /// built only from its own turns, so its tokens never depend on which slot it landed in.
    fn prepare_slot(&mut self, index: usize, request: &Pending) -> Result<bool, EngineError> {
        let Some(session) = request.session else {
            let tenant = request.requester.tenant();
            // Another key's prompts are no prefix of this one's, whatever their tokens.
            let own = self.slots[index].session.is_none() && self.slots[index].tenant == tenant;
            self.evict(index)?;
            if !own {
                // Another key's (or a conversation's) cache: nothing of it is this request's.
                self.keep_unnamed(index);
                self.slots[index].entry = None;
                self.slots[index].saved_prefix = 0;
            }
            self.slots[index].tenant = tenant;
            return Ok(self.take_for_unnamed(index, request, own));
        };
        if self.slots[index].session == Some(session) {
            if !request.requester.may_use(&self.slots[index].owner) {
                return Err(EngineError::NotFound(format!(
                    "there is no conversation {session}"
                )));
            }
            return Ok(true);
        }
        // The latest version: a save of it still on the writer is committed first.
        self.wait_saved(Some(session));
        let stored = self.stored_record(session, &request.requester)?;
        self.evict(index)?;
        self.keep_unnamed(index);
        self.slots[index].entry = None;
        match stored {
            Some(stored) => {
                self.restore(index, session, &stored)?;
                Ok(true)
            }
            None => {
                let slot = &mut self.slots[index];
                slot.owner = request.requester.owner();
                slot.created_ms = now_ms();
                // A new conversation may start from a checkpoint of its key: what a cold start
                // of those tokens computes.
                Ok(self.take_checkpoint(index, request))
            }
        }
    }

    /// Frees slot `index` of its conversation, saving it first if it has unsaved changes.
    fn evict(&mut self, index: usize) -> Result<(), EngineError> {
        if let Some(session) = self.slots[index].session {
            // A failed queued save leaves the slot unsaved: know before the slot is reused.
            self.wait_saved(Some(session));
            if self.slots[index].dirty && !self.slots[index].cached.is_empty() {
                self.save_slot(index)?;
            }
            let slot = &mut self.slots[index];
            slot.session = None;
            slot.owner = None;
            slot.dirty = false;
            slot.saved_prefix = 0;
        }
        Ok(())
    }

    fn begin(&mut self, index: usize, request: Pending, own_cache: bool) {
        let cached = self.slots[index].cached.len();
        // A request that names no conversation reuses the sequence only where that is exact
        // (`slots::unnamed_reuse`): cut back to a shared system prompt or past a window cache
        // that filled, the cache is neither what a cold start computes nor the state the
        // conversation had there (`make batch-probe`, PROBE_PREFIX=1); a kept entry of that
        // state is restored instead (`entries.rs`), or the prompt evaluated.
        let mut keep = match (request.cache_prompt && own_cache, request.session) {
            (false, _) => 0,
            (true, Some(_)) => common_prefix(&self.slots[index].cached, &request.tokens),
            (true, None) => unnamed_reuse(
                &self.slots[index].cached,
                &request.tokens,
                self.info.n_swa as usize,
            ),
        };
        // The last prompt token is always decoded again: its logits choose the first token.
        if keep == request.tokens.len() {
            keep -= 1;
        }
        // A recurrent state cannot be cut back: a named conversation goes back to a turn end.
        if self.info.recurrent && request.session.is_some() && 0 < keep && keep < cached {
            keep = self.go_back(index, &request.tokens, keep);
        }
        // Only a sequence built from nothing or from a checkpoint, prompt tokens only, holds
        // what a cold start computes.
        let canonical = keep == 0 || (self.slots[index].checkpoint && keep == cached);
        self.slots[index].checkpoint = false;
        let keep = self.trim_sequence(index, keep);
        self.slots[index].session = request.session;
        // An anonymous request that asks for no caching leaves nothing to keep.
        self.slots[index].dirty = request.session.is_some() || request.cache_prompt;

        let rng = match (request.seed, request.session) {
            (Some(seed), _) => RngState::from_seed(seed),
            (None, Some(id)) => self
                .streams
                .get(&id)
                .copied()
                .unwrap_or_else(RngState::from_entropy),
            (None, None) => RngState::from_entropy(),
        };
        metrics::counter!("kvsnap_tokens_reused_total").increment(keep as u64);
        let started = Started {
            prompt_tokens: request.tokens.len(),
            cached_tokens: keep,
            slot: index,
        };
        if request.events.send(Event::Started(started)).is_err()
            || request
                .events
                .send(Event::PromptProgress { evaluated: 0 })
                .is_err()
        {
            return;
        }
        self.jobs[index] = Some(Job {
            session: request.session,
            events: request.events,
            sampling: request.sampling,
            max_tokens: request.max_tokens,
            ignore_eos: request.ignore_eos,
            rng,
            grammar: request.grammar,
            probs: request.probs,
            stops: request.stops,
            to_evaluate: request.tokens[keep..].to_vec(),
            evaluated: 0,
            generated: 0,
            next_token: None,
            prompt_done: false,
            canonical,
        });
        self.slots[index].busy = true;
        self.shared.active.fetch_add(1, Ordering::SeqCst);
    }

    /// Cuts the sequence back to its first `keep` tokens and returns how many it really kept.
    ///
    /// Removing a tail is not always possible: a recurrent model holds one running state, and a
    /// sliding-window cache may already have dropped cells the shorter history needs again. In
    /// those cases the sequence is cleared and the prompt is evaluated from the start — slower,
    /// never wrong.
    fn trim_sequence(&mut self, index: usize, keep: usize) -> usize {
        let slot = &mut self.slots[index];
        let seq = slot.seq_id as u32;
        let mut keep = keep.min(slot.cached.len());
        if keep < slot.cached.len() && keep > 0 {
            // A recurrent model holds one running state: no tail to remove.
            let removed = !self.info.recurrent
                && matches!(
                    self.ctx
                        .clear_kv_cache_seq(Some(seq), Some(keep as u32), None),
                    Ok(true)
                );
            // The first position a token at `keep` still attends to must be in the cache.
            let window_intact = self.info.n_swa == 0
                || self.ctx.kv_cache_seq_pos_min(slot.seq_id)
                    <= first_needed_position(keep, self.info.n_swa, self.info.window_kind) as i32;
            if !removed || !window_intact {
                keep = 0;
            }
        }
        if keep == 0 {
            let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
        }
        slot.cached.truncate(keep);
        slot.saved_prefix = slot.saved_prefix.min(keep);
        keep
    }

    /// One scheduling step: every generating request advances by one token, and prompts are
    /// evaluated up to the batch budget, all within the same turn of the loop.
    ///
    /// llama.cpp's CPU kernels choose their accumulation order from the shape of the batch, so
    /// a row decoded beside others can get other low bits than alone (measured with `make
    /// batch-probe`: on the repacking build, rows in groups of four go through a 4-row kernel,
    /// the rest through the one-row kernel; at eight rows the tiled K-quant kernel takes over).
    /// A generation call therefore holds at most `rows_per_call` sequences, the most this
    /// build's kernels treat exactly like one (`compute::EXACT_BATCH_ROWS`), so every
    /// conversation's tokens stay independent of its neighbours (invariant 3).
    fn step(&mut self) {
        let generating: Vec<usize> = (0..self.jobs.len())
            .filter(|&i| {
                self.jobs[i]
                    .as_ref()
                    .is_some_and(|j| j.next_token.is_some())
            })
            .collect();
        for group in exact_groups(&generating, self.rows_per_call) {
            self.decode(&group);
        }
        // Prompt chunks always go alone, each as long as the batch allows, counted from the
        // turn's start whatever else is pending: where a prompt is cut decides the kernels
        // that fill its cache (and where its cells land), so the cuts must depend on the
        // conversation alone. The budget only decides how many chunks run in this step.
        let mut budget = self.n_batch;
        for index in 0..self.jobs.len() {
            while budget > 0 {
                let Some(job) = &self.jobs[index] else {
                    break;
                };
                if job.next_token.is_some() || job.evaluated == job.to_evaluate.len() {
                    break;
                }
                let count = prompt_chunk_len(
                    self.slots[index].cached.len(),
                    job.to_evaluate.len() - job.evaluated,
                    self.n_batch,
                );
                budget = budget.saturating_sub(count);
                self.decode_prompt_chunk(index, count);
            }
        }
    }

    /// Decodes the pending token of each request in `indices` together, then samples each.
    fn decode(&mut self, indices: &[usize]) {
        self.batch.clear();
        let mut plan = Vec::with_capacity(indices.len());
        for &index in indices {
            let job = self.jobs[index]
                .as_ref()
                .expect("caller passes running jobs");
            let token = job.next_token.expect("caller passes generating jobs");
            let slot = &self.slots[index];
            let at = self.batch.n_tokens();
            self.batch
                .add(
                    LlamaToken(token),
                    slot.cached.len() as i32,
                    &[slot.seq_id],
                    true,
                )
                .expect("the batch holds one token per sequence");
            plan.push((index, 1, Some(at)));
        }
        self.run_batch(plan);
    }

    /// Decodes the next `count` prompt tokens of the request in `index`.
    fn decode_prompt_chunk(&mut self, index: usize, count: usize) {
        self.batch.clear();
        let job = self.jobs[index]
            .as_ref()
            .expect("caller passes a running job");
        let slot = &self.slots[index];
        let chunk = &job.to_evaluate[job.evaluated..job.evaluated + count];
        let mut logits_at = None;
        for (offset, &token) in chunk.iter().enumerate() {
            let last = job.evaluated + offset + 1 == job.to_evaluate.len();
            if last {
                logits_at = Some(self.batch.n_tokens());
            }
            let position = (slot.cached.len() + offset) as i32;
            self.batch
                .add(LlamaToken(token), position, &[slot.seq_id], last)
                .expect("count is within the batch size");
        }
        self.run_batch(vec![(index, count, logits_at)]);
    }

    /// Runs the prepared batch; `plan` lists (slot, tokens added, batch index of its logits).
    fn run_batch(&mut self, plan: Vec<(usize, usize, Option<i32>)>) {
        let evaluated = self.batch.n_tokens() as u64;
        tracing::trace!(?plan, "decode (slot, tokens, logits index)");
        if let Err(error) = self.ctx.decode(&mut self.batch) {
            tracing::error!(%error, "llama_decode failed; failing the requests in this batch");
            for (index, _, _) in plan {
                let seq = self.slots[index].seq_id as u32;
                let _ = self.ctx.clear_kv_cache_seq(Some(seq), None, None);
                self.slots[index].cached.clear();
                self.slots[index].saved_prefix = 0;
                if let Some(job) = &self.jobs[index] {
                    let _ = job
                        .events
                        .send(Event::Failed(EngineError::Internal(error.to_string())));
                }
                self.finish(index, FinishReason::Cancelled);
            }
            return;
        }
        metrics::counter!("kvsnap_tokens_evaluated_total").increment(evaluated);
        metrics::counter!("kvsnap_decode_calls_total").increment(1);
        self.shared.decode_calls.fetch_add(1, Ordering::Relaxed);
        self.shared
            .decode_sequences
            .fetch_add(plan.len() as u64, Ordering::Relaxed);

        let mut boundaries = Vec::new();
        for (index, count, logits_at) in plan {
            let Some(job) = self.jobs[index].as_mut() else {
                continue;
            };
            let slot = &mut self.slots[index];
            if let Some(token) = job.next_token.take() {
                slot.cached.push(token);
            } else {
                slot.cached
                    .extend_from_slice(&job.to_evaluate[job.evaluated..job.evaluated + count]);
                job.evaluated += count;
                if logits_at.is_none() && slot.cached.len().is_multiple_of(PREFIX_GRID) {
                    boundaries.push(index);
                }
                // The chunk cut short to keep the last token apart is not reported on its own,
                // so progress comes once per batch-sized piece, as llama-server reports it.
                let held_back = job.to_evaluate.len() - job.evaluated == 1 && count < self.n_batch;
                if !held_back {
                    let _ = job.events.send(Event::PromptProgress {
                        evaluated: job.evaluated,
                    });
                }
            }
            if let Some(at) = logits_at {
                self.sample_next(index, at);
            }
        }
        for index in boundaries {
            self.at_prompt_boundary(index);
        }
    }

    /// Chooses the next token for the request in `index` from the logits at batch index `at`.
    fn sample_next(&mut self, index: usize, at: i32) {
        let job = self.jobs[index].as_mut().expect("caller checked the job");
        let slot = &self.slots[index];
        if !job.prompt_done {
            job.prompt_done = true;
            let _ = job.events.send(Event::PromptDone);
        }
        if job.max_tokens == Some(job.generated) {
            self.finish(index, FinishReason::Length);
            return;
        }
        let logits = self.ctx.get_logits_ith(at);
        let (token, probs) = choose(logits, &slot.cached, job);
        job.generated += 1;
        metrics::counter!("kvsnap_tokens_generated_total").increment(1);

        let vocab = self.model.vocab();
        if !job.ignore_eos && vocab.is_eog(LlamaToken(token)) {
            self.finish(index, FinishReason::Eog);
            return;
        }
        let piece = vocab.token_to_piece(LlamaToken(token), false, None);
        let probs = probs.map(|p| {
            Box::new(TokenProbs {
                id: token,
                piece: piece.clone(),
                prob: p.prob,
                top: p
                    .top
                    .into_iter()
                    .map(|(id, prob)| Candidate {
                        id,
                        piece: vocab.token_to_piece(LlamaToken(id), false, None),
                        prob,
                    })
                    .collect(),
            })
        });
        let stopped = job.stops.push(&piece);
        let token_event = Event::Token {
            id: token,
            piece,
            probs,
        };
        if job.events.send(token_event).is_err() {
            self.finish(index, FinishReason::Cancelled);
            return;
        }
        // Like an end-of-generation token, the token that completes a stop string is the
        // turn's last: it is not decoded, and the turn is saved up to it before the reply ends.
        if stopped {
            self.finish(index, FinishReason::Stop);
        } else if job.max_tokens == Some(job.generated) {
            self.finish(index, FinishReason::Length);
        } else if slot.cached.len() >= self.info.n_ctx_per_sequence as usize {
            self.finish(index, FinishReason::ContextFull);
        } else {
            job.next_token = Some(token);
        }
    }

    /// Ends the request in `index`, keeps its conversation's random stream, frees the slot.
    /// With the `turn` policy the conversation is saved first, so a reply that has ended is a
    /// turn that is on disk.
    fn finish(&mut self, index: usize, reason: FinishReason) {
        let Some(job) = self.jobs[index].take() else {
            return;
        };
        if let Some(id) = job.session {
            self.streams.insert(id, job.rng);
        }
        self.clock += 1;
        let slot = &mut self.slots[index];
        slot.busy = false;
        slot.last_used = self.clock;
        slot.last_used_ms = now_ms();
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        if let Err(error) = self.lay_out_as_restored(index) {
            let _ = job.events.send(Event::Failed(unsaved_turn(&error)));
            return;
        }
        if job.session.is_none() && self.keeper.saves_every_turn() {
            // Kept for the next request that starts with it; the reply does not wait.
            self.keep_unnamed(index);
        }
        if self.keeper.saves_every_turn()
            && job.session.is_some()
            && !self.slots[index].cached.is_empty()
        {
            // The reply ends once the writer committed the turn; decoding goes on meanwhile.
            // A turn that could not be saved is not acknowledged: its reply ends in an error.
            let events = job.events.clone();
            let then = Box::new(move |result: &super::SaveResult| {
                let _ = match result {
                    Ok(_) => events.send(Event::Finished(reason)),
                    Err(error) => events.send(Event::Failed(unsaved_turn(error))),
                };
            });
            let events = job.events.clone();
            if let Err(error) = self.queue_save(index, then) {
                let _ = events.send(Event::Failed(unsaved_turn(&error)));
            }
            return;
        }
        let _ = job.events.send(Event::Finished(reason));
    }
}

impl Worker<'_> {
    /// Reloads a conversation's own state into its sequence at the end of each turn, once it
    /// is past the sliding window, so that its cache is laid out exactly as a restore of that
    /// state lays it out. llama.cpp frees the cells that leave the window and fills the holes
    /// later, while a restore packs the cells from the start; the attention sums then run over
    /// the same values in other lanes and the logits part in their low bits a few tokens on
    /// (`make batch-probe` with PROBE_RESTORE=1). After this, the conversation that stays and
    /// the one restored anywhere from its save continue from the same layout.
    fn lay_out_as_restored(&mut self, index: usize) -> Result<(), EngineError> {
        let n_swa = self.info.n_swa as usize;
        if n_swa == 0 || self.slots[index].cached.len() <= n_swa {
            return Ok(());
        }
        let slot = &mut self.slots[index];
        let seq = slot.seq_id;
        let Ok(state) = self.ctx.state_seq_get(seq, LlamaStateSeqFlags::empty()) else {
            tracing::warn!(seq, "could not read a sequence to lay it out as restored");
            return Ok(());
        };
        let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
        if let Err(error) = self.ctx.state_seq_set(&state, seq) {
            // Its own bytes, just read: not expected. The turn is not acknowledged; the store
            // keeps the conversation's previous version.
            let _ = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            slot.cached.clear();
            slot.saved_prefix = 0;
            slot.dirty = false;
            return Err(EngineError::Internal(format!(
                "llama.cpp refused the conversation's own state back: {error}"
            )));
        }
        Ok(())
    }

    /// A prompt chunk ended at a grid boundary (`PREFIX_GRID`): past the window the cache is
    /// laid out as restored, as every run reaching this boundary lays it out; and when this
    /// turn is canonical and the boundary is among its prompt's last (`CHECKPOINT_SPAN`), the
    /// state is kept as a checkpoint a new conversation with the same beginning may start from.
    fn at_prompt_boundary(&mut self, index: usize) {
        if let Err(error) = self.lay_out_as_restored(index) {
            if let Some(job) = self.jobs[index].as_ref() {
                let _ = job.events.send(Event::Failed(error));
            }
            self.finish(index, FinishReason::Cancelled);
            return;
        }
        let Some(job) = self.jobs[index].as_ref() else {
            return;
        };
        let body_left = job.to_evaluate.len() - job.evaluated - 1;
        if job.canonical && body_left < CHECKPOINT_SPAN {
            self.keep_checkpoint(index);
        }
    }
}

/// The error a turn's reply ends with when its save failed (the `turn` policy promises a reply
/// that ended is on disk). The conversation stays resident with the turn, unsaved: the next
/// save tries again.
fn unsaved_turn(error: &dyn std::fmt::Display) -> EngineError {
    tracing::error!(%error, "could not save the conversation after its turn");
    EngineError::Unsaved(format!(
        "the reply was generated but the conversation could not be saved ({error}), so this \
         turn is not acknowledged; send it again"
    ))
}

/// Cuts the generating slots (ascending; a slot's index is its sequence id) into decode calls
/// of at most `most` sequences, each a run of consecutive sequence ids: llama.cpp puts only
/// consecutive ids in one micro-batch (`split_equal`) and would cut any other call itself.
fn exact_groups(slots: &[usize], most: usize) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for &slot in slots {
        match groups.last_mut() {
            Some(group) if group.len() < most && group.last().map(|l| l + 1) == Some(slot) => {
                group.push(slot)
            }
            _ => groups.push(vec![slot]),
        }
    }
    groups
}

/// Prompts are cut at multiples of this absolute position, whatever the turn's start, so a
/// prefix's K/V are computed in the same calls by every run that reaches it; at each such
/// boundary past the sliding window the cache is laid out as a restore lays it out. A state kept
/// at a boundary is then exactly what a cold start of its tokens computes there (`make
/// batch-probe` with PROBE_PREFIX=1: identical logits for 32 steps at grids of 512, 256, 128
/// and 64; cut anywhere else, or not laid out, they differ). The finer the grid, the closer to where
/// two prompts part a checkpoint can be; measured on Gemma 3 270M (2,623-token prompts, two
/// cores, four runs each, twice), prefill took as long at 128 as at 512 (2.9-3.3 s against
/// 3.2-3.4 s) and 5-20% longer at 64.
pub(super) const PREFIX_GRID: usize = 128;

/// A prompt computed as a cold start computes it keeps a checkpoint at each grid boundary in
/// its last this many tokens: where another conversation with the same beginning (a shared
/// system prompt, then its own first message) most likely parts from it.
const CHECKPOINT_SPAN: usize = 512;

/// How many of a prompt's `remaining` tokens the next call decodes, the sequence holding
/// `position` tokens: up to the next grid boundary (`PREFIX_GRID`), at most the batch size. The
/// last prompt token always goes in a call of its own: the logits that choose the first reply
/// token then come from the same computation whether the prompt was decoded now or found whole
/// in the cache (a resent prompt decodes only its last token again), so a cache hit never
/// changes a seeded reply.
fn prompt_chunk_len(position: usize, remaining: usize, n_batch: usize) -> usize {
    if remaining <= 1 {
        return remaining;
    }
    let to_boundary = PREFIX_GRID - position % PREFIX_GRID;
    (remaining - 1).min(to_boundary).min(n_batch)
}

#[cfg(test)]
mod tests {
    use super::{exact_groups, first_needed_position, prompt_chunk_len};
    use crate::engine::model_info::WindowKind;

    #[test]
    fn generation_calls_are_runs_of_consecutive_sequences_within_the_exact_size() {
        assert_eq!(exact_groups(&[], 3), Vec::<Vec<usize>>::new());
        assert_eq!(exact_groups(&[0, 1, 2, 3], 3), vec![vec![0, 1, 2], vec![3]]);
        assert_eq!(
            exact_groups(&[0, 2, 3, 5], 7),
            vec![vec![0], vec![2, 3], vec![5]]
        );
        assert_eq!(exact_groups(&[1, 2, 3, 4, 5, 6, 7, 8], 7).len(), 2);
        assert_eq!(exact_groups(&[0, 1, 2], 1), vec![vec![0], vec![1], vec![2]]);
    }

    #[test]
    fn the_window_needs_exactly_the_last_n_swa_positions_or_the_chunk() {
        let sliding = WindowKind::Sliding;
        // Query 1733 with a window of 512 attends to 1222..=1733: 512 positions.
        assert_eq!(first_needed_position(1733, 512, sliding), 1222);
        assert_eq!(1733 - first_needed_position(1733, 512, sliding) + 1, 512);
        assert_eq!(first_needed_position(100, 512, sliding), 0);
        // In chunks of 8192, query 9000 attends to its chunk, 8192..=9000; 8191 to 0..=8191.
        let chunked = WindowKind::Chunked;
        assert_eq!(first_needed_position(9000, 8192, chunked), 8192);
        assert_eq!(first_needed_position(8191, 8192, chunked), 0);
        assert_eq!(first_needed_position(8192, 8192, chunked), 8192);
        assert_eq!(first_needed_position(9000, 0, chunked), 0);
    }

    #[test]
    fn the_last_prompt_token_goes_alone() {
        assert_eq!(prompt_chunk_len(0, 1, 32), 1);
        assert_eq!(prompt_chunk_len(0, 10, 32), 9);
        assert_eq!(prompt_chunk_len(0, 32, 32), 31);
        assert_eq!(prompt_chunk_len(0, 33, 32), 32);
        assert_eq!(prompt_chunk_len(0, 100, 32), 32);
    }

    #[test]
    fn prompts_are_cut_at_absolute_grid_boundaries() {
        let grid = super::PREFIX_GRID;
        // From the start: a whole grid cell, then the rest but the last token.
        assert_eq!(prompt_chunk_len(0, grid + 100, 4096), grid);
        assert_eq!(prompt_chunk_len(grid, 100, 4096), 99);
        // A turn starting mid-cell first fills the cell up to the boundary.
        assert_eq!(prompt_chunk_len(grid - 10, 500, 4096), 10);
        assert_eq!(prompt_chunk_len(3 * grid + 1, 2 * grid, 4096), grid - 1);
        // The batch size still bounds a call.
        assert_eq!(prompt_chunk_len(0, 4 * grid, 32), 32);
    }
}
