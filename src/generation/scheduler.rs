//! Continuous batching: one thread per `Generator` runs every generation's forward. Requests
//! from any thread join the running batch at a step boundary and leave it when done. A step is
//! one forward over a span of each running request: one token for those decoding, the next chunk
//! of `PREFILL_CHUNK` tokens for those still reading their prompt. A request's spans depend on it
//! alone, so its tokens are those it gets alone, whatever else runs beside it.
//!
//! A request starts from the KV blocks cached for its prompt's start, if any (prefix caching,
//! `KvPool`), and computes only the rest.
//!
//! Memory: a request starts when the KV pool's free blocks hold the most it may need (prompt and
//! max_new_tokens) beside what the running requests may still take; until then it waits, in the
//! order requests came. No request fails for want of room, except one that does not fit an empty pool.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::request::{Request, TokenLogprob};
use crate::model::granite::ForwardOptions;
use crate::model::kv_cache::KvCache;
use crate::model::kv_pool::BLOCK_TOKENS;
use crate::model::linear::GEMV_MAX_ROWS;
use crate::model::span::{Logits, Span};

/// Prompt tokens one request feeds per step, and (but for the first) all requests together: a
/// long prompt is read in chunks of this many, so that the others' decode goes on between them.
pub const PREFILL_CHUNK: usize = 256;

/// One generation handed to the scheduler.
pub(crate) struct Job {
    pub(crate) request: Request,
    /// The sequence's cache (a session's); None: a new one when the job starts, dropped at its end.
    pub(crate) cache: Option<KvCache>,
    /// Whether the cache goes back with `Event::Done` (a session's) or is dropped at the end.
    pub(crate) keep_cache: bool,
    /// The tokens the cache lacks: the prompt's rest, then the last new token.
    pub(crate) pending: Vec<u32>,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) events: Sender<Event>,
}

/// What a job's owner hears.
pub(crate) enum Event {
    /// A new token, the text it made certain (all the rest once the request is finished), and
    /// its log-probabilities if the request asked for them.
    Token(u32, String, Option<TokenLogprob>),
    /// The end, finished or not: the request, the cache if kept, and the error that ended it.
    Done(Box<Ended>),
}

pub(crate) struct Ended {
    pub(crate) request: Request,
    pub(crate) cache: Option<KvCache>,
    pub(crate) error: Option<Error>,
}

/// The sending side of the scheduler's queue; the thread ends when this is dropped and no job runs.
pub(crate) struct Scheduler {
    queue: Mutex<Sender<Job>>,
    counters: Arc<Counters>,
}

/// What the scheduler has done, as `SchedulerStats` reports it.
#[derive(Default)]
struct Counters {
    running: AtomicUsize,
    waiting: AtomicUsize,
    steps: AtomicUsize,
    tokens: AtomicUsize,
}

/// A snapshot of the scheduler's work.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    /// Requests in the batch now.
    pub running: usize,
    /// Requests waiting for room in the KV cache.
    pub waiting: usize,
    /// Forwards run so far, each over every running request.
    pub steps: usize,
    /// Tokens those forwards computed, prompts and new tokens.
    pub tokens: usize,
}

impl Scheduler {
    pub(crate) fn start(generator: Weak<Generator>) -> Result<Self> {
        let (queue, jobs) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let batch = Batch { generator, waiting: Vec::new(), running: Vec::new(), counters: counters.clone() };
        std::thread::Builder::new()
            .name("granite-rs scheduler".into())
            .spawn(move || batch.run(jobs))
            .map_err(|e| Error::Unsupported(format!("cannot start the scheduler's thread: {e}")))?;
        Ok(Self { queue: Mutex::new(queue), counters })
    }

    pub(crate) fn submit(&self, job: Job) -> Result<()> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.send(job).map_err(|_| Error::Batch("the scheduler's thread has stopped".into()))
    }

    pub(crate) fn stats(&self) -> SchedulerStats {
        let c = &self.counters;
        let get = |n: &AtomicUsize| n.load(Ordering::Relaxed);
        SchedulerStats {
            running: get(&c.running),
            waiting: get(&c.waiting),
            steps: get(&c.steps),
            tokens: get(&c.tokens),
        }
    }
}

/// The scheduler thread's state: the jobs waiting for room, and those running.
struct Batch {
    generator: Weak<Generator>,
    waiting: Vec<Job>,
    running: Vec<Job>,
    counters: Arc<Counters>,
}

impl Batch {
    fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.waiting.push(job),
                    Err(_) => return,
                }
            }
            self.waiting.extend(jobs.try_iter());
            // Jobs hold the generator, so it lives while there are any.
            let Some(generator) = self.generator.upgrade() else { return };
            self.drop_cancelled();
            self.admit(&generator);
            self.counters.running.store(self.running.len(), Ordering::Relaxed);
            self.counters.waiting.store(self.waiting.len(), Ordering::Relaxed);
            self.step(&generator);
        }
    }

    fn drop_cancelled(&mut self) {
        let cancelled = |j: &Job| j.cancel.load(Ordering::Relaxed);
        let ended = extract(&mut self.running, cancelled).into_iter().chain(extract(&mut self.waiting, cancelled));
        let ended: Vec<_> = ended.map(|job| (job, Some(Error::Cancelled))).collect();
        self.end(ended);
    }

    /// Ends jobs already out of the queues: the counters first, so that an owner who hears of
    /// the end sees them without it.
    fn end(&self, ended: Vec<(Job, Option<Error>)>) {
        self.counters.running.store(self.running.len(), Ordering::Relaxed);
        self.counters.waiting.store(self.waiting.len(), Ordering::Relaxed);
        for (job, error) in ended {
            end(job, error);
        }
    }

    /// Starts waiting jobs, oldest first, while the pool holds what each may need.
    fn admit(&mut self, generator: &Generator) {
        let model = generator.model();
        let most = |j: &Job| {
            let r = &j.request;
            let n = (r.prompt_len() + r.max_new_tokens()).min(generator.context_length());
            n.next_multiple_of(BLOCK_TOKENS).saturating_sub(j.cache.as_ref().map_or(0, KvCache::capacity))
        };
        let promised: usize = self.running.iter().map(most).sum();
        let mut room = model.kv_pool().free_positions().saturating_sub(promised);
        while let Some(job) = self.waiting.first() {
            let need = most(job);
            if need > room && !self.running.is_empty() {
                break;
            }
            room = room.saturating_sub(need);
            let mut job = self.waiting.remove(0);
            // The prompt's start may be cached already; its last token is computed for its logits.
            let cache = job.cache.get_or_insert_with(|| model.new_cache());
            let reused = cache.reuse_prefix(job.request.tokens(), job.request.prompt_len() - 1);
            job.pending.drain(..reused);
            job.request.add_cached(reused);
            self.running.push(job);
        }
    }

    /// One forward over a span of each running job that fits this step; then each job whose
    /// span ended its pending tokens picks its next token.
    fn step(&mut self, generator: &Generator) {
        let mut chosen = plan(self.running.iter().map(|j| (j.pending.len(), j.cache.as_ref().map_or(0, KvCache::len))));
        // Room for each span's positions; a job that cannot have it ends alone.
        let mut failed = Vec::new();
        chosen.retain(|&(i, n)| {
            let job = &mut self.running[i];
            match job.cache.as_mut().expect("a running job has its cache").reserve(n) {
                Ok(()) => true,
                Err(e) => {
                    failed.push((i, e));
                    false
                }
            }
        });
        let mut outcomes: Vec<(usize, Option<Error>)> = failed.into_iter().map(|(i, e)| (i, Some(e))).collect();
        match self.forward(generator, &chosen) {
            Ok(logits) => {
                for ((i, n), logits) in chosen.into_iter().zip(logits) {
                    let job = &mut self.running[i];
                    if let Some(error) = job.advance(n, logits) {
                        outcomes.push((i, Some(error)));
                    } else if job.request.is_finished() {
                        outcomes.push((i, None));
                    }
                }
            }
            Err(e) => {
                let message = e.to_string();
                outcomes.extend(chosen.into_iter().map(|(i, _)| (i, Some(Error::Batch(message.clone())))));
            }
        }
        // Ended jobs leave, from the back so that the indices stay right.
        outcomes.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let ended = outcomes.into_iter().map(|(i, error)| (self.running.remove(i), error)).collect();
        self.end(ended);
    }

    /// Runs the chosen spans; the grammars of the jobs about to pick a token compute their next
    /// mask on a second thread meanwhile (it depends only on the tokens so far).
    fn forward(&mut self, generator: &Generator, chosen: &[(usize, usize)]) -> Result<Vec<candle_core::Tensor>> {
        if chosen.is_empty() {
            return Ok(Vec::new());
        }
        let mut picked = vec![None; self.running.len()];
        for &(i, n) in chosen {
            picked[i] = Some(n);
        }
        let mut spans = Vec::with_capacity(chosen.len());
        let mut constraints = Vec::new();
        for (job, n) in self.running.iter_mut().zip(picked) {
            let Some(n) = n else { continue };
            job.request.start_clock();
            let cache = job.cache.as_mut().expect("a running job has its cache");
            let as_prompt = reads_as_prompt(cache.len(), job.request.prompt_len());
            if n == job.pending.len() {
                constraints.extend(job.request.constraint_mut());
            }
            spans.push(Span { tokens: &job.pending[..n], as_prompt, cache: Some(cache), logits: Logits::Last });
        }
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.counters.tokens.fetch_add(chosen.iter().map(|c| c.1).sum(), Ordering::Relaxed);
        let model = generator.model();
        let opts = ForwardOptions::default();
        if constraints.is_empty() {
            return model.forward_spans(&mut spans, &opts);
        }
        let (logits, masks) = std::thread::scope(|scope| {
            let masks = scope.spawn(|| constraints.into_iter().map(|c| c.prepare()).collect::<Result<Vec<()>>>());
            let logits = model.forward_spans(&mut spans, &opts);
            (logits, masks.join())
        });
        // A mask that failed fails again, for its own job alone, when the job applies it.
        drop(masks);
        logits
    }
}

impl Job {
    /// Records that the first `n` pending tokens are in the cache; once none is left, picks the
    /// next token from `logits` and tells the owner. An error ends the job.
    fn advance(&mut self, n: usize, logits: candle_core::Tensor) -> Option<Error> {
        self.pending.drain(..n);
        if !self.pending.is_empty() {
            return None;
        }
        let token = match logits.squeeze(0).map_err(Error::from).and_then(|l| self.request.step(&l)) {
            Ok(token) => token,
            Err(e) => return Some(e),
        };
        self.pending.push(token);
        let text = self.request.take_text();
        let logprob = self.request.take_logprob();
        // An owner that has gone away no longer wants the rest.
        if self.events.send(Event::Token(token, text, logprob)).is_err() {
            self.cancel.store(true, Ordering::Relaxed);
        }
        None
    }
}

/// Which jobs run in a step and how many tokens each feeds, from each running job's pending
/// count and cache length: every decoding job (one token), and prompt chunks while they fit
/// `PREFILL_CHUNK` tokens together (the first always runs), oldest job first. A prompt's chunks
/// end at multiples of `PREFILL_CHUNK` positions, wherever the prompt's computing starts.
fn plan(jobs: impl Iterator<Item = (usize, usize)>) -> Vec<(usize, usize)> {
    let mut prefill = 0;
    let mut chosen = Vec::new();
    for (i, (n, start)) in jobs.enumerate() {
        let n = n.min(PREFILL_CHUNK - start % PREFILL_CHUNK);
        if n > 1 {
            if prefill > 0 && prefill + n > PREFILL_CHUNK {
                continue;
            }
            prefill += n;
        }
        chosen.push((i, n));
    }
    chosen
}

/// Whether a prompt's tokens from `start` on are computed as a prompt's rows however few
/// (`Span::as_prompt`): when the chunk they belong to, from its start at a multiple of
/// `PREFILL_CHUNK` to the prompt's end at most, is more than decode's rows. The rest of a chunk
/// whose start came from a cache so gets the bits it gets with the whole chunk.
fn reads_as_prompt(start: usize, prompt_len: usize) -> bool {
    let chunk = start - start % PREFILL_CHUNK;
    start < prompt_len && prompt_len.min(chunk + PREFILL_CHUNK) - chunk > GEMV_MAX_ROWS
}

/// Tells the owner the job has ended and hands back what it keeps; a cache not kept is back in
/// the pool before the owner hears.
fn end(job: Job, error: Option<Error>) {
    let Job { request, cache, keep_cache, events, .. } = job;
    let cache = match keep_cache {
        true => cache,
        false => {
            drop(cache);
            None
        }
    };
    let _ = events.send(Event::Done(Box::new(Ended { request, cache, error })));
}

/// Removes and returns the items that match.
fn extract<T>(items: &mut Vec<T>, matches: impl Fn(&T) -> bool) -> Vec<T> {
    let (out, keep): (Vec<T>, Vec<T>) = std::mem::take(items).into_iter().partition(|t| matches(t));
    *items = keep;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_jobs_run_every_step_beside_one_chunk_of_prompt() {
        const C: usize = PREFILL_CHUNK;
        let fresh = |pending: &[usize]| plan(pending.iter().map(|&n| (n, 0)));
        // A long prompt feeds one chunk per step; the decoding jobs go on beside it.
        assert_eq!(fresh(&[1, 3 * C + 5, 1]), [(0, 1), (1, C), (2, 1)]);
        // Short prompts share a step while they fit one chunk together; the rest wait a step.
        let short = C / 4;
        assert_eq!(fresh(&[short; 5]), [(0, short), (1, short), (2, short), (3, short)]);
        // A smaller prompt after one that did not fit still may.
        assert_eq!(fresh(&[C - 10, 20, 10, 1]), [(0, C - 10), (2, 10), (3, 1)]);
        // The oldest prompt always runs.
        assert_eq!(fresh(&[C, C]), [(0, C)]);
        // A prompt whose start is cached reads up to the next multiple of C first.
        assert_eq!(plan([(C + 50, C + 32)].into_iter()), [(0, C - 32)]);
    }

    #[test]
    fn the_rest_of_a_cached_chunk_is_read_as_a_prompt() {
        const C: usize = PREFILL_CHUNK;
        // Its chunk, 0..C, is a prompt's rows however few of them are left.
        assert!(reads_as_prompt(C - 1, C + 7));
        // A chunk of the prompt's last few tokens is read as decode, cached start or not.
        assert!(!reads_as_prompt(C, C + GEMV_MAX_ROWS) && !reads_as_prompt(C + 3, C + GEMV_MAX_ROWS));
        assert!(reads_as_prompt(C + 3, C + GEMV_MAX_ROWS + 1));
        // Past the prompt: decode.
        assert!(!reads_as_prompt(C + 9, C + 9));
    }
}
