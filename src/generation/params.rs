//! The parameters of one generation, and the one table of the keywords that set them: the
//! Python methods, the command line, the stub and the README all follow `KEYWORDS`, and every
//! value is checked here (`GenerateParams::set`, `SamplingParams::validate`).

use crate::error::{Error, Result};
use crate::generation::constraint::Grammar;

/// How a keyword's value is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An integer that fits 64 signed bits.
    Count,
    /// Any integer (checked against its range here).
    Int,
    Float,
    Bool,
    /// One string or a list of them.
    Strs,
    /// A list of integers.
    Ints,
    /// One string.
    Str,
    /// A JSON value, or a string of JSON.
    Json,
}

impl Kind {
    /// The type's name in the exported table.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Count | Kind::Int => "int",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Strs => "strs",
            Kind::Ints => "ints",
            Kind::Str => "str",
            Kind::Json => "json",
        }
    }
}

/// A keyword's default, as Python shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    None,
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// One generation keyword: transformers' name where it has one.
#[derive(Debug, Clone, Copy)]
pub struct Keyword {
    pub name: &'static str,
    pub kind: Kind,
    /// Whether None is accepted (it means the default).
    pub nullable: bool,
    pub default: DefaultValue,
    /// The values accepted, for people.
    pub range: &'static str,
    pub doc: &'static str,
}

const fn kw(
    name: &'static str,
    kind: Kind,
    nullable: bool,
    default: DefaultValue,
    range: &'static str,
    doc: &'static str,
) -> Keyword {
    Keyword { name, kind, nullable, default, range, doc }
}

/// Every keyword of generate / generate_ids / stream / chat, in the order they are documented.
pub const KEYWORDS: [Keyword; 18] = [
    kw(
        "max_new_tokens",
        Kind::Count,
        true,
        DefaultValue::Int(256),
        ">= 1",
        "most tokens to generate; generation_config.json may set another default",
    ),
    kw(
        "do_sample",
        Kind::Bool,
        false,
        DefaultValue::Bool(false),
        "",
        "sample the next token instead of taking the most likely one",
    ),
    kw("temperature", Kind::Float, false, DefaultValue::Float(1.0), "> 0", "divide the logits by this before sampling"),
    kw(
        "top_k",
        Kind::Int,
        true,
        DefaultValue::None,
        ">= 0; 0 or None: off",
        "sample among the k most likely tokens only",
    ),
    kw(
        "top_p",
        Kind::Float,
        true,
        DefaultValue::None,
        "(0, 1]; None: off",
        "sample among the most likely tokens whose probabilities add up to top_p",
    ),
    kw(
        "min_p",
        Kind::Float,
        true,
        DefaultValue::None,
        "[0, 1]; None: off",
        "drop tokens less likely than min_p times the most likely one",
    ),
    kw(
        "repetition_penalty",
        Kind::Float,
        true,
        DefaultValue::None,
        "> 0; None: off",
        "above 1 makes tokens already in the sequence less likely",
    ),
    kw(
        "presence_penalty",
        Kind::Float,
        true,
        DefaultValue::None,
        "[-2, 2]; None: off",
        "subtracted once from the logit of every token generated so far",
    ),
    kw(
        "frequency_penalty",
        Kind::Float,
        true,
        DefaultValue::None,
        "[-2, 2]; None: off",
        "subtracted from a token's logit once per time it was generated",
    ),
    kw(
        "seed",
        Kind::Int,
        true,
        DefaultValue::None,
        "[0, 2**64)",
        "makes sampling reproducible, whatever other calls or threads do",
    ),
    kw(
        "stop",
        Kind::Strs,
        true,
        DefaultValue::None,
        "non-empty strings",
        "stop when one of these strings appears (not included in the result)",
    ),
    kw(
        "stop_token_ids",
        Kind::Ints,
        true,
        DefaultValue::None,
        "ids in the vocabulary",
        "token ids that end the generation (finish reason \"stop\")",
    ),
    kw("ignore_eos", Kind::Bool, false, DefaultValue::Bool(false), "", "keep going past end-of-sequence tokens"),
    kw(
        "json_schema",
        Kind::Json,
        true,
        DefaultValue::None,
        "a JSON schema (a dict or a JSON string)",
        "the text is one JSON value valid under this schema",
    ),
    kw("regex", Kind::Str, true, DefaultValue::None, "a regex", "the text fully matches this regex"),
    kw(
        "grammar",
        Kind::Str,
        true,
        DefaultValue::None,
        "a grammar in llguidance's Lark syntax",
        "the text matches this context-free grammar",
    ),
    kw(
        "details",
        Kind::Bool,
        false,
        DefaultValue::Bool(false),
        "",
        "return a GenerationResult: ids, log-probabilities, finish reason, timings",
    ),
    kw(
        "top_logprobs",
        Kind::Int,
        false,
        DefaultValue::Int(0),
        ">= 0",
        "with details: also report this many most likely alternatives per token",
    ),
];

/// A keyword's value as the caller gave it, of the keyword's `Kind` (or None where nullable).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Int(i128),
    Float(f64),
    Bool(bool),
    Strs(Vec<String>),
    Ints(Vec<i64>),
    Str(String),
    Json(serde_json::Value),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateParams {
    /// None: generation_config.json's max_new_tokens, else 256.
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// What the text must match (at most one of json_schema, regex and grammar).
    pub grammar: Option<Grammar>,
    /// Record each new token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
    /// Whether the caller wants the details of the result (implies `logprobs`).
    pub details: bool,
}

fn non_negative(name: &str, value: i128) -> Result<u64> {
    u64::try_from(value).map_err(|_| match value < 0 {
        true => Error::invalid(format!("{name} must not be negative, got {value}")),
        false => Error::invalid(format!("{name} must be below 2**64, got {value}")),
    })
}

impl GenerateParams {
    /// Sets keyword `name` to `value`, checked; None sets the default. A value of another kind
    /// than the keyword's is an error.
    pub fn set(&mut self, name: &str, value: Value) -> Result<()> {
        let s = &mut self.sampling;
        let wrong = || Error::invalid(format!("{name}: a value of the wrong type"));
        match (name, value) {
            ("max_new_tokens", Value::None) => self.max_new_tokens = None,
            ("max_new_tokens", Value::Int(n)) if n < 1 => {
                return Err(Error::invalid(format!("max_new_tokens must be at least 1, got {n}")))
            }
            ("max_new_tokens", Value::Int(n)) => self.max_new_tokens = Some(non_negative(name, n)? as usize),
            ("do_sample", Value::Bool(b)) => s.do_sample = b,
            ("temperature", Value::Float(t)) => s.temperature = t,
            ("top_k", Value::None) => s.top_k = None,
            ("top_k", Value::Int(k)) => s.top_k = Some(non_negative(name, k)? as usize),
            ("top_p", v) => s.top_p = float(v).ok_or_else(wrong)?,
            ("min_p", v) => s.min_p = float(v).ok_or_else(wrong)?,
            ("repetition_penalty", v) => s.repetition_penalty = float(v).ok_or_else(wrong)?,
            ("presence_penalty", v) => s.presence_penalty = float(v).ok_or_else(wrong)?,
            ("frequency_penalty", v) => s.frequency_penalty = float(v).ok_or_else(wrong)?,
            ("seed", Value::None) => s.seed = None,
            ("seed", Value::Int(n)) => s.seed = Some(non_negative(name, n)?),
            ("stop", Value::None) => self.stop.clear(),
            ("stop", Value::Strs(v)) => self.stop = v,
            ("stop_token_ids", Value::None) => self.stop_token_ids.clear(),
            ("stop_token_ids", Value::Ints(ids)) => {
                self.stop_token_ids = ids
                    .iter()
                    .map(|&id| u32::try_from(id).map_err(|_| Error::invalid(format!("token id {id} is out of range"))))
                    .collect::<Result<_>>()?
            }
            ("ignore_eos", Value::Bool(b)) => self.ignore_eos = b,
            ("json_schema" | "regex" | "grammar", v) => self.set_grammar(name, v)?,
            ("details", Value::Bool(b)) => {
                self.details = b;
                if b {
                    self.logprobs.get_or_insert(0);
                }
            }
            ("top_logprobs", Value::Int(n)) => self.logprobs = Some(non_negative(name, n)? as usize),
            (name, _) if KEYWORDS.iter().any(|k| k.name == name) => return Err(wrong()),
            (name, _) => return Err(Error::invalid(format!("unexpected keyword argument '{name}'"))),
        }
        Ok(())
    }

    /// Sets (or with None, clears) the grammar of keyword `name`; a second kind is an error.
    fn set_grammar(&mut self, name: &str, value: Value) -> Result<()> {
        let grammar = match (name, value) {
            (_, Value::None) => {
                if self.grammar.as_ref().is_some_and(|g| g.keyword() == name) {
                    self.grammar = None;
                }
                return Ok(());
            }
            ("json_schema", Value::Json(schema)) => Grammar::JsonSchema(schema),
            ("regex", Value::Str(rx)) => Grammar::Regex(rx),
            ("grammar", Value::Str(lark)) => Grammar::Lark(lark),
            _ => return Err(Error::invalid(format!("{name}: a value of the wrong type"))),
        };
        if let Some(other) = self.grammar.as_ref().filter(|g| g.keyword() != name) {
            return Err(Error::invalid(format!(
                "json_schema, regex and grammar: give at most one (got {} and {name})",
                other.keyword()
            )));
        }
        self.grammar = Some(grammar);
        Ok(())
    }

    /// The checks that need no model: sampling values and stop strings.
    pub fn validate(&self) -> Result<()> {
        if self.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop strings must not be empty"));
        }
        self.sampling.validate()
    }
}

/// An optional float keyword's value.
fn float(v: Value) -> Option<Option<f64>> {
    match v {
        Value::None => Some(None),
        Value::Float(f) => Some(Some(f)),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub do_sample: bool,
    pub temperature: f64,
    /// None or 0: off.
    pub top_k: Option<usize>,
    /// None or 1.0: off.
    pub top_p: Option<f64>,
    /// Keeps the tokens at least `min_p` times as likely as the most likely one, in [0, 1].
    /// None or 0: off.
    pub min_p: Option<f64>,
    /// None or 1.0: off.
    pub repetition_penalty: Option<f64>,
    /// Subtracted once from every token generated so far, in [-2, 2]. None or 0: off.
    pub presence_penalty: Option<f64>,
    /// Subtracted from every token generated so far once per time it was, in [-2, 2].
    /// None or 0: off.
    pub frequency_penalty: Option<f64>,
    /// Makes sampling reproducible; None draws a seed from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Every check names its parameter; NaN fails all of them.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 || (self.do_sample && t == 0.0) {
            return Err(Error::invalid(format!("temperature must be a positive number, got {t}")));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(format!("top_p must be in (0, 1], got {p}")));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(format!("min_p must be in [0, 1], got {p}")));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::invalid(format!("repetition_penalty must be a positive number, got {r}")));
            }
        }
        for (name, value) in
            [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)]
        {
            if let Some(v) = value {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(Error::invalid(format!("{name} must be in [-2, 2], got {v}")));
                }
            }
        }
        Ok(())
    }
}
