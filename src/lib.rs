//! granite-rs: IBM Granite decoder LLMs on candle.
//!
//! The parts, and which may use which, are in ARCHITECTURE.md: `config` (config.json), `text`
//! (tokenizers, chat templates), `kernels` (CPU and CUDA ops: leaves), `loading` (safetensors,
//! GGUF, mapped weights), `model` (the forward), `generation` (sampling, sessions, batches, the
//! loaded model), and `python` (the PyO3 layer).

pub mod config;
pub mod error;
pub mod generation;
pub mod kernels;
pub mod loading;
pub mod model;
pub mod text;

#[cfg(feature = "python")]
mod python;

pub use config::GraniteConfig;
pub use error::{Error, Result};
pub use generation::batch::{generate_batch, BatchOutput};
pub use generation::defaults::GenerationDefaults;
pub use generation::model::{Generator, LoadOptions, ModelInfo};
pub use generation::params::{GenerateParams, SamplingParams};
pub use generation::request::{Request, Timings, TokenLogprob};
pub use generation::scheduler::{SchedulerStats, PREFILL_CHUNK};
pub use generation::sequence::Sequence;
pub use generation::session::Session;
pub use generation::stopping::FinishReason;
pub use generation::threads::num_threads;
pub use loading::quantization::Quantization;
pub use model::granite::{ForwardOptions, Granite};
pub use model::kv_cache::KvCache;
pub use model::span::{Logits, Span};
