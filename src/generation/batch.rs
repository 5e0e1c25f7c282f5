//! Several requests generated together: one forward per step over every unfinished request's
//! span (its prompt first, then one token), each over its own cache, with no padding. A row's
//! tokens are those it gives alone (`Granite::forward_spans`), whatever else runs beside it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::Result;
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::request::Request;
use crate::generation::stopping::FinishReason;
use crate::model::granite::ForwardOptions;
use crate::model::kv_cache::KvCache;
use crate::model::kv_pool::BLOCK_TOKENS;
use crate::model::span::{Logits, Span};

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The new tokens, as `Sequence::new_tokens` gives them.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Generates for every (prompt, parameters) row. A finished row leaves the forward at once and
/// gives its KV cache back. A row starts when the pool has room for the most it may need
/// (prompt and max_new_tokens) beside what the running rows may still take; until then it waits
/// (it starts at once when no other row runs). `cancel` stops the work within one layer.
pub fn generate_batch(
    generator: &Arc<Generator>,
    rows: Vec<(Vec<u32>, GenerateParams)>,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<BatchOutput>> {
    let model = generator.model();
    let mut requests = rows
        .into_iter()
        .map(|(p, params)| Request::new(generator.clone(), p, params, 0))
        .collect::<Result<Vec<_>>>()?;
    // The positions a row may fill, in whole blocks.
    let most = |r: &Request| {
        let n = (r.prompt_len() + r.max_new_tokens()).min(generator.context_length());
        n.next_multiple_of(BLOCK_TOKENS)
    };
    // None: waiting for room, or finished (its cache given back).
    let mut caches: Vec<Option<KvCache>> = requests.iter().map(|_| None).collect();
    let mut started = vec![false; requests.len()];
    let mut pending: Vec<Vec<u32>> = requests.iter().map(|r| r.tokens().to_vec()).collect();
    let mut texts = vec![String::new(); requests.len()];
    requests.iter_mut().for_each(Request::start_clock);
    let opts = ForwardOptions { cancel };
    loop {
        let promised: usize = requests
            .iter()
            .zip(&caches)
            .filter_map(|(r, c)| Some(most(r).saturating_sub(c.as_ref()?.capacity())))
            .sum();
        let mut room = model.kv_pool().free_positions().saturating_sub(promised);
        let mut any_running = caches.iter().any(Option::is_some);
        for i in 0..requests.len() {
            if !started[i] && (most(&requests[i]) <= room || !any_running) {
                room = room.saturating_sub(most(&requests[i]));
                caches[i] = Some(model.new_cache());
                (started[i], any_running) = (true, true);
            }
        }
        let live: Vec<usize> = (0..requests.len()).filter(|&i| caches[i].is_some()).collect();
        if live.is_empty() {
            break;
        }
        let mut spans: Vec<Span> = caches
            .iter_mut()
            .zip(&pending)
            .filter_map(|(cache, tokens)| Some(Span { tokens, cache: Some(cache.as_mut()?), logits: Logits::Last }))
            .collect();
        let logits = model.forward_spans(&mut spans, &opts)?;
        for (i, logits) in live.into_iter().zip(logits) {
            let token = requests[i].step(&logits.squeeze(0)?)?;
            pending[i] = vec![token];
            texts[i].push_str(&requests[i].take_text());
            if requests[i].is_finished() {
                caches[i] = None;
            }
        }
    }
    Ok(requests
        .into_iter()
        .zip(texts)
        .map(|(r, text)| BatchOutput {
            tokens: r.new_tokens().to_vec(),
            text,
            finish: r.finish_reason().unwrap_or(FinishReason::Length),
        })
        .collect())
}
