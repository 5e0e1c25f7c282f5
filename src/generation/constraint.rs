//! Constrained decoding: a request's grammar (a JSON schema, a regex or a Lark grammar) as an
//! llguidance matcher, which masks every token that cannot continue a match before sampling.

use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory};

use crate::error::{Error, Result};

/// What the generated text must match; the keyword that sets each is its name in `KEYWORDS`.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON schema: the text is one JSON value that validates against it.
    JsonSchema(serde_json::Value),
    /// The whole text matches this regex.
    Regex(String),
    /// llguidance's Lark syntax.
    Lark(String),
}

impl Grammar {
    /// The generation keyword that sets this kind of grammar.
    pub fn keyword(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "grammar",
        }
    }

    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => TopLevelGrammar::from_json_schema(with_layout(schema)),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        }
    }
}

/// `schema` with the JSON layout Python's `json.dumps` writes (", " and ": ", no other
/// whitespace) unless it sets its own (llguidance's "x-guidance" key): with whitespace left free, a
/// sampled answer can spend its tokens on blank lines.
fn with_layout(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = schema.clone();
    if let Some(fields) = schema.as_object_mut().filter(|f| !f.contains_key("x-guidance")) {
        let layout = serde_json::json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false});
        fields.insert("x-guidance".into(), layout);
    }
    schema
}

/// One request's matcher: which tokens may come next, and whether the grammar is complete.
pub struct Constraint {
    matcher: Matcher,
    keyword: &'static str,
    /// The mask for the next token, computed ahead (`prepare`) while the forward runs.
    next: Option<SimpleVob>,
    /// Time spent on masks and steps, overlapped with a forward or not.
    time: Duration,
}

impl Constraint {
    /// Compiles `grammar`; one that does not compile is an `InvalidArgument` naming its keyword.
    pub fn new(factory: &ParserFactory, grammar: &Grammar) -> Result<Self> {
        let keyword = grammar.keyword();
        let invalid = |why: String| Error::invalid(format!("{keyword}: {why}"));
        // The factory is only read, so a panic while compiling leaves nothing half-changed.
        let compile = std::panic::AssertUnwindSafe(|| factory.create_parser(grammar.top_level()));
        let parser = std::panic::catch_unwind(compile)
            .map_err(|_| invalid("the grammar could not be compiled".into()))?
            .map_err(|e| invalid(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        // A grammar that matches nothing shows only when its first mask is computed.
        let start = Instant::now();
        let first = matcher.compute_mask().map_err(|e| invalid(e.to_string()))?;
        Ok(Self { matcher, keyword, next: Some(first), time: start.elapsed() })
    }

    /// Computes the next token's mask now (a driver calls this while the forward runs).
    pub fn prepare(&mut self) -> Result<()> {
        if self.next.is_none() && !self.matcher.is_stopped() {
            let start = Instant::now();
            let mask = self.matcher.compute_mask().map_err(|e| self.failed(e));
            self.time += start.elapsed();
            self.next = Some(mask?);
        }
        Ok(())
    }

    /// Sets the logits of every token the grammar does not allow next to -inf.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        let mask = match self.next.take() {
            Some(mask) => mask,
            None => self.matcher.compute_mask().map_err(|e| self.failed(e))?,
        };
        let mut allowed = 0;
        for (i, x) in logits.iter_mut().enumerate() {
            if mask.is_allowed(i as u32) {
                allowed += 1;
            } else {
                *x = f32::NEG_INFINITY;
            }
        }
        self.time += start.elapsed();
        if allowed == 0 {
            return Err(Error::invalid(format!("{}: no token of this model can continue the text", self.keyword)));
        }
        Ok(())
    }

    /// Moves the matcher past `token`.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        let start = Instant::now();
        let stepped = self.matcher.consume_token(token).map_err(|e| self.failed(e));
        self.time += start.elapsed();
        self.next = None;
        stepped
    }

    /// Time spent on masks and steps so far.
    pub fn time(&self) -> Duration {
        self.time
    }

    /// Whether the grammar allows nothing more: the text is a complete match.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn failed(&self, e: impl std::fmt::Display) -> Error {
        Error::Numerical(format!("{}: the grammar's matcher failed: {e}", self.keyword))
    }
}
