//! granite-rs: IBM Granite decoder LLMs on candle.

pub mod config;
pub mod error;
pub mod generate;
pub mod granite;
pub mod kv_cache;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
mod python;

pub use config::GraniteConfig;
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerateParams, Generation, Generator};
pub use granite::{Granite, Logits};
pub use kv_cache::KvCache;
pub use sampling::SamplingParams;
