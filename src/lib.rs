//! granite-rs: IBM Granite decoder LLMs on candle.

pub mod batch;
pub mod chat;
pub mod config;
pub mod convert;
pub mod error;
pub mod gemv;
pub mod generate;
pub mod generation;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod granite;
pub mod kv_cache;
pub mod linear;
pub mod mapped;
pub mod ops;
pub mod rope;
pub mod sampling;
pub mod session;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "python")]
mod python;

pub use batch::{generate_batch, BatchOutput};
pub use config::GraniteConfig;
pub use error::{Error, Result};
pub use generate::{FinishReason, GenerateParams, Generator, LoadOptions};
pub use generation::{Generation, Timings, TokenLogprob};
pub use granite::{ForwardOptions, Granite, Logits};
pub use kv_cache::KvCache;
pub use sampling::SamplingParams;
pub use session::Session;
pub use weights::Quantization;
