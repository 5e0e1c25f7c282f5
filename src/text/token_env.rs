//! Our tokenizer as llguidance sees it, for constrained decoding: every token's bytes in a trie
//! (special tokens marked, so that a grammar never produces them as text), and the tokenizer
//! itself for the text a grammar forces.

use std::sync::Arc;

use llguidance::toktrie::{TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::text::tokenizer::Tokenizer;

pub struct TokenEnv {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenEnv {
    /// The trie of a model whose logits have `vocab_size` entries: ids the tokenizer lacks have
    /// no bytes (a grammar never allows them), and `eos` are the tokens that end a sequence.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize, eos: &[u32]) -> Result<Self> {
        let unsupported = |why: String| Error::Unsupported(format!("constrained decoding with this tokenizer: {why}"));
        let json = tokenizer.0.to_string(false).map_err(|e| unsupported(e.to_string()))?;
        let json: serde_json::Value = serde_json::from_str(&json).map_err(|e| unsupported(e.to_string()))?;
        // The tokenizer comes from the model directory: a malformed one must be an error, and
        // the reader of its vocabulary asserts on some malformed entries.
        let built = std::panic::catch_unwind(|| -> std::result::Result<TokTrie, String> {
            let mut words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
            words.resize(vocab_size, Vec::new());
            let first_eos = *eos.first().ok_or("the model has no end-of-sequence token")?;
            let trie = TokTrie::from(&TokRxInfo::new(vocab_size as u32, first_eos), &words);
            Ok(trie.with_eos_tokens(eos))
        });
        let trie = match built {
            Ok(Ok(trie)) => trie,
            Ok(Err(e)) => return Err(unsupported(e)),
            Err(_) => return Err(unsupported("its vocabulary could not be read".into())),
        };
        Ok(Self { trie, tokenizer })
    }
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s).map(|text| self.tokenizer.encode(text, false)) {
            Ok(Ok(ids)) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}
