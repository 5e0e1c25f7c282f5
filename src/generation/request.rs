//! One request: what a user asked for and what has come of it. Given its row of logits it picks
//! the next token, checks the stop criteria and turns the tokens into certain text. It runs no
//! forward: a driver (`Sequence` for one, `generate_batch` for many) does that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generation::constraint::Constraint;
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::sampling::{check_finite, log_softmax, Sampler};
use crate::generation::stopping::FinishReason;
use crate::text::stop::StoppingText;

/// A new token's log-probability under the model, and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// (token, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// Prompt tokens found in the cache and not recomputed.
    pub cached_tokens: usize,
    /// From the first forward to the first new token.
    pub time_to_first_token: Duration,
    /// From the first new token to the last.
    pub decode_time: Duration,
    /// Spent on the grammar: computing each token's mask and moving the matcher past the token.
    pub constraint_time: Duration,
}

pub struct Request {
    generator: Arc<Generator>,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    max_new_tokens: usize,
    sampler: Sampler,
    /// For the stop criteria (its sampling and stop strings live in `sampler` and `text`).
    params: GenerateParams,
    /// The last new token's log-probabilities, until handed out (`take_logprob`).
    logprob: Option<TokenLogprob>,
    text: StoppingText,
    /// The grammar the text must match, if any.
    constraint: Option<Constraint>,
    finish: Option<FinishReason>,
    timings: Timings,
    started: Option<Instant>,
}

impl Request {
    /// A request for `prompt`, of which the first `cached` tokens need no computing.
    pub fn new(generator: Arc<Generator>, prompt: Vec<u32>, params: GenerateParams, cached: usize) -> Result<Self> {
        let max_new_tokens = Self::check(&generator, &prompt, &params)?;
        let constraint = match &params.grammar {
            Some(grammar) => Some(Constraint::new(generator.grammars()?, grammar)?),
            None => None,
        };
        Ok(Self {
            constraint,
            sampler: Sampler::new(params.sampling.clone())?,
            text: StoppingText::new(generator.shared_tokenizer(), params.stop.clone()),
            timings: Timings { prompt_tokens: prompt.len(), cached_tokens: cached, ..Default::default() },
            prompt_len: prompt.len(),
            tokens: prompt,
            max_new_tokens,
            params,
            logprob: None,
            finish: None,
            started: None,
            generator,
        })
    }

    /// Every check of `new` on its arguments; returns max_new_tokens.
    pub(crate) fn check(generator: &Generator, prompt: &[u32], params: &GenerateParams) -> Result<usize> {
        generator.check_prompt(prompt)?;
        params.validate()?;
        let vocab = generator.config().vocab_size;
        if let Some(id) = params.stop_token_ids.iter().find(|id| **id as usize >= vocab) {
            return Err(Error::invalid(format!("token id {id} is out of range for vocab_size {vocab}")));
        }
        generator.max_new_tokens(params)
    }

    /// Prompt and generated tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    pub fn new_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Counts `n` more prompt tokens as found in a cache, not computed.
    pub(crate) fn add_cached(&mut self, n: usize) {
        self.timings.cached_tokens += n;
    }

    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The last new token's log-probabilities, once (None unless `GenerateParams::logprobs` was set).
    pub fn take_logprob(&mut self) -> Option<TokenLogprob> {
        self.logprob.take()
    }

    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Marks the start of the work, before the first forward that computes for this request.
    pub fn start_clock(&mut self) {
        self.started.get_or_insert_with(Instant::now);
    }

    /// Takes this request's logits (vocab,) f32 for the next position: picks the token, records
    /// it, checks the stop criteria and passes it to the text. Returns the token.
    pub fn step(&mut self, logits: &Tensor) -> Result<u32> {
        let token = self.pick(logits)?;
        self.tokens.push(token);
        let generated = self.tokens.len() - self.prompt_len;
        let started = *self.started.get_or_insert_with(Instant::now);
        if generated == 1 {
            self.timings.time_to_first_token = started.elapsed();
        } else {
            self.timings.decode_time = started.elapsed() - self.timings.time_to_first_token;
        }
        self.finish =
            self.generator.finish_reason(&self.params, self.max_new_tokens, token, generated, self.tokens.len());
        let ended_on_token = matches!(self.finish, Some(FinishReason::Eos | FinishReason::Stop));
        if !ended_on_token && self.text.push(token)? {
            self.finish = Some(FinishReason::Stop);
        }
        if let Some(constraint) = &mut self.constraint {
            constraint.advance(token)?;
            self.timings.constraint_time = constraint.time();
            // The token that completes the grammar is part of the text.
            if constraint.is_complete() {
                self.finish.get_or_insert(FinishReason::Stop);
            }
        }
        if self.finish.is_some() {
            self.text.finish()?;
        }
        Ok(token)
    }

    fn pick(&mut self, logits: &Tensor) -> Result<u32> {
        let dtype = self.generator.model().dtype();
        let top_logprobs = self.params.logprobs;
        let plain = top_logprobs.is_none() && self.constraint.is_none() && self.sampler.is_plain_greedy();
        if !logits.device().is_cpu() && plain {
            // On a GPU: the pick and a finiteness check on the device; two numbers cross, not the vocabulary.
            let (token, finite) = crate::model::greedy(logits)?;
            if !finite {
                check_finite(&logits.to_vec1::<f32>()?, dtype)?;
            }
            return Ok(token);
        }
        let mut logits = logits.to_vec1::<f32>()?;
        check_finite(&logits, dtype)?;
        let raw = top_logprobs.map(|_| log_softmax(&logits));
        if let Some(constraint) = &mut self.constraint {
            constraint.apply(&mut logits)?;
        }
        let (prompt, generated) = self.tokens.split_at(self.prompt_len);
        let token = self.sampler.sample(&mut logits, prompt, generated)?;
        if let (Some(n), Some(raw)) = (top_logprobs, raw) {
            self.logprob = Some(token_logprob(&raw, token, n));
        }
        Ok(token)
    }

    /// The grammar, for a driver to compute its next mask while the forward runs.
    pub fn constraint_mut(&mut self) -> Option<&mut Constraint> {
        self.constraint.as_mut().filter(|_| self.finish.is_none())
    }

    /// Whether certain text is waiting, or all of it has been taken.
    pub fn has_text(&self) -> bool {
        self.text.has_ready() || self.text.is_done()
    }

    /// The certain text not taken yet.
    pub fn take_text(&mut self) -> String {
        self.text.take()
    }
}

/// `token`'s entry in `logprobs` (vocab,) and the `n` largest entries.
fn token_logprob(logprobs: &[f32], token: u32, n: usize) -> TokenLogprob {
    let mut order: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(order.len());
    if n > 0 {
        order.select_nth_unstable_by(n - 1, |a, b| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]));
        order.truncate(n);
        order.sort_by(|a, b| logprobs[*b as usize].total_cmp(&logprobs[*a as usize]));
    }
    let top = order.iter().take(n).map(|t| (*t, logprobs[*t as usize])).collect();
    TokenLogprob { token, logprob: logprobs[token as usize], top }
}
