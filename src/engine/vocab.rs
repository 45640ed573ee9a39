//! Text to tokens and back, off the decode thread.
//!
//! Tokenizing a prompt of megabytes, rendering a long chat through its template or turning a
//! large JSON schema into a grammar takes long enough to stall every conversation if the decode
//! thread does it. So those run here, on a thread of their own (`Tokenizer`) that yields to
//! decoding, over a copy of the model loaded with its vocabulary only (no weights, no context):
//! llama.cpp's vocabulary and templates are read-only, and llama-server tokenizes on its HTTP
//! threads the same way. The decode thread still checks every token id it is given
//! (`docs/rules.md`, engine rule 3).

use std::sync::Arc;

use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

use super::grammar::Constraint;
use super::jinja::JinjaTemplate;
use super::{Chat, ChatMessage, EngineError, Prompt};

/// The largest grammar or JSON schema a request may bring, in bytes: compiling one runs on the
/// decode thread too, and llama.cpp's grammar stacks grow with the square of a rule's
/// alternatives, so its size is bounded (tool schemas of real clients are a few KiB).
pub const MAX_CONSTRAINT_BYTES: usize = 64 * 1024;

/// A message's text for a template that knows no tool calls: each call follows as
/// `{"name": ..., "arguments": ...}`, a blank line before it.
fn text_with_calls(message: &ChatMessage) -> String {
    let mut text = message.content.clone();
    for call in &message.tool_calls {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        let call = serde_json::json!({ "name": call.name, "arguments": call.arguments });
        text.push_str(&call.to_string());
    }
    text
}

/// A cheap handle on the vocabulary; every method blocks and belongs on the tokenizer thread.
#[derive(Clone)]
pub struct Vocabulary {
    inner: Arc<Inner>,
}

struct Inner {
    model: LlamaModel,
    template: Option<LlamaChatTemplate>,
    /// `--jinja`: rendered by the template's own Jinja text instead of llama.cpp's built-ins.
    jinja: Option<JinjaTemplate>,
    n_vocab: i32,
    /// A prompt must leave room for at least one generated token in its sequence.
    n_ctx_per_sequence: usize,
}

impl Vocabulary {
    pub(super) fn new(
        model: LlamaModel,
        template: Option<LlamaChatTemplate>,
        jinja: Option<JinjaTemplate>,
        n_ctx_per_sequence: usize,
    ) -> Self {
        let n_vocab = model.n_vocab();
        Self {
            inner: Arc::new(Inner {
                model,
                template,
                jinja,
                n_vocab,
                n_ctx_per_sequence,
            }),
        }
    }

    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<i32> {
        self.inner
            .model
            .vocab()
            .tokenize(text.as_bytes(), add_special, parse_special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    pub fn detokenize(&self, tokens: &[i32]) -> Result<String, EngineError> {
        self.check(tokens)?;
        let tokens: Vec<LlamaToken> = tokens.iter().map(|&t| LlamaToken(t)).collect();
        let bytes = self.inner.model.vocab().detokenize(&tokens, false, true);
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Each token's own bytes (special tokens as their text).
    pub fn pieces(&self, tokens: &[i32]) -> Result<Vec<Vec<u8>>, EngineError> {
        self.check(tokens)?;
        let vocab = self.inner.model.vocab();
        Ok(tokens
            .iter()
            .map(|&t| vocab.token_to_piece(LlamaToken(t), true, None))
            .collect())
    }

    /// Every id must name a vocabulary entry before llama.cpp sees it.
    pub fn check(&self, tokens: &[i32]) -> Result<(), EngineError> {
        check_ids(tokens, self.inner.n_vocab)
    }

    /// The prompt's tokens, checked against the vocabulary and the sequence's context.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<i32>, EngineError> {
        let tokens = match prompt {
            Prompt::Text(text) => self.tokenize(text, true, true),
            Prompt::Tokens(tokens) => {
                self.check(tokens)?;
                tokens.clone()
            }
            Prompt::Chat(chat) => self.chat_tokens(chat)?,
        };
        check_prompt(&tokens, self.inner.n_ctx_per_sequence)?;
        Ok(tokens)
    }

    /// The tokens a chat renders to, as a chat request reads them.
    pub fn chat_tokens(&self, chat: &Chat) -> Result<Vec<i32>, EngineError> {
        let rendered = self.render_chat(chat)?;
        Ok(self.tokenize(&rendered, true, true))
    }

    /// The prompt a chat renders to with the chat template, ending with the assistant's turn.
    /// llama.cpp's built-in templates know no tools: there, the tools are not shown and a
    /// reply's tool calls are its text followed by each call as JSON.
    pub fn render_chat(&self, chat: &Chat) -> Result<String, EngineError> {
        let messages = chat.messages.as_slice();
        // A last assistant message of text alone is a beginning to continue (llama-server's
        // prefill): the messages before it are rendered up to the reply's start, and its text
        // follows. One that called tools is a whole reply, rendered as the template renders it.
        let (messages, prefill) = match messages.split_last() {
            Some((last, earlier))
                if last.role == "assistant"
                    && last.tool_calls.is_empty()
                    && !earlier.is_empty() =>
            {
                (earlier, last.content.as_str())
            }
            _ => (messages, ""),
        };
        if let Some(jinja) = &self.inner.jinja {
            return jinja
                .render(messages, &chat.tools, true)
                .map(|rendered| rendered + prefill)
                .map_err(EngineError::InvalidInput);
        }
        let template = self.inner.template.as_ref().ok_or_else(|| {
            EngineError::InvalidInput(
                "this model has no chat template; send a plain prompt to /v1/completions".into(),
            )
        })?;
        let messages = messages
            .iter()
            .map(|m| LlamaChatMessage::new(m.role.clone(), text_with_calls(m)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| EngineError::InvalidInput("a message contains a NUL character".into()))?;
        self.inner
            .model
            .apply_chat_template(template, &messages, true)
            .map(|rendered| rendered + prefill)
            .map_err(|e| {
                EngineError::InvalidInput(format!("the chat template could not be applied: {e}"))
            })
    }

    /// A constraint as GBNF that llama.cpp parses: a JSON schema converted, a grammar checked by
    /// compiling it here once, both within `MAX_CONSTRAINT_BYTES`. The decode thread then only
    /// compiles a grammar known to be valid and small.
    pub fn grammar(&self, constraint: &Constraint) -> Result<Constraint, EngineError> {
        let text = match constraint {
            Constraint::Grammar(text) | Constraint::JsonSchema(text) => text,
        };
        if text.len() > MAX_CONSTRAINT_BYTES {
            return Err(EngineError::InvalidInput(format!(
                "the grammar or JSON schema has {} bytes; at most {MAX_CONSTRAINT_BYTES} are \
                 accepted",
                text.len()
            )));
        }
        let gbnf = super::grammar::gbnf(constraint)?;
        if gbnf.len() > 4 * MAX_CONSTRAINT_BYTES {
            return Err(EngineError::InvalidInput(
                "the JSON schema turns into a grammar too large to compile; simplify it".into(),
            ));
        }
        super::grammar::compile(&self.inner.model, &gbnf)?;
        Ok(Constraint::Grammar(gbnf))
    }
}

/// Every id must name one of `n_vocab` entries.
pub(super) fn check_ids(tokens: &[i32], n_vocab: i32) -> Result<(), EngineError> {
    match tokens.iter().find(|&&t| t < 0 || t >= n_vocab) {
        Some(bad) => Err(EngineError::InvalidInput(format!(
            "token id {bad} is not in the vocabulary (0..{n_vocab})"
        ))),
        None => Ok(()),
    }
}

/// A prompt is not empty and leaves its sequence room for one generated token.
pub(super) fn check_prompt(tokens: &[i32], n_ctx_per_sequence: usize) -> Result<(), EngineError> {
    if tokens.is_empty() {
        return Err(EngineError::InvalidInput("the prompt is empty".into()));
    }
    if tokens.len() >= n_ctx_per_sequence {
        return Err(EngineError::PromptTooLong {
            tokens: tokens.len(),
            limit: n_ctx_per_sequence - 1,
        });
    }
    Ok(())
}

/// A job for the tokenizer thread.
pub(super) type Job = Box<dyn FnOnce(&Vocabulary) + Send>;

/// The threads that tokenize: one for small inputs and one for large ones, each taking its jobs
/// one at a time in arrival order, at a lower priority than llama.cpp's threads. Measured with
/// `make attack`: tokenizing megabyte prompts on the runtime's blocking threads at normal
/// priority, two at once, stretched another user's p99 time between tokens from 29 to 212 ms;
/// one thread at nice 9 brought it to 106 ms, but a chat turn then waited behind a stranger's
/// megabytes, so small inputs have a lane of their own.
pub(super) struct Tokenizer {
    small: std::sync::mpsc::Sender<Job>,
    large: std::sync::mpsc::Sender<Job>,
}

/// Like the store's writer (`sessions/writer.rs`), it gets the cores when decoding leaves them.
const TOKENIZER_NICE: i32 = 9;

/// Inputs of up to this many bytes take the small lane.
pub(super) const SMALL_INPUT_BYTES: usize = 64 * 1024;

impl Tokenizer {
    pub(super) fn start(vocab: Vocabulary) -> Result<Self, EngineError> {
        Ok(Self {
            small: lane("kvsnap-tokenizer", vocab.clone())?,
            large: lane("kvsnap-tokenizer-large", vocab)?,
        })
    }

    /// Runs `job`, whose input is `bytes` long, in its lane.
    pub(super) fn run(&self, bytes: usize, job: Job) -> Result<(), EngineError> {
        let lane = if bytes <= SMALL_INPUT_BYTES {
            &self.small
        } else {
            &self.large
        };
        lane.send(job).map_err(|_| EngineError::ShuttingDown)
    }
}

fn lane(name: &str, vocab: Vocabulary) -> Result<std::sync::mpsc::Sender<Job>, EngineError> {
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let thread = rustix::thread::gettid();
            if let Err(error) = rustix::process::setpriority_process(Some(thread), TOKENIZER_NICE) {
                tracing::warn!(%error, "could not lower the tokenizer thread's priority");
            }
            for job in queue {
                job(&vocab);
            }
        })
        .map_err(|e| EngineError::Load(format!("cannot start the tokenizer thread: {e}")))?;
    Ok(jobs)
}
