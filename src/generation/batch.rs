//! Several prompts generated together: left-padded to one length, one forward per step for the
//! whole batch. Greedy results equal running the prompts one by one.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::Result;
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::sampling::{check_finite, Sampler};
use crate::generation::sequence::Sequence;
use crate::generation::stopping::FinishReason;
use crate::model::granite::{ForwardOptions, Logits};
use crate::text::stop::StoppingText;

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The new tokens, as `Sequence::new_tokens` gives them.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

struct Row {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    sampler: Sampler,
    /// The same text machinery as one-by-one generation, so the text is the same too.
    text: StoppingText,
    out: String,
    finish: Option<FinishReason>,
}

impl Row {
    /// Takes a new token: stop criteria as `Sequence::next_token`, then the text.
    fn push(
        &mut self,
        token: u32,
        generator: &Generator,
        params: &GenerateParams,
        max_new_tokens: usize,
    ) -> Result<()> {
        self.generated.push(token);
        let total = self.prompt.len() + self.generated.len();
        self.finish = generator.finish_reason(params, max_new_tokens, token, self.generated.len(), total);
        let ended_on_token = matches!(self.finish, Some(FinishReason::Eos | FinishReason::Stop));
        if !ended_on_token && self.text.push(token)? {
            self.finish = Some(FinishReason::Stop);
        }
        if self.finish.is_some() {
            self.text.finish()?;
        }
        self.out.push_str(&self.text.take());
        Ok(())
    }
}

/// Generates for every prompt with the same parameters (each row gets its own sampler, seeded
/// alike). `cancel` stops the work within one layer.
pub fn generate_batch(
    generator: &Arc<Generator>,
    prompts: Vec<Vec<u32>>,
    params: &GenerateParams,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<BatchOutput>> {
    let mut max_new_tokens = 0;
    for prompt in &prompts {
        max_new_tokens = Sequence::check(generator, prompt, params)?;
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 {
        return Ok(Vec::new());
    }
    let left_pad: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
    let pad = generator.config().pad_token_id.unwrap_or(0);
    let ids: Vec<u32> =
        prompts.iter().flat_map(|p| std::iter::repeat_n(pad, longest - p.len()).chain(p.iter().copied())).collect();
    let mut rows = prompts
        .into_iter()
        .map(|prompt| {
            Ok(Row {
                prompt,
                generated: Vec::new(),
                sampler: Sampler::new(params.sampling.clone())?,
                text: StoppingText::new(generator.shared_tokenizer(), params.stop.clone()),
                out: String::new(),
                finish: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (b, device) = (rows.len(), generator.model().device());
    let mut cache = generator.model().new_cache(b, longest + max_new_tokens.min(1024))?;
    let mut input = Tensor::from_vec(ids, (b, longest), device)?;
    let opts = ForwardOptions { left_pad: &left_pad, cancel };
    while rows.iter().any(|r| r.finish.is_none()) {
        let logits = generator.model().forward_with(&input, Some(&mut cache), Logits::Last, &opts)?;
        let mut logits = logits.squeeze(1)?.to_vec2::<f32>()?; // (b, vocab)
        for (row, logits) in rows.iter_mut().zip(logits.iter_mut()).filter(|(r, _)| r.finish.is_none()) {
            check_finite(logits, generator.model().dtype())?;
            let token = row.sampler.sample(logits, &row.prompt, &row.generated)?;
            row.push(token, generator, params, max_new_tokens)?;
        }
        // Finished rows keep feeding their last token; their outputs are ignored.
        let next: Vec<u32> = rows.iter().map(|r| *r.generated.last().unwrap_or(&pad)).collect();
        input = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok(rows
        .into_iter()
        .map(|row| BatchOutput {
            tokens: row.generated,
            text: row.out,
            finish: row.finish.unwrap_or(FinishReason::Length),
        })
        .collect())
}
