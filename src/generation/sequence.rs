//! One sequence's driver: runs the forward for one `Request` over its own cache, prefilling what
//! the cache lacks, then one token per step.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::request::{Request, Timings, TokenLogprob};
use crate::generation::stopping::FinishReason;
use crate::model::granite::ForwardOptions;
use crate::model::kv_cache::KvCache;
use crate::model::span::{Logits, Span};

/// One generation in progress: call `next_chunk` (text) or `next_token` (ids) until None.
pub struct Sequence {
    generator: Arc<Generator>,
    cache: KvCache,
    request: Request,
    /// The tokens to feed to the next forward: the request's tokens from `cache.len()` on.
    pending: Vec<u32>,
    cancel: Arc<AtomicBool>,
}

impl Sequence {
    pub fn new(generator: Arc<Generator>, prompt: Vec<u32>, params: GenerateParams) -> Result<Self> {
        let cache = generator.model().new_cache();
        Self::resume(generator, cache, &[], prompt, params)
    }

    /// Continues from a cache holding `cached` tokens: the longest common prefix of `cached` and
    /// `prompt` that the cache can go back to is kept and only the rest of the prompt is computed
    /// (a Mamba2 state goes back only to its checkpoints).
    pub fn resume(
        generator: Arc<Generator>,
        mut cache: KvCache,
        cached: &[u32],
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        Request::check(&generator, &prompt, &params)?;
        // At least the last prompt token is fed again: its logits pick the first new token.
        let common = cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        cache.truncate(common);
        let common = cache.len();
        let pending = prompt[common..].to_vec();
        let request = Request::new(generator.clone(), prompt, params, common)?;
        Ok(Self { generator, cache, request, pending, cancel: Arc::new(AtomicBool::new(false)) })
    }

    /// Every check of `resume` on its arguments; returns max_new_tokens.
    pub(crate) fn check(generator: &Generator, prompt: &[u32], params: &GenerateParams) -> Result<usize> {
        Request::check(generator, prompt, params)
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    pub fn new_tokens(&self) -> &[u32] {
        self.request.new_tokens()
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.request.finish_reason()
    }

    /// Empty unless `GenerateParams::logprobs` was set.
    pub fn logprobs(&self) -> &[TokenLogprob] {
        self.request.logprobs()
    }

    pub fn timings(&self) -> &Timings {
        self.request.timings()
    }

    /// Setting this flag (from any thread) stops the work within one layer's forward.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The cache and the tokens it holds, to continue from later.
    pub fn into_cache(self) -> (KvCache, Vec<u32>) {
        let mut tokens = self.request.tokens().to_vec();
        tokens.truncate(self.cache.len());
        (self.cache, tokens)
    }

    /// Runs one forward and picks a token; None once finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.request.is_finished() {
            return Ok(None);
        }
        self.request.start_clock();
        let opts = ForwardOptions { cancel: Some(&self.cancel) };
        let mut spans = [Span { tokens: &self.pending, cache: Some(&mut self.cache), logits: Logits::Last }];
        let model = self.generator.model();
        // A grammar's next mask depends only on the tokens so far: it is computed beside the forward.
        let (logits, prepared) = match self.request.constraint_mut() {
            None => (model.forward_spans(&mut spans, &opts), Ok(())),
            Some(constraint) => std::thread::scope(|scope| {
                let mask = scope.spawn(|| constraint.prepare());
                let logits = model.forward_spans(&mut spans, &opts);
                (logits, mask.join().unwrap_or_else(|_| Err(Error::Numerical("the grammar's matcher panicked".into()))))
            }),
        };
        let logits = logits?;
        prepared?;
        let token = self.request.step(&logits[0].squeeze(0)?)?;
        self.pending = vec![token];
        Ok(Some(token))
    }

    /// The next piece of certain text; None once everything has been handed out.
    pub fn next_chunk(&mut self) -> Result<Option<String>> {
        while !self.request.has_text() {
            if self.next_token()?.is_none() {
                break;
            }
        }
        Ok(Some(self.request.take_text()).filter(|t| !t.is_empty()))
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
