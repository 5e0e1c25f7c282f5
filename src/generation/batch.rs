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
use crate::model::span::{Logits, Span};

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The new tokens, as `Sequence::new_tokens` gives them.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Generates for every (prompt, parameters) row. A finished row leaves the forward at once.
/// `cancel` stops the work within one layer.
pub fn generate_batch(
    generator: &Arc<Generator>,
    rows: Vec<(Vec<u32>, GenerateParams)>,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<BatchOutput>> {
    let model = generator.model();
    let mut requests = Vec::with_capacity(rows.len());
    let mut caches = Vec::with_capacity(rows.len());
    for (prompt, params) in rows {
        let request = Request::new(generator.clone(), prompt, params, 0)?;
        let room = (request.prompt_len() + request.max_new_tokens().min(1024)).min(generator.context_length());
        caches.push(model.new_cache(room)?);
        requests.push(request);
    }
    let mut pending: Vec<Vec<u32>> = requests.iter().map(|r| r.tokens().to_vec()).collect();
    let mut texts = vec![String::new(); requests.len()];
    requests.iter_mut().for_each(Request::start_clock);
    let opts = ForwardOptions { cancel };
    loop {
        let live: Vec<usize> = (0..requests.len()).filter(|&i| !requests[i].is_finished()).collect();
        if live.is_empty() {
            break;
        }
        let mut spans: Vec<Span> = caches
            .iter_mut()
            .zip(&pending)
            .zip(&requests)
            .filter(|(_, r)| !r.is_finished())
            .map(|((cache, tokens), _)| Span { tokens, cache: Some(cache), logits: Logits::Last })
            .collect();
        let logits = model.forward_spans(&mut spans, &opts)?;
        for (i, logits) in live.into_iter().zip(logits) {
            let token = requests[i].step(&logits.squeeze(0)?)?;
            pending[i] = vec![token];
            texts[i].push_str(&requests[i].take_text());
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
