//! One error type for the crate; the Python layer maps each variant to an exception class.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model directory or file that does not exist.
    #[error("{what} not found: {}", path.display())]
    NotFound { what: &'static str, path: PathBuf },

    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{}: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },

    /// A config value we cannot honour, named by its field.
    #[error("config.json: `{field}`: {reason}")]
    Config { field: String, reason: String },

    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },

    #[error("weight `{name}` is missing from the checkpoint")]
    MissingWeight { name: String },

    #[error("weight `{name}` has shape {found:?}, expected {expected:?}")]
    WeightShape { name: String, expected: Vec<usize>, found: Vec<usize> },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A bad argument from the caller (a Python `ValueError`).
    #[error("{0}")]
    InvalidArgument(String),

    #[error("the prompt has {prompt} tokens but the context holds {limit}")]
    ContextOverflow { prompt: usize, limit: usize },

    /// Every block of the KV cache pool is held by some sequence.
    #[error(
        "the KV cache is full: {needed} more positions do not fit, {free} of {capacity} are free \
         (kv_cache_bytes={bytes}); load the model with a larger kv_cache_bytes, or let other \
         generations and sessions end"
    )]
    KvCacheFull { needed: usize, free: usize, capacity: usize, bytes: usize },

    /// NaN or infinite values where numbers must be finite.
    #[error("numerical error: {0}")]
    Numerical(String),

    /// The scheduler could not run a step that this generation shared with others.
    #[error("generation failed: {0}")]
    Batch(String),

    /// The caller cancelled the work (a flag set from another thread).
    #[error("cancelled")]
    Cancelled,

    #[error("unsupported: {0}")]
    Unsupported(String),

    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    /// Drops the backtrace candle attaches under RUST_BACKTRACE: messages stay one line.
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => Self::from(*inner),
            e => Self::Candle(e),
        }
    }
}

/// A candle error's message, without the backtrace candle appends under RUST_BACKTRACE.
pub(crate) fn candle_message(e: candle_core::Error) -> String {
    Error::from(e).to_string()
}

impl Error {
    pub(crate) fn config(field: &str, reason: impl Into<String>) -> Self {
        Self::Config { field: field.to_string(), reason: reason.into() }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidArgument(reason.into())
    }
}

impl From<tokenizers::Error> for Error {
    fn from(e: tokenizers::Error) -> Self {
        Self::Tokenizer(e.to_string())
    }
}
