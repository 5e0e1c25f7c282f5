//! Several requests generated together: every row is submitted to the scheduler at once, so
//! they share each forward (`scheduler`), and each gets the tokens it gets alone.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::Result;
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::sequence::Sequence;
use crate::generation::stopping::FinishReason;

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOutput {
    /// The new tokens, as `Sequence::new_tokens` gives them.
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
}

/// Generates for every (prompt, parameters) row. Rows start as the KV pool has room for them
/// (see `scheduler`). Setting `cancel` stops every row at the next step.
pub fn generate_batch(
    generator: &Arc<Generator>,
    rows: Vec<(Vec<u32>, GenerateParams)>,
    cancel: Arc<AtomicBool>,
) -> Result<Vec<BatchOutput>> {
    // A row that fails its checks drops those made before it, which cancels them.
    let mut sequences = rows
        .into_iter()
        .map(|(prompt, params)| Sequence::with_cancel(generator.clone(), prompt, params, cancel.clone()))
        .collect::<Result<Vec<_>>>()?;
    let outputs = sequences
        .iter_mut()
        .map(|s| {
            let text = s.run()?;
            let finish = s.finish_reason().unwrap_or(FinishReason::Length);
            Ok(BatchOutput { tokens: s.new_tokens().to_vec(), text, finish })
        })
        .collect();
    // After an error, the other rows end before this returns, their caches freed.
    sequences.iter_mut().for_each(Sequence::stop);
    outputs
}
