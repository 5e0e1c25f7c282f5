//! Next-token choice with transformers' processors, in its order (`_get_logits_processor`):
//! repetition penalty, then presence and frequency penalties, then (sampling only) temperature,
//! top-k, top-p, min-p.
//!
//! transformers has no presence or frequency penalty; they follow OpenAI and vLLM, counting the
//! generated tokens only, and are applied right after the repetition penalty as vLLM does.

use candle_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::generation::params::SamplingParams;
use crate::model::first_max;

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

    /// Picks the next token from `logits` (vocab,), given the prompt and the tokens generated
    /// after it. The repetition penalty counts both; presence and frequency penalties only
    /// `generated`.
    ///
    /// On return `logits` holds the processed scores the token was picked from, as transformers'
    /// `output_scores` (masked tokens at -inf; penalties only when greedy): `log_softmax` of them
    /// gives the log-probabilities of the distribution sampled. Clone `logits` first for raw ones.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> Result<u32> {
        self.process(logits, prompt, generated)?;
        if !self.params.do_sample {
            return Ok(first_max(logits));
        }
        Ok(self.draw(&softmax(logits)))
    }

    /// Greedy with no processor that reads the logits: the pick is their argmax.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        !p.do_sample
            && p.repetition_penalty.is_none_or(|r| r == 1.0)
            && p.presence_penalty.unwrap_or(0.0) == 0.0
            && p.frequency_penalty.unwrap_or(0.0) == 0.0
    }

    /// Applies every processor in order, without picking.
    fn process(&self, logits: &mut [f32], prompt: &[u32], generated: &[u32]) -> Result<()> {
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::Numerical("the model produced NaN logits".into()));
        }
        let p = &self.params;
        if let Some(penalty) = p.repetition_penalty.filter(|p| *p != 1.0) {
            repetition_penalty(logits, prompt, generated, penalty as f32);
        }
        let presence = p.presence_penalty.unwrap_or(0.0);
        let frequency = p.frequency_penalty.unwrap_or(0.0);
        if presence != 0.0 || frequency != 0.0 {
            presence_frequency_penalty(logits, generated, presence as f32, frequency as f32);
        }
        if !p.do_sample {
            return Ok(());
        }
        if p.temperature != 1.0 {
            let t = p.temperature as f32;
            logits.iter_mut().for_each(|x| *x /= t);
            // A tiny temperature sends the scores past f32's range (transformers fails here too).
            if logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                return Err(Error::Numerical(format!(
                    "temperature {} scales the logits past float32's range; use a larger one or do_sample=False",
                    p.temperature
                )));
            }
        }
        if let Some(k) = p.top_k.filter(|k| *k > 0) {
            top_k(logits, k);
        }
        if let Some(top) = p.top_p.filter(|p| *p < 1.0) {
            top_p(logits, top as f32);
        }
        if let Some(m) = p.min_p.filter(|m| *m > 0.0) {
            min_p(logits, m as f32);
        }
        Ok(())
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

/// Checks a model's raw logits: NaN or infinite values mean broken weights or, computing in
/// float16, activations past its largest value (65504).
pub fn check_finite(logits: &[f32], dtype: DType) -> Result<()> {
    if logits.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    let kind = if logits.iter().any(|x| x.is_nan()) { "NaN" } else { "infinite" };
    Err(Error::Numerical(match dtype {
        DType::F16 => {
            format!("the logits overflowed in float16 ({kind} values); use dtype=\"float32\" or \"bfloat16\"")
        }
        _ => format!("the model produced {kind} logits"),
    }))
}

/// transformers' RepetitionPenaltyLogitsProcessor: the scores of tokens seen in the prompt or
/// the generated tokens shrink toward less likely.
pub fn repetition_penalty(logits: &mut [f32], prompt: &[u32], generated: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &id in prompt.iter().chain(generated) {
        if let Some(s) = seen.get_mut(id as usize) {
            *s = true;
        }
    }
    for (x, _) in logits.iter_mut().zip(&seen).filter(|(_, s)| **s) {
        *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
    }
}

/// OpenAI's and vLLM's penalties over the generated tokens:
/// `logits[t] -= frequency * count[t] + presence * (count[t] > 0)`.
pub fn presence_frequency_penalty(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let mut counts = vec![0u32; logits.len()];
    for &id in generated {
        if let Some(c) = counts.get_mut(id as usize) {
            *c += 1;
        }
    }
    for (x, &c) in logits.iter_mut().zip(&counts).filter(|(_, c)| **c > 0) {
        // Two steps, as vLLM subtracts them.
        *x -= frequency * c as f32;
        *x -= presence;
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

/// transformers' MinPLogitsWarper: masks the tokens less likely than `p` times the most likely
/// one. The most likely always stays (p <= 1), so its min_tokens_to_keep = 1 changes nothing.
pub fn min_p(logits: &mut [f32], p: f32) {
    let probs = softmax(logits);
    let threshold = p * probs.iter().copied().fold(0.0, f32::max);
    for (x, prob) in logits.iter_mut().zip(probs) {
        if prob < threshold {
            *x = f32::NEG_INFINITY;
        }
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Log-probabilities `x - max - ln(sum(exp(x - max)))`, stable for any finite scores; masked
/// (-inf) scores stay -inf. The sum is taken in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&x| x - max - log_sum).collect()
}
