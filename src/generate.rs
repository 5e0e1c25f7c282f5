//! A loaded model directory (`Generator`) and the parameters of one generation.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::{GenerationDefaults, GraniteConfig};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::granite::{Granite, Logits};
use crate::sampling::{check_finite, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::{Quantization, Weights};

/// A loaded model with its tokenizer; shared, immutable, safe to use from many threads.
pub struct Generator {
    model: Granite,
    tokenizer: Arc<Tokenizer>,
    defaults: GenerationDefaults,
    chat_template: Option<ChatTemplate>,
    /// From config.json and generation_config.json together.
    eos_token_ids: Vec<u32>,
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string or stop token id.
    Stop,
    /// max_new_tokens or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eos => "eos",
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateParams {
    /// None: generation_config.json's max_new_tokens, else 256.
    pub max_new_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Record each new token's log-probability and this many most likely alternatives.
    pub logprobs: Option<usize>,
}

/// How a model is loaded, beyond its path and device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadOptions {
    /// Compute dtype; None: float32 on the CPU, bfloat16 on a GPU.
    pub dtype: Option<DType>,
    pub quantization: Quantization,
    /// CPU threads; None: one per physical core. Process-wide, fixed by the first load.
    pub num_threads: Option<usize>,
}

/// Fixes the CPU thread count for the process and returns it. candle sizes its thread pools
/// once, from RAYON_NUM_THREADS, and without the variable rereads /proc and sysfs on every
/// matmul (measured as 7x a small model's decode step), so it is set once here.
fn pin_thread_count(requested: Option<usize>) -> Result<usize> {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    if requested == Some(0) {
        return Err(Error::invalid("num_threads must be at least 1"));
    }
    let threads = *THREADS.get_or_init(|| {
        let threads = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .or(requested)
            .unwrap_or_else(candle_core::utils::get_num_threads);
        // std's environment lock orders this against candle's own reads of the variable.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        threads
    });
    match requested {
        Some(n) if n != threads => Err(Error::invalid(format!(
            "num_threads={n}, but this process already runs on {threads} threads (set by the first model \
             loaded, or RAYON_NUM_THREADS); the thread count cannot change once set"
        ))),
        _ => Ok(threads),
    }
}

/// The CPU threads this process computes on.
pub fn num_threads() -> usize {
    pin_thread_count(None).unwrap_or(1)
}

impl Generator {
    /// Loads an HF model directory (config.json, generation_config.json (optional),
    /// tokenizer.json, model.safetensors or its shards) or a `.gguf` file. `dtype` None: float32
    /// on the CPU, bfloat16 on a GPU.
    pub fn load(path: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        Self::load_with(path, device, &LoadOptions { dtype, ..Default::default() })
    }

    /// `load`, with quantization and the thread count.
    pub fn load_with(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        pin_thread_count(opts.num_threads)?;
        // bfloat16 on a GPU (its tensor cores), float32 on the CPU (our kernels compute in f32).
        let dtype = opts.dtype.unwrap_or(if device.is_cpu() { DType::F32 } else { DType::BF16 });
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            return Self::load_gguf(path, device, dtype, opts.quantization);
        }
        if !path.is_dir() {
            return Err(Error::NotFound { what: "model directory or .gguf file", path: path.into() });
        }
        let config = GraniteConfig::from_file(&path.join("config.json"))?;
        let defaults = GenerationDefaults::from_dir(path)?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let chat_template = ChatTemplate::from_dir(path)?;
        let weights = Weights::from_dir(path, dtype, device)?.with_quantization(opts.quantization);
        Self::assemble(config, weights, tokenizer, defaults, chat_template, dtype, device)
    }

    /// A GGUF file: config, tokenizer and chat template from its metadata.
    fn load_gguf(path: &Path, device: &Device, dtype: DType, quantization: Quantization) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        let config = gguf.config()?;
        let tokenizer = crate::gguf_tokenizer::tokenizer_from_gguf(gguf.content())?;
        let chat_template = gguf.chat_template()?;
        let weights = Weights::from_tensors(gguf.weights(&config)?, dtype, device).with_quantization(quantization);
        Self::assemble(config, weights, tokenizer, GenerationDefaults::default(), chat_template, dtype, device)
    }

    fn assemble(
        config: GraniteConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults,
        chat_template: Option<ChatTemplate>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model = Granite::load(&config, &weights, dtype, device)?;
        let mut eos_token_ids = config.eos_token_ids();
        for id in defaults.eos_token_id.iter().flat_map(|e| e.to_vec()) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self { model, tokenizer: Arc::new(tokenizer), defaults, chat_template, eos_token_ids })
    }

    pub fn model(&self) -> &Granite {
        &self.model
    }

    pub fn config(&self) -> &GraniteConfig {
        self.model.config()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// From chat_template.jinja or tokenizer_config.json, if the directory has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    pub(crate) fn shared_tokenizer(&self) -> Arc<Tokenizer> {
        self.tokenizer.clone()
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
    }

    /// Why a sequence ends after `token`, having `generated` new tokens and `total` in all.
    pub(crate) fn finish_reason(
        &self,
        params: &GenerateParams,
        max_new_tokens: usize,
        token: u32,
        generated: usize,
        total: usize,
    ) -> Option<FinishReason> {
        if !params.ignore_eos && self.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos)
        } else if params.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= max_new_tokens || total >= self.context_length() {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// max_new_tokens as given, else generation_config.json's, else 256.
    pub(crate) fn max_new_tokens(&self, params: &GenerateParams) -> Result<usize> {
        match params.max_new_tokens.or(self.defaults.max_new_tokens).unwrap_or(256) {
            0 => Err(Error::invalid("max_new_tokens must be at least 1")),
            n => Ok(n),
        }
    }

    /// Checks a prompt before any work: not empty, in the vocabulary, fits the context.
    pub(crate) fn check_prompt(&self, prompt: &[u32]) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty: it must have at least one token"));
        }
        let vocab = self.config().vocab_size;
        if let Some(id) = prompt.iter().find(|id| **id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {id} is out of range for vocab_size {vocab} (does tokenizer.json belong to this model?)"
            )));
        }
        let limit = self.context_length();
        if prompt.len() >= limit {
            return Err(Error::ContextOverflow { prompt: prompt.len(), limit });
        }
        Ok(())
    }

    pub fn context_length(&self) -> usize {
        self.config().context_length()
    }

    /// Checks token ids from a caller against the vocabulary.
    pub fn check_ids(&self, ids: &[i64]) -> Result<Vec<u32>> {
        let vocab = self.config().vocab_size;
        ids.iter()
            .map(|&id| match u32::try_from(id) {
                Ok(id) if (id as usize) < vocab => Ok(id),
                _ => Err(Error::invalid(format!("token id {id} is out of range for vocab_size {vocab}"))),
            })
            .collect()
    }

    /// f32 logits (len, vocab) of one uncached forward over `ids`; NaN or inf is an error.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty"));
        }
        if ids.len() > self.context_length() {
            return Err(Error::ContextOverflow { prompt: ids.len(), limit: self.context_length() });
        }
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        let logits = self.model.forward(&input, None, Logits::All)?.squeeze(0)?;
        check_finite(&logits.flatten_all()?.to_vec1()?, self.model.dtype())?;
        Ok(logits)
    }
}
