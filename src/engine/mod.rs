//! The only code that touches llama.cpp.
//!
//! One OS thread (`worker`) owns the model and its context. Everything else holds an
//! `EngineHandle` — cheap to clone, `Send` — and talks to that thread in messages with a reply
//! channel. Generation replies with a stream of `Event`s; the rest with a oneshot.
//!
//! - `worker.rs`: the thread: load, then a loop of "take commands, admit requests, one batched
//!   decode step".
//! - `slots.rs`: which llama.cpp sequence serves which conversation, and how much of its cache a
//!   new prompt can keep.
//! - `model_info.rs`: facts read from the model at load.
//! - `state_io.rs`: a sequence's llama.cpp state out and (verified) back in; the only `unsafe`.
//! - `keeper.rs`: the `Keeper` port through which the engine hands state out to be kept and
//!   gets stored state back; `sessions::StoreKeeper` implements it on the store.
//! - `persist.rs`: a sequence's state out as a snapshot, verified state in; describe,
//!   import, export, fork, as the engine sees them.
//! - `scratch.rs`: the buffers every save and restore reuses.
//! - `moves.rs`: handing a conversation to another instance (mark moving, then forward).

mod entries;
mod grammar;
mod jinja;
mod keeper;
mod model_info;
mod moves;
mod persist;
mod scratch;
mod sleep;
mod slots;
mod state_io;
mod stops;
mod vocab;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::{mpsc as async_mpsc, oneshot};
use uuid::Uuid;

use crate::sampling::SamplingParams;

pub use grammar::Constraint;
pub use keeper::{
    AfterSave, FoundEntry, Keep, KeepAs, KeepError, Keeper, SaveJob, SaveResult, Saved,
};
pub use model_info::ModelInfo;
pub use stops::{find_stop, take_complete_utf8};
pub use vocab::{MAX_CONSTRAINT_BYTES, Vocabulary};

/// What the engine needs to start. Built from `Config` once, at start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model_path: PathBuf,
    /// Total context in tokens, shared equally by the `parallel` sequences.
    pub ctx_size: u32,
    pub parallel: u32,
    pub threads: i32,
    pub batch_size: u32,
    pub ubatch_size: u32,
    /// Off by default; measured exact either way on this llama.cpp (docs/decisions), and
    /// needed on for a quantized V cache.
    pub flash_attention: bool,
    /// Decode generating sequences together, at most `compute::EXACT_BATCH_ROWS` per call (see
    /// `worker::Worker::step`); off decodes each alone.
    pub shared_batches: bool,
    /// Requests that may wait for a sequence before new ones get "overloaded".
    pub queue_size: usize,
    /// A llama.cpp built-in chat template name; `None` uses the model's own, else one chosen
    /// from the architecture.
    pub chat_template: Option<String>,
    /// Render chats with the Jinja template itself (`jinja.rs`), as llama-server's `--jinja`.
    pub jinja: bool,
    /// Whether conversations' state is kept (every `--persist` but `off`): a model whose state
    /// kvsnap cannot keep is then refused at start, not served with every save failing.
    pub keep_state: bool,
    /// The KV cache's element types (llama-server's `-ctk`, `-ctv`).
    pub cache_type_k: CacheType,
    pub cache_type_v: CacheType,
    /// Unload the model after this long with nothing to do (`--sleep-idle-seconds`).
    pub sleep_idle: Option<std::time::Duration>,
}

/// A KV cache element type: the ones llama-server accepts for `-ctk`/`-ctv`, named as there.
/// Snapshots record each layer's types, so a state never loads into a cache of another type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
pub enum CacheType {
    #[value(name = "f32")]
    #[serde(rename = "f32")]
    F32,
    #[value(name = "f16")]
    #[serde(rename = "f16")]
    F16,
    #[value(name = "bf16")]
    #[serde(rename = "bf16")]
    Bf16,
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    #[serde(rename = "q4_1")]
    Q4_1,
    #[value(name = "iq4_nl")]
    #[serde(rename = "iq4_nl")]
    Iq4Nl,
    #[value(name = "q5_0")]
    #[serde(rename = "q5_0")]
    Q5_0,
    #[value(name = "q5_1")]
    #[serde(rename = "q5_1")]
    Q5_1,
}

impl CacheType {
    /// Block-quantized types: llama.cpp stores V of these only by row, which needs flash
    /// attention.
    pub fn is_quantized(self) -> bool {
        !matches!(self, CacheType::F32 | CacheType::F16 | CacheType::Bf16)
    }

    /// The name llama.cpp gives it (and `-ctk`/`-ctv` take).
    pub fn name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string())
    }
}

/// Who is asking, for conversation ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// Auth is off: conversations belong to nobody.
    Anyone,
    /// A user key, as a blake3 hash (keys themselves are never stored).
    User(String),
    /// An admin key, as a blake3 hash: it may use every conversation, and what it creates is
    /// its own (were it nobody's, every user key could read and delete it).
    Admin(String),
    /// kvsnap itself (listings and moves on an admin's behalf): it may use every conversation
    /// and creates none.
    System,
}

impl Requester {
    /// The owner recorded for a conversation this requester creates.
    pub fn owner(&self) -> Option<String> {
        match self {
            Requester::User(hash) | Requester::Admin(hash) => Some(hash.clone()),
            Requester::Anyone | Requester::System => None,
        }
    }

    /// Whether this requester may use a conversation owned by `owner`.
    pub fn may_use(&self, owner: &Option<String>) -> bool {
        match (self, owner) {
            (Requester::Admin(_) | Requester::System | Requester::Anyone, _) => true,
            (Requester::User(_), None) => true,
            (Requester::User(me), Some(them)) => me == them,
        }
    }

    /// Whose anonymous prompt cache this requester may reuse: its own key's only (`None` with
    /// auth off, where there is one tenant).
    pub fn tenant(&self) -> Option<String> {
        self.owner()
    }
}

/// One llama.cpp sequence, as llama-server's `GET /slots` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotInfo {
    pub id: usize,
    pub n_ctx: u32,
    pub is_processing: bool,
    pub n_tokens: usize,
    /// The conversation whose cache the slot holds, if any.
    pub session_id: Option<Uuid>,
    /// Whose it is: the conversation's owner, else the key of the anonymous prompts it
    /// caches. Never shown; the HTTP layer shows a slot's conversation to its owner only.
    #[serde(skip)]
    pub owner: Option<String>,
}

/// What a slot save or restore moved.
#[derive(Debug, Clone)]
pub struct SlotFile {
    pub tokens: usize,
    pub bytes: usize,
    pub millis: f64,
}

/// What the API tells about one conversation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub session_id: Uuid,
    /// "resident" (in a llama.cpp sequence), "stored", or "damaged".
    pub state: &'static str,
    pub tokens: u64,
    /// Size of its stored snapshot, 0 if never stored.
    pub bytes: u64,
    pub model: String,
    pub created_ms: u64,
    pub last_used_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    /// blake3 of its stored snapshot file, when the stored snapshot is its current state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    #[serde(skip)]
    pub owner: Option<String>,
    /// The profile its state was written under, and whether it continues here bit-exactly.
    #[serde(flatten)]
    pub exactness: crate::compute::Exactness,
}

/// A resident conversation as its sequence holds it.
#[derive(Debug, Clone)]
pub struct Residency {
    /// Its live token count; `bytes` 0 and no checksum (the store knows those).
    pub info: SessionInfo,
    /// It has changes its stored version lacks.
    pub dirty: bool,
}

/// Why `sessions/` holds a conversation in the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldFor {
    /// An upload replaces it: unsaved changes are saved first, so nothing is lost if the
    /// upload is refused.
    Upload,
    /// Another instance sends it back: as `Upload`, and a forward to it does not refuse.
    Return,
    /// It is deleted: unsaved changes go with it.
    Delete,
}

/// A conversation leaving for another instance: its snapshot file and what its record says.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub tokens: u64,
    pub owner: Option<String>,
    pub created_ms: u64,
}

/// A chat prompt: its messages, and the tools the model may call (OpenAI's form,
/// `{"type": "function", "function": {"name", "description", "parameters"}}`), which only a
/// `--jinja` template shows it.
#[derive(Debug, Clone, Default)]
pub struct Chat {
    pub messages: Vec<ChatMessage>,
    pub tools: Vec<serde_json::Value>,
}

/// One chat message, already validated as text by the HTTP layer.
#[derive(Debug, Clone, Default)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// A reply's thinking (OpenAI's `reasoning_content`, Anthropic's thinking blocks): only a
    /// `--jinja` template that renders it shows it to the model; empty when there is none.
    pub reasoning: String,
    /// The tools a reply called.
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message's answer to this call.
    pub tool_call_id: String,
}

/// A tool call, in a reply of the history or parsed out of a new one.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object, as templates read it (`tool_call.arguments | tojson`).
    pub arguments: serde_json::Value,
}

impl ChatMessage {
    /// Roughly how much there is to render, in bytes.
    fn input_bytes(&self) -> usize {
        let calls: usize = self
            .tool_calls
            .iter()
            .map(|c| c.name.len() + c.arguments.to_string().len())
            .sum();
        self.content.len() + self.reasoning.len() + calls
    }
}

impl Chat {
    fn input_bytes(&self) -> usize {
        let tools: usize = self.tools.iter().map(|t| t.to_string().len()).sum();
        self.messages
            .iter()
            .map(ChatMessage::input_bytes)
            .sum::<usize>()
            + tools
    }
}

impl Prompt {
    /// Roughly how much there is to tokenize, in bytes.
    fn input_bytes(&self) -> usize {
        match self {
            Prompt::Text(text) => text.len(),
            Prompt::Tokens(tokens) => 4 * tokens.len(),
            Prompt::Chat(chat) => chat.input_bytes(),
        }
    }
}

/// What to continue from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Plain text, tokenized with the model's special tokens (BOS) added.
    Text(String),
    /// Token ids as given; each is checked against the vocabulary.
    Tokens(Vec<i32>),
    /// Messages rendered with the model's chat template, ending with the assistant's turn.
    Chat(Chat),
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The conversation this turn belongs to; its cached tokens and random stream are reused.
    pub session: Option<Uuid>,
    pub prompt: Prompt,
    /// `None`: until end of generation or the conversation's context is full.
    pub max_tokens: Option<u32>,
    pub sampling: SamplingParams,
    /// Re-seeds the conversation's random stream; without it the stream continues.
    pub seed: Option<u64>,
    /// Reuse the longest cached prefix (llama-server's `cache_prompt`).
    pub cache_prompt: bool,
    pub requester: Requester,
    /// Keep generating past end-of-generation tokens (llama-server's `ignore_eos`).
    pub ignore_eos: bool,
    /// A grammar or JSON schema the reply must match.
    pub constraint: Option<Constraint>,
    /// Report each token's probability and the likeliest alternatives.
    pub probs: Option<ProbsRequest>,
    /// The turn ends at the token that completes one of these in the generated text; that
    /// token and those before it are the turn (the text is cut at the string).
    pub stops: Vec<String>,
}

/// Which probabilities a request wants with each token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbsRequest {
    /// How many of the likeliest tokens to list.
    pub n: usize,
    /// From the distribution the token was drawn from (after penalties, bias, top-k, top-p,
    /// min-p and temperature) rather than the model's own.
    pub after_sampling: bool,
}

/// A token's probability and its likeliest alternatives, with their text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProbs {
    /// The token chosen, its text and its probability.
    pub id: i32,
    pub piece: Vec<u8>,
    pub prob: f32,
    /// Most likely first.
    pub top: Vec<Candidate>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: i32,
    pub piece: Vec<u8>,
    pub prob: f32,
}

/// What the engine tells a request, in this order: `Started`, `PromptProgress`es, `PromptDone`,
/// `Token`s, then `Finished` — or `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    Started(Started),
    /// How many of the prompt's uncached tokens have been evaluated: 0 first, then after each
    /// decode call that carried some.
    PromptProgress {
        evaluated: usize,
    },
    PromptDone,
    Token {
        id: i32,
        piece: Vec<u8>,
        probs: Option<Box<TokenProbs>>,
    },
    Finished(FinishReason),
    Failed(EngineError),
}

#[derive(Debug, Clone)]
pub struct Started {
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was already in the sequence: not evaluated again.
    pub cached_tokens: usize,
    pub slot: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Eog,
    /// The generated text holds one of the request's stop strings.
    Stop,
    Length,
    ContextFull,
    Cancelled,
}

/// Engine failures; the HTTP layer maps each to a status in one place.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("{0}")]
    InvalidInput(String),
    #[error(
        "the prompt has {tokens} tokens, which exceeds the available context size: a \
         conversation holds at most {limit} prompt tokens"
    )]
    PromptTooLong { tokens: usize, limit: usize },
    #[error("all {0} waiting places are taken; retry shortly")]
    Overloaded(usize),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the model could not be loaded: {0}")]
    Load(String),
    #[error("{0}")]
    NotFound(String),
    /// The request is fine but cannot proceed now (a turn running, a move in progress): 409
    /// with a hint to retry.
    #[error("{0}")]
    Conflict(String),
    /// The data can never fit this server (another model, layout or file version): 409
    /// without a retry hint.
    #[error("{0}")]
    Incompatible(String),
    /// Stored data is damaged; the conversation is kept, marked damaged.
    #[error("{0}")]
    Damaged(String),
    /// The conversation moved to another instance.
    #[error("conversation {session} moved to {target}")]
    Moved { session: Uuid, target: String },
    #[error("llama.cpp failed: {0}")]
    Internal(String),
    /// The keeper (`keeper.rs`) could not keep or read back a conversation: its store failed.
    #[error("the conversation store failed: {0}")]
    Keeping(String),
    /// A turn was generated but its save failed, so it is not acknowledged; send it again.
    #[error("{0}")]
    Unsaved(String),
}

impl From<KeepError> for EngineError {
    fn from(error: KeepError) -> Self {
        match error {
            KeepError::Damaged(reason) => EngineError::Damaged(reason),
            KeepError::Incompatible(reason) => EngineError::Incompatible(reason),
            KeepError::Failed(reason) => EngineError::Keeping(reason),
        }
    }
}

enum Command {
    /// A turn whose prompt the handle has tokenized and checked (`vocab.rs`).
    Generate {
        request: Box<GenerateRequest>,
        tokens: Vec<i32>,
        events: async_mpsc::UnboundedSender<Event>,
    },
    /// Finish every request now (shutdown deadline passed).
    CancelAll,
    /// Save a resident conversation now; replies after the commit (`None`: not resident).
    Save {
        session: Uuid,
        requester: Requester,
        reply: oneshot::Sender<Result<Option<SessionInfo>, EngineError>>,
    },
    /// A resident conversation as its sequence holds it (`None`: not resident).
    Look {
        session: Uuid,
        requester: Requester,
        reply: oneshot::Sender<Result<Option<Residency>, EngineError>>,
    },
    Resident {
        reply: oneshot::Sender<Vec<SessionInfo>>,
    },
    /// Nothing but to be awake: a request that reads the model's vocabulary is about to be
    /// followed by a turn, so a sleeping engine loads the model now, as llama-server does.
    Wake {
        reply: oneshot::Sender<()>,
    },
    /// Empty the sequence holding `session`, unsaved: another instance continued it, so this
    /// copy is older than the stored one about to replace it.
    DropResident {
        session: Uuid,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// A resident conversation's snapshot file, taken now (`None`: not resident).
    CheckOut {
        session: Uuid,
        requester: Requester,
        reply: oneshot::Sender<Result<Option<Vec<u8>>, EngineError>>,
    },
    Slots {
        reply: oneshot::Sender<Vec<SlotInfo>>,
    },
    SlotSave {
        slot: usize,
        path: PathBuf,
        reply: oneshot::Sender<Result<SlotFile, EngineError>>,
    },
    SlotRestore {
        slot: usize,
        path: PathBuf,
        /// The restored prompts are this requester's: only its key may reuse them.
        requester: Requester,
        reply: oneshot::Sender<Result<SlotFile, EngineError>>,
    },
    SlotErase {
        slot: usize,
        reply: oneshot::Sender<Result<usize, EngineError>>,
    },
    /// Refuse every turn and change to `session` until `Release`: its stored version is about
    /// to be replaced or deleted. Replies whether it is resident.
    Hold {
        session: Uuid,
        requester: Requester,
        purpose: HoldFor,
        reply: oneshot::Sender<Result<bool, EngineError>>,
    },
    /// Ends a `Hold`; with `replaced`, the resident copy (now older than the store's) goes.
    Release {
        session: Uuid,
        replaced: bool,
        reply: oneshot::Sender<()>,
    },
    /// Hold a conversation for a move; a resident one is handed out as a snapshot (saved first
    /// if it has unsaved changes), a stored one is the caller's to read.
    BeginMove {
        session: Uuid,
        reply: oneshot::Sender<Result<Option<Outgoing>, EngineError>>,
    },
    /// Ends a move: `moved`, the store forwards it now and the resident copy goes; otherwise
    /// the conversation simply stays.
    EndMove {
        session: Uuid,
        moved: bool,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl SessionInfo {
    /// Whether a state written under `profile` continues bit-exactly on this server.
    pub fn exactness_here(profile: Option<&str>, model: &ModelInfo) -> crate::compute::Exactness {
        let running = model
            .live
            .as_ref()
            .ok()
            .and_then(|l| l.layout.compute_profile.as_deref())
            .unwrap_or(crate::compute::THIS_BUILD);
        crate::compute::Exactness::of(profile, running)
    }
}

impl Command {
    /// The conversation whose stored version this command reads or changes, if any.
    fn stored_session(&self) -> Option<Uuid> {
        match self {
            Command::Save { session, .. }
            | Command::Look { session, .. }
            | Command::DropResident { session, .. }
            | Command::CheckOut { session, .. }
            | Command::Hold { session, .. }
            | Command::BeginMove { session, .. }
            | Command::EndMove { session, .. } => Some(*session),
            _ => None,
        }
    }
}

/// Counters shared between the handle and the worker.
#[derive(Debug, Default)]
struct Shared {
    /// Requests submitted but not yet given a sequence.
    waiting: AtomicUsize,
    /// Requests holding a sequence.
    active: AtomicUsize,
    /// llama_decode calls made, and the sequences they carried in all.
    decode_calls: AtomicU64,
    decode_sequences: AtomicU64,
    /// The model is unloaded after `--sleep-idle-seconds` of nothing to do.
    sleeping: AtomicBool,
}

/// How busy the decode calls have been since start (llama-server's `n_decode_total` and
/// `n_busy_slots_per_decode`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeStats {
    pub calls: u64,
    pub sequences: u64,
}

/// The rest of the program's way to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

/// A turn tokenized and holding its place in the waiting queue, not yet handed to the worker.
pub struct Prepared {
    request: GenerateRequest,
    tokens: Vec<i32>,
    place: WaitingPlace,
}

impl Prepared {
    pub fn request(&self) -> &GenerateRequest {
        &self.request
    }

    /// The prompt's tokens, as the worker will evaluate them.
    pub fn tokens(&self) -> &[i32] {
        &self.tokens
    }
}

/// A request's place in the waiting count, given back when dropped unless the worker took the
/// request over (and with it the duty to give the place back).
struct WaitingPlace(Option<Arc<Shared>>);

impl WaitingPlace {
    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for WaitingPlace {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

struct HandleInner {
    commands: mpsc::Sender<Command>,
    tokenizer: vocab::Tokenizer,
    shared: Arc<Shared>,
    queue_size: usize,
    info: ModelInfo,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        // The worker leaves its loop when every sender is gone; wait so llama.cpp is freed
        // before the process exits.
        let (dead_sender, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, dead_sender));
        if let Some(thread) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = thread.join();
        }
    }
}

impl EngineHandle {
    /// Loads the model on a new thread and returns once it is ready (or failed). Blocking.
    /// Conversations not in a sequence are kept by `keeper`.
    pub fn start(config: EngineConfig, keeper: Box<dyn Keeper>) -> Result<Self, EngineError> {
        let (commands, receiver) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        let worker_shared = shared.clone();
        let queue_size = config.queue_size;
        let thread = std::thread::Builder::new()
            .name("kvsnap-engine".into())
            .spawn(move || worker::run(config, keeper, receiver, worker_shared, ready_tx))
            .map_err(|e| EngineError::Load(format!("cannot start the engine thread: {e}")))?;
        let (info, vocab) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(EngineError::Load(
                    "the engine thread stopped while loading".into(),
                ));
            }
        };
        Ok(Self {
            inner: Arc::new(HandleInner {
                commands,
                tokenizer: vocab::Tokenizer::start(vocab)?,
                shared,
                queue_size,
                info,
                thread: std::sync::Mutex::new(Some(thread)),
            }),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    /// Requests waiting for a sequence.
    pub fn queue_depth(&self) -> usize {
        self.inner.shared.waiting.load(Ordering::Relaxed)
    }

    /// Requests holding a sequence.
    pub fn active(&self) -> usize {
        self.inner.shared.active.load(Ordering::Relaxed)
    }

    /// Whether the model is unloaded for now (`--sleep-idle-seconds`).
    pub fn is_sleeping(&self) -> bool {
        self.inner.shared.sleeping.load(Ordering::SeqCst)
    }

    pub fn decode_stats(&self) -> DecodeStats {
        DecodeStats {
            calls: self.inner.shared.decode_calls.load(Ordering::Relaxed),
            sequences: self.inner.shared.decode_sequences.load(Ordering::Relaxed),
        }
    }

    /// Submits a turn: `prepare`, then `admit`.
    pub async fn generate(
        &self,
        request: GenerateRequest,
    ) -> Result<async_mpsc::UnboundedReceiver<Event>, EngineError> {
        self.admit(self.prepare(request).await?)
    }

    /// Takes a turn's place in the waiting queue (refused at once when the queue is full) and
    /// tokenizes its prompt (and checks a grammar) on the tokenizer thread, never on the
    /// decode thread. The caller may look at the tokens before it `admit`s the turn.
    pub async fn prepare(&self, mut request: GenerateRequest) -> Result<Prepared, EngineError> {
        let shared = self.inner.shared.clone();
        let before = shared.waiting.fetch_add(1, Ordering::SeqCst);
        // The place is given back unless the worker takes the request over, also when the
        // caller goes away while the prompt is being tokenized (its future is dropped here).
        let place = WaitingPlace(Some(shared.clone()));
        let free_sequences = self.inner.info.parallel.saturating_sub(self.active());
        if before >= self.inner.queue_size + free_sequences {
            return Err(EngineError::Overloaded(self.inner.queue_size));
        }
        let prompt = request.prompt.clone();
        let constraint = request.constraint.take();
        let bytes = prompt.input_bytes()
            + constraint.as_ref().map_or(0, |c| match c {
                Constraint::Grammar(text) | Constraint::JsonSchema(text) => text.len(),
            });
        let (tokens, grammar) = self
            .with_vocab(bytes, move |vocab| {
                let tokens = vocab.prompt_tokens(&prompt)?;
                let grammar = constraint.map(|c| vocab.grammar(&c)).transpose()?;
                Ok((tokens, grammar))
            })
            .await?;
        request.constraint = grammar;
        Ok(Prepared {
            request,
            tokens,
            place,
        })
    }

    /// Hands a prepared turn to the worker; its events arrive on the receiver.
    pub fn admit(
        &self,
        prepared: Prepared,
    ) -> Result<async_mpsc::UnboundedReceiver<Event>, EngineError> {
        let Prepared {
            request,
            tokens,
            place,
        } = prepared;
        let (events, receiver) = async_mpsc::unbounded_channel();
        self.inner
            .commands
            .send(Command::Generate {
                request: Box::new(request),
                tokens,
                events,
            })
            .map_err(|_| EngineError::ShuttingDown)?;
        place.handed_over();
        Ok(receiver)
    }

    pub async fn tokenize(
        &self,
        text: String,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<i32>, EngineError> {
        self.with_vocab(text.len(), move |vocab| {
            Ok(vocab.tokenize(&text, add_special, parse_special))
        })
        .await
    }

    /// The prompt a chat renders to with the model's chat template, ending with the
    /// assistant's turn: what a chat request would evaluate.
    pub async fn render_chat(&self, chat: Chat) -> Result<String, EngineError> {
        self.with_vocab(chat.input_bytes(), move |vocab| vocab.render_chat(&chat))
            .await
    }

    /// The tokens a chat renders to, counted as the request would read them (not checked
    /// against the context: a prompt too long to run is still counted).
    pub async fn chat_tokens(&self, chat: Chat) -> Result<Vec<i32>, EngineError> {
        self.with_vocab(chat.input_bytes(), move |vocab| vocab.chat_tokens(&chat))
            .await
    }

    pub async fn detokenize(&self, tokens: Vec<i32>) -> Result<String, EngineError> {
        self.with_vocab(4 * tokens.len(), move |vocab| vocab.detokenize(&tokens))
            .await
    }

    /// Each token's own bytes, as llama-server's `/tokenize` `with_pieces` shows them.
    pub async fn pieces(&self, tokens: Vec<i32>) -> Result<Vec<Vec<u8>>, EngineError> {
        self.with_vocab(4 * tokens.len(), move |vocab| vocab.pieces(&tokens))
            .await
    }

    /// Runs `work` on the vocabulary, on the tokenizer thread (`vocab::Tokenizer`), after
    /// waking a sleeping engine: one job at a time, behind decoding, so a crowd of large
    /// prompts waits its turn instead of taking the cores from every conversation or holding
    /// all its tokens in memory at once.
    async fn with_vocab<T: Send + 'static>(
        &self,
        input_bytes: usize,
        work: impl FnOnce(&Vocabulary) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        if self.is_sleeping() {
            // Tokenizing needs no model (a vocabulary-only copy serves it), but a client that
            // counts or tokenizes is about to send a turn: waking now hides the load from it.
            // A wake that fails (the model file is gone) is the next turn's to report: the
            // vocabulary still serves this request.
            let _ = self.ask(|reply| Command::Wake { reply }).await;
        }
        let (reply, answer) = oneshot::channel();
        self.inner.tokenizer.run(
            input_bytes,
            Box::new(move |vocab| {
                let _ = reply.send(work(vocab));
            }),
        )?;
        answer.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Saves `session` now if it is resident, returning once it is committed; `None` when it
    /// is not resident (its stored version is the latest).
    pub async fn save(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Option<SessionInfo>, EngineError> {
        self.ask(|reply| Command::Save {
            session,
            requester,
            reply,
        })
        .await?
    }

    /// `session` as its sequence holds it, after its queued saves finished; `None` when it is
    /// not resident. Refused (409) while held, `Moved` when it moved away.
    pub async fn look(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Option<Residency>, EngineError> {
        self.ask(|reply| Command::Look {
            session,
            requester,
            reply,
        })
        .await?
    }

    /// Conversations resident in sequences now.
    pub async fn resident(&self) -> Result<Vec<SessionInfo>, EngineError> {
        self.ask(|reply| Command::Resident { reply }).await
    }

    /// Drops the resident copy of `session` without saving it (see `Command::DropResident`).
    pub async fn drop_resident(&self, session: Uuid) -> Result<(), EngineError> {
        self.ask(|reply| Command::DropResident { session, reply })
            .await?
    }

    /// A resident conversation's snapshot file, taken now; `None` when it is not resident.
    pub async fn check_out(
        &self,
        session: Uuid,
        requester: Requester,
    ) -> Result<Option<Vec<u8>>, EngineError> {
        self.ask(|reply| Command::CheckOut {
            session,
            requester,
            reply,
        })
        .await?
    }

    /// Holds `session` while its stored version is replaced or deleted: every turn and change
    /// to it is refused (409) until `release`. Returns whether it is resident.
    pub async fn hold(
        &self,
        session: Uuid,
        requester: Requester,
        purpose: HoldFor,
    ) -> Result<bool, EngineError> {
        self.ask(|reply| Command::Hold {
            session,
            requester,
            purpose,
            reply,
        })
        .await?
    }

    /// Ends a `hold`; `replaced` once the store holds the new version (or none).
    pub async fn release(&self, session: Uuid, replaced: bool) -> Result<(), EngineError> {
        self.ask(|reply| Command::Release {
            session,
            replaced,
            reply,
        })
        .await
    }

    /// Holds `session` for a move (turns and changes refused until `end_move`); a resident one
    /// is handed out, saved first if it has unsaved changes. `None`: read the stored one.
    pub async fn begin_move(&self, session: Uuid) -> Result<Option<Outgoing>, EngineError> {
        self.ask(|reply| Command::BeginMove { session, reply })
            .await?
    }

    /// Ends a move: `moved` once the store forwards the conversation (its resident copy goes),
    /// otherwise it stays.
    pub async fn end_move(&self, session: Uuid, moved: bool) -> Result<(), EngineError> {
        self.ask(|reply| Command::EndMove {
            session,
            moved,
            reply,
        })
        .await?
    }

    pub async fn slots(&self) -> Result<Vec<SlotInfo>, EngineError> {
        self.ask(|reply| Command::Slots { reply }).await
    }

    pub async fn slot_save(&self, slot: usize, path: PathBuf) -> Result<SlotFile, EngineError> {
        self.ask(|reply| Command::SlotSave { slot, path, reply })
            .await?
    }

    pub async fn slot_restore(
        &self,
        slot: usize,
        path: PathBuf,
        requester: Requester,
    ) -> Result<SlotFile, EngineError> {
        self.ask(|reply| Command::SlotRestore {
            slot,
            path,
            requester,
            reply,
        })
        .await?
    }

    pub async fn slot_erase(&self, slot: usize) -> Result<usize, EngineError> {
        self.ask(|reply| Command::SlotErase { slot, reply }).await?
    }

    /// Ends every request now; their streams finish with `Cancelled`.
    pub fn cancel_all(&self) {
        let _ = self.inner.commands.send(Command::CancelAll);
    }

    /// Cancels what is running and stops the engine thread.
    pub async fn shutdown(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Shutdown { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    /// Sends the command `make` builds around a reply channel and waits for the answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(make(reply))?;
        answer.await.map_err(|_| EngineError::ShuttingDown)
    }

    fn send(&self, command: Command) -> Result<(), EngineError> {
        self.inner
            .commands
            .send(command)
            .map_err(|_| EngineError::ShuttingDown)
    }
}
