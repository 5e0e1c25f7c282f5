//! Next-token choice with transformers' processors, in its order: repetition penalty, then
//! (sampling only) temperature, top-k, top-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub do_sample: bool,
    pub temperature: f64,
    /// None or 0: off.
    pub top_k: Option<usize>,
    /// None or 1.0: off.
    pub top_p: Option<f64>,
    /// None or 1.0: off.
    pub repetition_penalty: Option<f64>,
    /// Makes sampling reproducible; None draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { do_sample: false, temperature: 1.0, top_k: None, top_p: None, repetition_penalty: None, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 || (self.do_sample && t == 0.0) {
            return Err(Error::invalid(format!("temperature must be a positive number, got {t}")));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::invalid(format!("repetition_penalty must be a positive number, got {r}")));
            }
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// Picks the next token from `logits` (vocab,), given every token so far.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> Result<u32> {
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Numerical("the model produced NaN logits".into()));
        }
        if let Some(penalty) = self.params.repetition_penalty.filter(|p| *p != 1.0) {
            repetition_penalty(logits, context, penalty as f32);
        }
        if !self.params.do_sample {
            return Ok(argmax(logits));
        }
        if self.params.temperature != 1.0 {
            let t = self.params.temperature as f32;
            logits.iter_mut().for_each(|x| *x /= t);
        }
        if let Some(k) = self.params.top_k.filter(|k| *k > 0) {
            top_k(logits, k);
        }
        if let Some(p) = self.params.top_p.filter(|p| *p < 1.0) {
            top_p(logits, p as f32);
        }
        Ok(self.draw(&softmax(logits)))
    }

    fn draw(&mut self, probs: &[f32]) -> u32 {
        let u: f32 = self.rng.random();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return i as u32;
            }
        }
        // Rounding left u above the total: take the last token that can be drawn.
        probs.iter().rposition(|p| *p > 0.0).unwrap_or(0) as u32
    }
}

/// The first index of the largest value.
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// transformers' RepetitionPenaltyLogitsProcessor: seen tokens' scores shrink toward less likely.
pub fn repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in context {
        if let Some(s) = seen.get_mut(id as usize) {
            *s = true;
        }
    }
    for (x, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
        *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
    }
}

/// transformers' TopKLogitsWarper: masks every score below the k-th largest (ties kept).
pub fn top_k(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f32::NEG_INFINITY);
}

/// transformers' TopPLogitsWarper: masks the least likely tokens whose total probability is at
/// most 1 - p, keeping at least one.
pub fn top_p(logits: &mut [f32], p: f32) {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b])); // ascending, as transformers sorts
    let mut cumulative = 0.0;
    for &i in &order[..order.len() - 1] {
        cumulative += probs[i];
        if cumulative > 1.0 - p {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}
