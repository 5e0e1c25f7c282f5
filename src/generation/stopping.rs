//! When a sequence ends: end-of-sequence and stop token ids, max_new_tokens, the context.

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string or stop token id.
    Stop,
    /// max_new_tokens or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

impl Generator {
    /// Why a sequence ends after `token`, having `generated` new tokens and `total` in all.
    pub(crate) fn finish_reason(
        &self,
        params: &GenerateParams,
        max_new_tokens: usize,
        token: u32,
        generated: usize,
        total: usize,
    ) -> Option<FinishReason> {
        if !params.ignore_eos && self.eos_token_ids().contains(&token) {
            Some(FinishReason::Eos)
        } else if params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= max_new_tokens || total >= self.context_length() {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// max_new_tokens as given, else generation_config.json's, else 256.
    pub(crate) fn max_new_tokens(&self, params: &GenerateParams) -> Result<usize> {
        match params.max_new_tokens.or(self.defaults().max_new_tokens).unwrap_or(256) {
            0 => Err(Error::invalid("max_new_tokens must be at least 1")),
            n => Ok(n),
        }
    }
}
