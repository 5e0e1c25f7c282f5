//! Incremental detokenization: text handed out as soon as it is final.

use std::sync::Arc;

use crate::error::Result;
use crate::text::tokenizer::Tokenizer;

/// Text of a growing token sequence, handed out as soon as it is final: a chunk never ends
/// in half a UTF-8 character, and all chunks joined equal `decode` of all the tokens.
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    /// The window that `tokenizers::step_decode_stream` re-decodes (a few tokens).
    window: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Every token pushed, and the text handed out so far.
    ids: Vec<u32>,
    text: String,
}

impl Detokenizer {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            window: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
            ids: Vec::new(),
            text: String::new(),
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let chunk = tokenizers::tokenizer::step_decode_stream(
            &self.tokenizer.0,
            vec![id],
            true,
            &mut self.window,
            &mut self.prefix,
            &mut self.prefix_index,
        )?;
        if let Some(c) = &chunk {
            self.text.push_str(c);
        }
        Ok(chunk)
    }

    /// Whatever is still held back (an unfinished character at the very end), once no token follows.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let full = self.tokenizer.decode(&self.ids, true)?;
        let rest = full.strip_prefix(self.text.as_str()).unwrap_or_default().to_string();
        self.text.push_str(&rest);
        Ok((!rest.is_empty()).then_some(rest))
    }
}
