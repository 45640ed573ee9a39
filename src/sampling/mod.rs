//! Token sampling in our own code, so that its random stream can be stored and put back.
//!
//! llama.cpp's sampler chain has no save/restore call (its RNG left the state API in 2024), and
//! kvsnap promises that a resumed conversation continues exactly as if it had never stopped.
//! So the engine hands us raw logits and we choose the token here, drawing randomness from a
//! ChaCha20 stream whose whole state is `(seed, word position)`: two numbers that persist.

mod rng;

pub use rng::RngState;

use rng::StreamRng;

/// How a request wants its tokens chosen. Defaults follow llama-server's.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 or below means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables the cut.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability adds up to `top_p`; 1.0 disables it.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0.0 disables it.
    pub min_p: f32,
    /// Divide (or multiply, for negative logits) recent tokens' logits; 1.0 disables it.
    pub repeat_penalty: f32,
    /// Subtract `frequency_penalty * count` from each recent token's logit.
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` once from every recent token's logit.
    pub presence_penalty: f32,
    /// How many of the most recent tokens the penalties look at.
    pub penalty_last_n: usize,
    /// Added to these tokens' logits (after the penalties); `f32::NEG_INFINITY` bans a token.
    pub logit_bias: Vec<(i32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Checks the ranges a person could get wrong; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let finite = [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("repeat_penalty", self.repeat_penalty),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ];
        if let Some((name, _)) = finite.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} must be a finite number"));
        }
        if self.temperature > 100.0 {
            return Err("temperature must be between 0 and 100".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err("top_p must be between 0 and 1".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be between 0 and 1".into());
        }
        if self.repeat_penalty <= 0.0 || self.repeat_penalty > 100.0 {
            return Err("repeat_penalty must be greater than 0 and at most 100".into());
        }
        if self.frequency_penalty.abs() > 100.0 || self.presence_penalty.abs() > 100.0 {
            return Err(
                "frequency_penalty and presence_penalty must be between -100 and 100".into(),
            );
        }
        if self
            .logit_bias
            .iter()
            .any(|(_, bias)| bias.is_nan() || *bias == f32::INFINITY)
        {
            return Err("logit_bias values must be numbers (or false to ban a token)".into());
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    fn has_penalties(&self) -> bool {
        self.penalty_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// A generated token's probability and the likeliest tokens beside it (its own included), as
/// llama-server's `n_probs` and OpenAI's `logprobs` report them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenProbs {
    pub prob: f32,
    /// Most likely first.
    pub top: Vec<(i32, f32)>,
}

/// Chooses the next token from `logits`.
///
/// `recent` is the conversation's token history (prompt and generated); only its last
/// `penalty_last_n` entries matter. Greedy sampling never touches `rng`, so a greedy turn leaves
/// the conversation's random stream where it was.
pub fn sample(logits: &[f32], recent: &[i32], params: &SamplingParams, rng: &mut RngState) -> i32 {
    sample_from(logits, recent, params, rng, None).0
}

/// Like `sample`, and also the `n` likeliest tokens of the distribution the token was drawn
/// from: after penalties, bias, top-k, top-p, min-p and temperature (llama-server's
/// `post_sampling_probs`). Greedy choice has one candidate, of probability 1. The token chosen
/// is the one `sample` chooses.
pub fn sample_with_probs(
    logits: &[f32],
    recent: &[i32],
    params: &SamplingParams,
    rng: &mut RngState,
    n: usize,
) -> (i32, TokenProbs) {
    let (token, probs) = sample_from(logits, recent, params, rng, Some(n));
    (token, probs.expect("asked for"))
}

/// The model's own distribution over the whole vocabulary (softmax of the raw logits): the
/// chosen token's probability and the `n` likeliest (llama-server's `n_probs`).
pub fn model_probs(logits: &[f32], chosen: i32, n: usize) -> TokenProbs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let prob_of = |logit: f32| (f64::from(logit - max).exp() / sum) as f32;
    let mut top: Vec<(i32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| (id as i32, logit))
        .collect();
    keep_top_k(&mut top, n.max(1));
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(n);
    let prob = logits.get(chosen as usize).map_or(0.0, |&l| prob_of(l));
    TokenProbs {
        prob,
        top: top.into_iter().map(|(id, l)| (id, prob_of(l))).collect(),
    }
}

fn sample_from(
    logits: &[f32],
    recent: &[i32],
    params: &SamplingParams,
    rng: &mut RngState,
    want_probs: Option<usize>,
) -> (i32, Option<TokenProbs>) {
    let penalties = Penalties::new(recent, params);
    if params.is_greedy() {
        let token = argmax(logits, &penalties);
        let probs = want_probs.map(|_| TokenProbs {
            prob: 1.0,
            top: vec![(token, 1.0)],
        });
        return (token, probs);
    }

    let mut candidates: Vec<(i32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(id, &logit)| (id as i32, penalties.apply(id as i32, logit)))
        .collect();

    keep_top_k(&mut candidates, params.top_k);
    let probs = softmax_sorted(&mut candidates, 1.0);
    let keep = nucleus_len(&probs, params.top_p).min(min_p_len(&probs, params.min_p));
    candidates.truncate(keep.max(1));

    let probs = softmax_sorted(&mut candidates, params.temperature);
    let mut stream = StreamRng::resume(rng);
    let draw = stream.next_unit();
    *rng = stream.state();

    // Rounding may leave the sum a hair under the draw: the last possible token then.
    let mut chosen = probs.iter().rposition(|p| *p > 0.0).unwrap_or(0);
    let mut cumulative = 0.0f64;
    for (i, p) in probs.iter().enumerate() {
        cumulative += f64::from(*p);
        if draw < cumulative {
            chosen = i;
            break;
        }
    }
    let explained = want_probs.map(|n| TokenProbs {
        prob: probs[chosen],
        top: candidates
            .iter()
            .zip(&probs)
            .filter(|(_, p)| **p > 0.0)
            .take(n)
            .map(|(c, p)| (c.0, *p))
            .collect(),
    });
    (candidates[chosen].0, explained)
}

/// The penalised logits of the few tokens that appear in the recent history, and the biased
/// ones.
struct Penalties {
    counts: std::collections::HashMap<i32, u32>,
    bias: std::collections::HashMap<i32, f32>,
    repeat: f32,
    frequency: f32,
    presence: f32,
}

impl Penalties {
    fn new(recent: &[i32], params: &SamplingParams) -> Self {
        let mut counts = std::collections::HashMap::new();
        if params.has_penalties() {
            let start = recent.len().saturating_sub(params.penalty_last_n);
            for &token in &recent[start..] {
                *counts.entry(token).or_insert(0u32) += 1;
            }
        }
        Self {
            counts,
            bias: params.logit_bias.iter().copied().collect(),
            repeat: params.repeat_penalty,
            frequency: params.frequency_penalty,
            presence: params.presence_penalty,
        }
    }

    fn apply(&self, token: i32, logit: f32) -> f32 {
        let penalised = self.penalise(token, logit);
        match self.bias.get(&token) {
            Some(bias) => penalised + bias,
            None => penalised,
        }
    }

    fn penalise(&self, token: i32, logit: f32) -> f32 {
        let Some(&count) = self.counts.get(&token) else {
            return logit;
        };
        // Same rule as llama.cpp's penalties sampler: the repeat penalty pushes a logit towards
        // "less likely" whatever its sign, then frequency and presence subtract.
        let mut value = if logit <= 0.0 {
            logit * self.repeat
        } else {
            logit / self.repeat
        };
        value -= count as f32 * self.frequency + self.presence;
        value
    }
}

fn argmax(logits: &[f32], penalties: &Penalties) -> i32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (id, &logit) in logits.iter().enumerate() {
        let value = penalties.apply(id as i32, logit);
        // Strictly greater: ties go to the lowest id, as llama.cpp's greedy sampler does.
        if value > best_value {
            best = id;
            best_value = value;
        }
    }
    best as i32
}

/// Keeps the `k` highest logits, in no particular order (0 keeps all).
fn keep_top_k(candidates: &mut Vec<(i32, f32)>, k: usize) {
    if k > 0 && k < candidates.len() {
        candidates.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        candidates.truncate(k);
    }
}

/// Sorts candidates by logit (highest first, ties by id) and returns their probabilities at
/// `temperature`.
fn softmax_sorted(candidates: &mut [(i32, f32)], temperature: f32) -> Vec<f32> {
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let max = candidates.first().map_or(0.0, |c| c.1);
    let exps: Vec<f64> = candidates
        .iter()
        .map(|c| f64::from((c.1 - max) / temperature).exp())
        .collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// How many of the (sorted) probabilities it takes to reach `top_p`.
fn nucleus_len(probs: &[f32], top_p: f32) -> usize {
    if top_p >= 1.0 {
        return probs.len();
    }
    let mut cumulative = 0.0f32;
    for (i, p) in probs.iter().enumerate() {
        cumulative += p;
        if cumulative >= top_p {
            return i + 1;
        }
    }
    probs.len()
}

/// How many of the (sorted) probabilities are at least `min_p` times the largest.
fn min_p_len(probs: &[f32], min_p: f32) -> usize {
    if min_p <= 0.0 || probs.is_empty() {
        return probs.len();
    }
    let threshold = probs[0] * min_p;
    probs.iter().take_while(|p| **p >= threshold).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, 1.5, -1.0, 1.9]
    }

    #[test]
    fn greedy_picks_the_largest_logit_and_leaves_the_stream_alone() {
        let params = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        let mut rng = RngState::from_seed(7);
        assert_eq!(sample(&logits(), &[], &params, &mut rng), 1);
        assert_eq!(rng, RngState::from_seed(7));
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_choice() {
        let params = SamplingParams {
            temperature: 0.0,
            repeat_penalty: 1.5,
            ..SamplingParams::default()
        };
        let mut rng = RngState::from_seed(7);
        assert_eq!(sample(&logits(), &[1], &params, &mut rng), 4);
    }

    #[test]
    fn same_seed_same_choices_and_the_stream_can_be_resumed() {
        let params = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let mut a = RngState::from_seed(42);
        let first: Vec<i32> = (0..20)
            .map(|_| sample(&logits(), &[], &params, &mut a))
            .collect();

        let mut b = RngState::from_seed(42);
        let head: Vec<i32> = (0..10)
            .map(|_| sample(&logits(), &[], &params, &mut b))
            .collect();
        let saved = b;
        let mut resumed = saved;
        let tail: Vec<i32> = (0..10)
            .map(|_| sample(&logits(), &[], &params, &mut resumed))
            .collect();
        assert_eq!([head, tail].concat(), first);
        assert!(first.iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..SamplingParams::default()
        };
        let mut rng = RngState::from_seed(1);
        for _ in 0..10 {
            assert_eq!(sample(&logits(), &[], &params, &mut rng), 1);
        }
    }

    #[test]
    fn validation_names_the_field() {
        let params = SamplingParams {
            top_p: 3.0,
            ..SamplingParams::default()
        };
        assert!(params.validate().unwrap_err().contains("top_p"));
        let params = SamplingParams {
            temperature: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(params.validate().unwrap_err().contains("temperature"));
    }
}
