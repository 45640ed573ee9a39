//! Output held to a grammar: llama.cpp's GBNF engine, which also receives JSON schemas turned
//! into GBNF by llama.cpp's own converter.
//!
//! The grammar only masks: kvsnap's sampler still chooses the token, from the logits with every
//! token the grammar forbids at -inf, so a constrained reply draws from the conversation's own
//! random stream like any other (and a resumed conversation continues exactly). As llama.cpp's
//! server does, the token is first chosen without the mask and only checked; the whole
//! vocabulary is masked (and the choice made again) only when the grammar refuses it.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;

use super::EngineError;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// llama.cpp's GBNF, starting at the rule `root`.
    Grammar(String),
    /// A JSON schema (as JSON text); `{}` accepts any JSON value.
    JsonSchema(String),
}

/// One request's grammar state: where in the grammar the reply so far has reached.
pub struct Grammar {
    sampler: LlamaSampler,
}

impl Grammar {
    /// Parses the constraint; a grammar llama.cpp cannot parse is the request's fault.
    pub fn new(model: &LlamaModel, constraint: &Constraint) -> Result<Self, EngineError> {
        Ok(Self {
            sampler: compile(model, &gbnf(constraint)?)?,
        })
    }

    /// Whether the grammar lets `token` come next.
    pub fn allows(&mut self, token: i32) -> bool {
        let mut one = LlamaTokenDataArray::new(
            vec![LlamaTokenData::new(LlamaToken(token), 0.0, 0.0)],
            false,
        );
        one.apply_sampler(&mut self.sampler);
        one.data
            .first()
            .is_some_and(|t| t.logit() > f32::NEG_INFINITY)
    }

    /// `logits` with every token the grammar forbids next set to -inf.
    pub fn mask(&mut self, logits: &[f32]) -> Vec<f32> {
        let mut all = LlamaTokenDataArray::from_iter(
            logits
                .iter()
                .enumerate()
                .map(|(id, &logit)| LlamaTokenData::new(LlamaToken(id as i32), logit, 0.0)),
            false,
        );
        all.apply_sampler(&mut self.sampler);
        let mut masked = vec![f32::NEG_INFINITY; logits.len()];
        for token in &all.data {
            if let Some(slot) = masked.get_mut(token.id().0 as usize) {
                *slot = token.logit();
            }
        }
        masked
    }

    /// Moves the grammar past `token`, which `allows` or `mask` let through.
    pub fn accept(&mut self, token: i32) {
        self.sampler.accept(LlamaToken(token));
    }
}

/// The constraint as llama.cpp's GBNF: a grammar as given, a JSON schema converted by
/// llama.cpp's own converter.
pub(super) fn gbnf(constraint: &Constraint) -> Result<String, EngineError> {
    match constraint {
        Constraint::Grammar(text) => Ok(text.clone()),
        Constraint::JsonSchema(schema) => {
            llama_cpp_2::json_schema_to_grammar(schema).map_err(|_| {
                EngineError::InvalidInput(
                "the JSON schema cannot be turned into a grammar: check its types and keywords \
                 (llama.cpp's converter refused it)"
                    .into(),
            )
            })
        }
    }
}

/// llama.cpp's grammar sampler for `gbnf`, starting at the rule `root`.
pub(super) fn compile(model: &LlamaModel, gbnf: &str) -> Result<LlamaSampler, EngineError> {
    LlamaSampler::grammar(model, gbnf, "root").map_err(|_| {
        EngineError::InvalidInput(
            "the grammar is not valid GBNF (it needs a rule named root; see llama.cpp's \
             grammars/README.md)"
                .into(),
        )
    })
}
