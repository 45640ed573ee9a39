//! Turns the engine's token events into text for the HTTP layer.
//!
//! Two things make this more than string concatenation: a token may end in the middle of a UTF-8
//! character (so bytes wait until the character is whole), and a stop string may arrive spread
//! over several tokens (so text that could be the start of one is held back until it is known
//! not to be). Every endpoint, streaming or not, reads its output through `TextStream`.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{
    EngineError, Event, FinishReason, Started, TokenProbs, find_stop, take_complete_utf8,
};

/// Why generation ended, as the endpoints report it.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// The model produced an end-of-generation token.
    Eog,
    /// `max_tokens` / `n_predict` was reached.
    Length,
    /// The conversation filled its share of the context.
    ContextFull,
    /// One of the request's stop strings appeared; it is not part of the text.
    Stop(String),
    /// The server cancelled the request (shutdown deadline).
    Cancelled,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn openai_reason(&self) -> &'static str {
        match self {
            Finish::Eog | Finish::Stop(_) => "stop",
            Finish::Length | Finish::ContextFull => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// Timing figures in llama-server's vocabulary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub prompt_n: usize,
    pub cache_n: usize,
    pub prompt_ms: f64,
    pub predicted_n: usize,
    pub predicted_ms: f64,
}

/// Every finished request's figures added up, for llama-server's `llamacpp:*` metrics: since
/// the start (the counters) and since the last scrape (the throughput gauges, which llama-server
/// averages over the window between two scrapes).
#[derive(Debug, Default)]
pub struct ServingTotals(std::sync::Mutex<Windows>);

#[derive(Debug, Default)]
struct Windows {
    since_start: Totals,
    since_scrape: Totals,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Prompt tokens evaluated (cached ones apart).
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub prompt_seconds: f64,
    pub predicted_tokens: u64,
    pub predicted_seconds: f64,
    /// The longest conversation a request left (prompt and reply).
    pub max_tokens: u64,
}

impl Totals {
    fn add(&mut self, timings: &Timings) {
        self.prompt_tokens += timings.prompt_n as u64;
        self.cached_tokens += timings.cache_n as u64;
        self.prompt_seconds += timings.prompt_ms / 1e3;
        self.predicted_tokens += timings.predicted_n as u64;
        self.predicted_seconds += timings.predicted_ms / 1e3;
        let tokens = (timings.prompt_n + timings.cache_n + timings.predicted_n) as u64;
        self.max_tokens = self.max_tokens.max(tokens);
    }
}

impl ServingTotals {
    fn add(&self, timings: &Timings) {
        let mut windows = self.lock();
        windows.since_start.add(timings);
        windows.since_scrape.add(timings);
    }

    /// The figures since the start and since the previous scrape; the next scrape's window
    /// starts now.
    pub fn scrape(&self) -> (Totals, Totals) {
        let mut windows = self.lock();
        let since_scrape = std::mem::take(&mut windows.since_scrape);
        (windows.since_start, since_scrape)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One step of output.
#[derive(Debug)]
pub enum Step {
    /// New text (may be empty when a token's bytes are still incomplete), the token ids that
    /// arrived with it, and their probabilities when the request asked for them.
    Text {
        text: String,
        tokens: Vec<i32>,
        probs: Vec<TokenProbs>,
    },
    /// Part of the prompt has been evaluated: `timings` so far (`prompt_n` evaluated of the
    /// uncached ones).
    Progress { timings: Timings },
    /// The end; no further steps follow.
    Done { finish: Finish, timings: Timings },
    /// The engine failed the request; no further steps follow.
    Failed(EngineError),
}

/// Reads one request's events and yields text.
pub struct TextStream {
    events: UnboundedReceiver<Event>,
    stops: Vec<String>,
    pending_bytes: Vec<u8>,
    held: String,
    started: Started,
    timings: Timings,
    generation_started: Option<Instant>,
    admitted: Instant,
    /// The stop string the text reached: nothing more is shown, and the stream ends when the
    /// engine ends the turn (after its save), not before.
    stopped_at: Option<String>,
    done: bool,
    totals: std::sync::Arc<ServingTotals>,
}

impl TextStream {
    /// Waits until the engine admitted the request (or refused it).
    pub async fn start(
        mut events: UnboundedReceiver<Event>,
        stops: Vec<String>,
        totals: std::sync::Arc<ServingTotals>,
    ) -> Result<Self, EngineError> {
        loop {
            match events.recv().await {
                Some(Event::Started(started)) => {
                    let timings = Timings {
                        prompt_n: started.prompt_tokens - started.cached_tokens,
                        cache_n: started.cached_tokens,
                        ..Timings::default()
                    };
                    return Ok(Self {
                        events,
                        stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
                        pending_bytes: Vec::new(),
                        held: String::new(),
                        started,
                        timings,
                        generation_started: None,
                        admitted: Instant::now(),
                        stopped_at: None,
                        done: false,
                        totals,
                    });
                }
                Some(Event::Failed(error)) => return Err(error),
                Some(_) => continue,
                None => return Err(EngineError::ShuttingDown),
            }
        }
    }

    /// The figures so far, for replies that report timings with every token.
    pub fn timings_so_far(&self) -> Timings {
        let mut timings = self.timings.clone();
        if let Some(start) = self.generation_started {
            timings.predicted_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        timings
    }

    /// What the engine said when it admitted the request.
    pub fn started(&self) -> &Started {
        &self.started
    }

    /// The next step, or `None` after `Done`/`Failed` was returned.
    pub async fn next(&mut self) -> Option<Step> {
        if self.done {
            return None;
        }
        loop {
            let Some(event) = self.events.recv().await else {
                return Some(self.finish(Finish::Cancelled));
            };
            match event {
                Event::Started(_) => {}
                Event::PromptProgress { evaluated } => {
                    let timings = Timings {
                        prompt_n: evaluated,
                        cache_n: self.timings.cache_n,
                        // The first report comes before any work: exactly zero.
                        prompt_ms: if evaluated == 0 {
                            0.0
                        } else {
                            self.admitted.elapsed().as_secs_f64() * 1e3
                        },
                        ..Timings::default()
                    };
                    return Some(Step::Progress { timings });
                }
                Event::PromptDone => {
                    self.timings.prompt_ms = self.admitted.elapsed().as_secs_f64() * 1e3;
                    self.generation_started = Some(Instant::now());
                }
                // The engine ends the turn at the token that completed the stop string.
                Event::Token { .. } if self.stopped_at.is_some() => {}
                Event::Token { id, piece, probs } => {
                    let probs: Vec<TokenProbs> = probs.map(|p| *p).into_iter().collect();
                    self.timings.predicted_n += 1;
                    self.pending_bytes.extend_from_slice(&piece);
                    let fresh = take_complete_utf8(&mut self.pending_bytes);
                    self.held.push_str(&fresh);
                    if let Some((at, word)) = find_stop(&self.held, &self.stops) {
                        let text = self.held[..at].to_owned();
                        self.held.clear();
                        self.stopped_at = Some(word);
                        return Some(Step::Text {
                            text,
                            tokens: vec![id],
                            probs,
                        });
                    }
                    let keep = longest_stop_prefix_suffix(&self.held, &self.stops);
                    let release = self.held.len() - keep;
                    let text: String = self.held.drain(..release).collect();
                    return Some(Step::Text {
                        text,
                        tokens: vec![id],
                        probs,
                    });
                }
                Event::Finished(reason) => {
                    let finish = match (reason, self.stopped_at.take()) {
                        (_, Some(word)) => Finish::Stop(word),
                        (FinishReason::Stop, None) => Finish::Stop(String::new()),
                        (FinishReason::Eog, None) => Finish::Eog,
                        (FinishReason::Length, None) => Finish::Length,
                        (FinishReason::ContextFull, None) => Finish::ContextFull,
                        (FinishReason::Cancelled, None) => Finish::Cancelled,
                    };
                    return Some(self.finish(finish));
                }
                Event::Failed(error) => {
                    self.done = true;
                    return Some(Step::Failed(error));
                }
            }
        }
    }

    fn finish(&mut self, finish: Finish) -> Step {
        self.done = true;
        if let Some(start) = self.generation_started {
            self.timings.predicted_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        self.totals.add(&self.timings);
        Step::Done {
            finish,
            timings: self.timings.clone(),
        }
    }
}

/// The length of the longest suffix of `text` that begins some stop string: text that must wait.
fn longest_stop_prefix_suffix(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for stop in stops {
        for (start, _) in text.char_indices() {
            let suffix = &text[start..];
            if suffix.len() <= keep {
                break;
            }
            if stop.starts_with(suffix) {
                keep = suffix.len();
                break;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefixes_are_held_back() {
        let stops = vec!["</end>".to_string()];
        assert_eq!(longest_stop_prefix_suffix("hello </e", &stops), 3);
        assert_eq!(longest_stop_prefix_suffix("hello", &stops), 0);
        assert_eq!(find_stop("a</end>b", &stops), Some((1, "</end>".into())));
    }
}
