//! Stop strings on streamed text: nothing of a stop string is ever released.

use std::sync::Arc;

use crate::error::Result;
use crate::text::detokenizer::Detokenizer;
use crate::text::tokenizer::Tokenizer;

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

/// Tokens in, certain text out: a `Detokenizer` filtered through `StopStrings`.
pub struct StoppingText {
    text: Detokenizer,
    stops: StopStrings,
    /// Certain text not yet taken.
    ready: String,
    done: bool,
}

impl StoppingText {
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        Self { text: Detokenizer::new(tokenizer), stops: StopStrings::new(stops), ready: String::new(), done: false }
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
