//! One sequence's decode loop: prefill what the cache lacks, then one token per step, with
//! stop criteria, streaming text, log-probabilities and timings.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::sampling::{check_finite, log_softmax, Sampler};
use crate::generation::stopping::FinishReason;
use crate::model::granite::{ForwardOptions, Logits};
use crate::model::kv_cache::KvCache;
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
}

/// One generation in progress: call `next_chunk` (text) or `next_token` (ids) until None.
pub struct Sequence {
    generator: Arc<Generator>,
    cache: KvCache,
    /// Prompt and generated tokens; the first `cache.len()` of them are in the cache.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The tokens to feed to the next forward.
    pending: Vec<u32>,
    max_new_tokens: usize,
    sampler: Sampler,
    /// For the stop criteria (its sampling and stop strings live in `sampler` and `text`).
    params: GenerateParams,
    top_logprobs: Option<usize>,
    logprobs: Vec<TokenLogprob>,
    text: StoppingText,
    finish: Option<FinishReason>,
    cancel: Arc<AtomicBool>,
    timings: Timings,
    started: Option<Instant>,
}

impl Sequence {
    pub fn new(generator: Arc<Generator>, prompt: Vec<u32>, params: GenerateParams) -> Result<Self> {
        let cache = generator.model().new_cache(1, 0)?;
        Self::resume(generator, cache, &[], prompt, params)
    }

    /// Continues from a cache holding `cached` tokens: the longest common prefix of `cached` and
    /// `prompt` is kept and only the rest of the prompt is computed.
    pub fn resume(
        generator: Arc<Generator>,
        mut cache: KvCache,
        cached: &[u32],
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        let max_new_tokens = Self::check(&generator, &prompt, &params)?;
        let sampler = Sampler::new(params.sampling.clone())?;
        // At least the last prompt token is fed again: its logits pick the first new token.
        let common = cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        cache.truncate(common);
        // The cache grows by doubling past this, so a huge max_new_tokens costs nothing up front.
        let room = (prompt.len() + max_new_tokens.min(1024)).min(generator.context_length());
        cache.reserve(room - common)?;
        Ok(Self {
            cache,
            prompt_len: prompt.len(),
            pending: prompt[common..].to_vec(),
            timings: Timings { prompt_tokens: prompt.len(), cached_tokens: common, ..Default::default() },
            tokens: prompt,
            max_new_tokens,
            sampler,
            top_logprobs: params.logprobs,
            logprobs: Vec::new(),
            text: StoppingText::new(generator.shared_tokenizer(), params.stop.clone()),
            params,
            finish: None,
            cancel: Arc::new(AtomicBool::new(false)),
            started: None,
            generator,
        })
    }

    /// Every check of `resume` on its arguments; returns max_new_tokens.
    pub(crate) fn check(generator: &Generator, prompt: &[u32], params: &GenerateParams) -> Result<usize> {
        generator.check_prompt(prompt)?;
        params.validate()?;
        let vocab = generator.config().vocab_size;
        if let Some(id) = params.stop_token_ids.iter().find(|id| **id as usize >= vocab) {
            return Err(Error::invalid(format!("token id {id} is out of range for vocab_size {vocab}")));
        }
        generator.max_new_tokens(params)
    }

    pub fn new_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Empty unless `GenerateParams::logprobs` was set.
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Setting this flag (from any thread) stops the work within one layer's forward.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The cache and the tokens it holds, to continue from later.
    pub fn into_cache(self) -> (KvCache, Vec<u32>) {
        let mut tokens = self.tokens;
        tokens.truncate(self.cache.len());
        (self.cache, tokens)
    }

    /// Runs one forward and picks a token; None once finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let started = *self.started.get_or_insert_with(Instant::now);
        let model = self.generator.model();
        let input = Tensor::new(self.pending.as_slice(), model.device())?.unsqueeze(0)?;
        let opts = ForwardOptions { cancel: Some(&self.cancel), ..Default::default() };
        let logits = model.forward_with(&input, Some(&mut self.cache), Logits::Last, &opts)?.flatten_all()?;
        let token = if !model.device().is_cpu() && self.top_logprobs.is_none() && self.sampler.is_plain_greedy() {
            // On a GPU: the pick and a finiteness check on the device; two numbers cross, not the vocabulary.
            let (token, finite) = crate::model::greedy(&logits)?;
            if !finite {
                check_finite(&logits.to_vec1::<f32>()?, model.dtype())?;
            }
            token
        } else {
            let mut logits = logits.to_vec1::<f32>()?;
            check_finite(&logits, model.dtype())?;
            let raw = self.top_logprobs.map(|_| log_softmax(&logits));
            let (prompt, generated) = self.tokens.split_at(self.prompt_len);
            let token = self.sampler.sample(&mut logits, prompt, generated)?;
            if let (Some(n), Some(raw)) = (self.top_logprobs, raw) {
                self.logprobs.push(token_logprob(&raw, token, n));
            }
            token
        };
        self.tokens.push(token);
        self.pending = vec![token];
        let generated = self.tokens.len() - self.prompt_len;
        if generated == 1 {
            self.timings.time_to_first_token = started.elapsed();
        } else {
            self.timings.decode_time = started.elapsed() - self.timings.time_to_first_token;
        }
        self.finish =
            self.generator.finish_reason(&self.params, self.max_new_tokens, token, generated, self.tokens.len());
        Ok(Some(token))
    }

    /// The next piece of certain text; None once everything has been handed out.
    pub fn next_chunk(&mut self) -> Result<Option<String>> {
        while !self.text.has_ready() && !self.text.is_done() {
            let Some(token) = self.next_token()? else { break };
            let ended_on_token = matches!(self.finish, Some(FinishReason::Eos | FinishReason::Stop));
            if !ended_on_token && self.text.push(token)? {
                self.finish = Some(FinishReason::Stop);
            }
            if self.finish.is_some() {
                self.text.finish()?;
            }
        }
        Ok(Some(self.text.take()).filter(|t| !t.is_empty()))
    }

    /// Runs to the end; returns all the new text.
    pub fn run(&mut self) -> Result<String> {
        let mut text = String::new();
        while let Some(chunk) = self.next_chunk()? {
            text.push_str(&chunk);
        }
        Ok(text)
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
