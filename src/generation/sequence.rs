//! One generation, as its owner sees it: the request runs on the generator's scheduler (beside
//! every other one) and its tokens and text arrive here as they are made.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::request::{Request, Timings, TokenLogprob};
use crate::generation::scheduler::{Ended, Event, Job};
use crate::generation::stopping::FinishReason;
use crate::model::kv_cache::KvCache;

/// One generation in progress: call `next_chunk` (text) or `next_token` (ids) until None.
/// Dropping it cancels the work.
pub struct Sequence {
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    /// The new tokens so far, and their log-probabilities if asked for.
    new_tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    /// Certain text not handed out yet.
    text: String,
    /// The request and the cache it kept, once the scheduler is done with them.
    ended: Option<Ended>,
}

impl Sequence {
    pub fn new(generator: Arc<Generator>, prompt: Vec<u32>, params: GenerateParams) -> Result<Self> {
        Self::with_cancel(generator, prompt, params, Arc::new(AtomicBool::new(false)))
    }

    /// `new`, stopped by a flag the caller may share with other sequences.
    pub fn with_cancel(
        generator: Arc<Generator>,
        prompt: Vec<u32>,
        params: GenerateParams,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let request = Request::new(generator.clone(), prompt, params, 0)?;
        let pending = request.tokens().to_vec();
        Self::submit(&generator, request, None, pending, cancel)
    }

    /// Continues from a cache holding `cached` tokens: the longest common prefix of `cached` and
    /// `prompt` that the cache can go back to is kept and only the rest of the prompt is computed
    /// (a Mamba2 state goes back only to its checkpoints). The cache comes back with `into_cache`.
    pub fn resume(
        generator: Arc<Generator>,
        cache: KvCache,
        cached: &[u32],
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Self> {
        let (request, common) = Self::continuing(&generator, &cache, cached, prompt, params)?;
        Self::start_from(&generator, request, cache, common)
    }

    /// The request that continues `cache`, and how many of its tokens the cache keeps. Changes nothing.
    pub(crate) fn continuing(
        generator: &Arc<Generator>,
        cache: &KvCache,
        cached: &[u32],
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<(Request, usize)> {
        Request::check(generator, &prompt, &params)?;
        // At least the last prompt token is fed again: its logits pick the first new token.
        let common = cached.iter().zip(&prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        let common = cache.restorable(common);
        Ok((Request::new(generator.clone(), prompt, params, common)?, common))
    }

    /// Runs `request` on `cache`, cut back to its first `common` tokens.
    pub(crate) fn start_from(
        generator: &Arc<Generator>,
        request: Request,
        mut cache: KvCache,
        common: usize,
    ) -> Result<Self> {
        cache.truncate(common);
        let pending = request.tokens()[common..].to_vec();
        Self::submit(generator, request, Some(cache), pending, Arc::new(AtomicBool::new(false)))
    }

    fn submit(
        generator: &Arc<Generator>,
        request: Request,
        cache: Option<KvCache>,
        pending: Vec<u32>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Self> {
        let (events, received) = mpsc::channel();
        let keep_cache = cache.is_some();
        let job = Job { request, cache, keep_cache, pending, cancel: cancel.clone(), events };
        generator.scheduler()?.submit(job)?;
        Ok(Self {
            events: received,
            cancel,
            new_tokens: Vec::new(),
            logprobs: Vec::new(),
            text: String::new(),
            ended: None,
        })
    }

    pub fn new_tokens(&self) -> &[u32] {
        &self.new_tokens
    }

    /// None until finished.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.ended.as_ref().and_then(|e| e.request.finish_reason())
    }

    /// Those of the new tokens so far; empty unless `GenerateParams::logprobs` was set.
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.logprobs
    }

    /// Once the generation has ended; the prompt's length alone before.
    pub fn timings(&self) -> Timings {
        self.ended.as_ref().map(|e| e.request.timings().clone()).unwrap_or_default()
    }

    /// Setting this flag (from any thread) stops the work at the next step.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// The cache and the tokens it holds, to continue from later (None if it was not resumed
    /// from a cache). An unfinished generation is cancelled first.
    pub fn into_cache(mut self) -> Option<(KvCache, Vec<u32>)> {
        self.stop();
        let ended = self.ended.take()?;
        let cache = ended.cache?;
        let mut tokens = ended.request.tokens().to_vec();
        tokens.truncate(cache.len());
        Some((cache, tokens))
    }

    /// Cancels the work if unfinished, and waits until the scheduler has let go of it (its cache's
    /// blocks are back in the pool, or here).
    pub fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        while self.ended.is_none() {
            if self.receive().is_err() && self.ended.is_none() {
                return;
            }
        }
    }

    /// Waits for the next event; false once the generation has ended.
    fn receive(&mut self) -> Result<bool> {
        if self.ended.is_some() {
            return Ok(false);
        }
        match self.events.recv() {
            Ok(Event::Token(token, text, logprob)) => {
                self.new_tokens.push(token);
                self.logprobs.extend(logprob);
                self.text.push_str(&text);
                Ok(true)
            }
            Ok(Event::Done(mut ended)) => {
                let error = ended.error.take();
                self.ended = Some(*ended);
                error.map_or(Ok(false), Err)
            }
            Err(_) => Err(Error::Batch("the scheduler's thread stopped".into())),
        }
    }

    /// Waits for the next token; None once finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        Ok(if self.receive()? { self.new_tokens.last().copied() } else { None })
    }

    /// The next piece of certain text; None once everything has been handed out.
    pub fn next_chunk(&mut self) -> Result<Option<String>> {
        while self.text.is_empty() && self.receive()? {}
        Ok(Some(std::mem::take(&mut self.text)).filter(|t| !t.is_empty()))
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

impl Drop for Sequence {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}
