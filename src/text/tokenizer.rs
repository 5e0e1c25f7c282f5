//! `tokenizer.json` through the `tokenizers` crate.

use std::path::Path;

use crate::error::{Error, Result};

pub struct Tokenizer(pub(crate) tokenizers::Tokenizer);

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::NotFound { what: "tokenizer file", path: path.into() });
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self(inner))
    }

    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Self(inner)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.0.encode(text, add_special_tokens)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(self.0.decode(ids, skip_special_tokens)?)
    }

    /// Whether `text` is one special token of the vocabulary (`<|tool_call|>`, say).
    pub fn is_special(&self, text: &str) -> bool {
        self.0.get_added_tokens_decoder().values().any(|t| t.special && t.content == text)
    }
}
