//! `tokenizer.json` through the `tokenizers` crate, and incremental detokenization.

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};

pub struct Tokenizer(tokenizers::Tokenizer);

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
}

/// Text of a growing token sequence, handed out as soon as it is final: a chunk never ends
/// in half a UTF-8 character, and all chunks joined equal `decode` of all the tokens.
pub struct TextStream {
    tokenizer: Arc<Tokenizer>,
    /// The window that `tokenizers::step_decode_stream` re-decodes (a few tokens).
    window: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Every token pushed, and the text handed out so far.
    ids: Vec<u32>,
    text: String,
}

impl TextStream {
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

/// Stop strings matched on the text, even across chunk boundaries. Text that could still
/// become a stop string is held back; nothing of a stop string is ever released.
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new() }
    }

    /// Adds text; returns what is now certain, and whether a stop string was found.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let found = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = found {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.longest_partial_match();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Everything held, once no more text follows.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of `held` that is a proper prefix of some stop string.
    fn longest_partial_match(&self) -> usize {
        self.stops
            .iter()
            .flat_map(|s| s.char_indices().skip(1).map(move |(i, _)| &s[..i]))
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

/// Tokens in, certain text out: a `TextStream` filtered through `StopStrings`.
pub struct StoppingText {
    text: TextStream,
    stops: StopStrings,
    /// Certain text not yet taken.
    ready: String,
    done: bool,
}

impl StoppingText {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        Self { text: TextStream::new(tokenizer), stops: StopStrings::new(stops), ready: String::new(), done: false }
    }

    /// Adds a token; returns true when its text completes a stop string (the end of the text).
    pub fn push(&mut self, token: u32) -> Result<bool> {
        if !self.done {
            if let Some(text) = self.text.push(token)? {
                self.add(&text);
            }
        }
        Ok(self.done)
    }

    /// No more tokens: releases all that was held back. Returns true if a stop string ended it.
    pub fn finish(&mut self) -> Result<bool> {
        if self.done {
            return Ok(true);
        }
        if let Some(rest) = self.text.finish()? {
            self.add(&rest);
        }
        let stopped = self.done;
        self.ready.push_str(&self.stops.finish());
        self.done = true;
        Ok(stopped)
    }

    fn add(&mut self, text: &str) {
        let (certain, stopped) = self.stops.push(text);
        self.ready.push_str(&certain);
        self.done |= stopped;
    }

    /// The certain text since the last call.
    pub fn take(&mut self) -> String {
        std::mem::take(&mut self.ready)
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Whether all text has been released (it may still wait in `take`).
    pub fn is_done(&self) -> bool {
        self.done
    }
}
