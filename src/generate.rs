//! Loading a model directory and the decode loop: prefill, one token per step, stop criteria.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::config::{GenerationDefaults, GraniteConfig};
use crate::error::{Error, Result};
use crate::granite::{Granite, Logits};
use crate::kv_cache::KvCache;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StopStrings, TextStream, Tokenizer};
use crate::weights::Weights;

/// A loaded model with its tokenizer; shared, immutable, safe to use from many threads.
pub struct Generator {
    model: Granite,
    tokenizer: Arc<Tokenizer>,
    defaults: GenerationDefaults,
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
}

/// candle 0.11 looks up its thread count on every CPU matmul and, unless RAYON_NUM_THREADS is
/// set, reads /proc and sysfs each time: measured here as 7x the whole decode step of a small
/// model. Setting the variable once, to the value candle would compute, makes the lookup cheap.
fn pin_thread_count() {
    static PIN: std::sync::Once = std::sync::Once::new();
    PIN.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let threads = candle_core::utils::get_num_threads();
            // std's environment lock orders this against candle's own reads of the variable.
            std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        }
    });
}

impl Generator {
    /// Loads an HF model directory: config.json, generation_config.json (optional),
    /// tokenizer.json and model.safetensors or its shards. `dtype` None: float32.
    pub fn load(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound { what: "model directory", path: dir.into() });
        }
        pin_thread_count();
        let config = GraniteConfig::from_file(&dir.join("config.json"))?;
        let defaults = GenerationDefaults::from_dir(dir)?;
        let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
        let dtype = dtype.unwrap_or(DType::F32);
        let weights = Weights::from_dir(dir, dtype, device)?;
        let model = Granite::load(&config, &weights, dtype, device)?;
        let mut eos_token_ids = config.eos_token_ids();
        for id in defaults.eos_token_id.iter().flat_map(|e| e.to_vec()) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        Ok(Self { model, tokenizer: Arc::new(tokenizer), defaults, eos_token_ids })
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

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
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

    /// f32 logits (len, vocab) of one uncached forward over `ids`.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(Error::invalid("ids is empty"));
        }
        if ids.len() > self.context_length() {
            return Err(Error::ContextOverflow { prompt: ids.len(), limit: self.context_length() });
        }
        let input = Tensor::new(ids, self.model.device())?.unsqueeze(0)?;
        Ok(self.model.forward(&input, None, Logits::All)?.squeeze(0)?)
    }
}

/// One generation in progress: call `next_chunk` (text) or `next_token` (ids) until None.
pub struct Generation {
    generator: Arc<Generator>,
    cache: KvCache,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// The tokens to feed to the next forward.
    pending: Vec<u32>,
    max_new_tokens: usize,
    sampler: Sampler,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    text: TextStream,
    stops: StopStrings,
    /// Certain text not yet handed out.
    ready: String,
    finish: Option<FinishReason>,
    text_done: bool,
}

impl Generation {
    pub fn new(generator: Arc<Generator>, prompt: Vec<u32>, params: GenerateParams) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty: it must have at least one token"));
        }
        let vocab = generator.config().vocab_size;
        if let Some(id) = prompt.iter().find(|id| **id as usize >= vocab) {
            return Err(Error::invalid(format!(
                "token id {id} is out of range for vocab_size {vocab} (does tokenizer.json belong to this model?)"
            )));
        }
        let limit = generator.context_length();
        if prompt.len() >= limit {
            return Err(Error::ContextOverflow { prompt: prompt.len(), limit });
        }
        let max_new_tokens = params.max_new_tokens.or(generator.defaults.max_new_tokens).unwrap_or(256);
        if max_new_tokens == 0 {
            return Err(Error::invalid("max_new_tokens must be at least 1"));
        }
        if params.stop.iter().any(String::is_empty) {
            return Err(Error::invalid("stop strings must not be empty"));
        }
        // The cache grows by doubling past this, so a huge max_new_tokens costs nothing up front.
        let capacity = (prompt.len() + max_new_tokens.min(1024)).min(limit);
        let cache = generator.model.new_cache(1, capacity)?;
        Ok(Self {
            cache,
            prompt_len: prompt.len(),
            pending: prompt.clone(),
            tokens: prompt,
            max_new_tokens,
            sampler: Sampler::new(params.sampling)?,
            stop_token_ids: params.stop_token_ids,
            ignore_eos: params.ignore_eos,
            text: TextStream::new(generator.tokenizer.clone()),
            stops: StopStrings::new(params.stop),
            ready: String::new(),
            finish: None,
            text_done: false,
            generator,
        })
    }

    pub fn new_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Runs one forward and picks a token; None once finished.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        let model = &self.generator.model;
        let input = Tensor::new(self.pending.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward(&input, Some(&mut self.cache), Logits::Last)?;
        let mut logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let token = self.sampler.sample(&mut logits, &self.tokens)?;
        self.tokens.push(token);
        self.pending = vec![token];
        let generated = self.tokens.len() - self.prompt_len;
        self.finish = if !self.ignore_eos && self.generator.eos_token_ids.contains(&token) {
            Some(FinishReason::Eos)
        } else if self.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens || self.tokens.len() >= self.generator.context_length() {
            Some(FinishReason::Length)
        } else {
            None
        };
        Ok(Some(token))
    }

    /// The next piece of certain text; None once everything has been handed out.
    pub fn next_chunk(&mut self) -> Result<Option<String>> {
        while self.ready.is_empty() && !self.text_done {
            let Some(token) = self.next_token()? else { break };
            let ended_on_token = matches!(self.finish, Some(FinishReason::Eos | FinishReason::Stop));
            if !ended_on_token {
                if let Some(text) = self.text.push(token)? {
                    self.add_text(&text);
                }
            }
            if self.finish.is_some() && !self.text_done {
                if let Some(rest) = self.text.finish()? {
                    self.add_text(&rest);
                }
                if !self.text_done {
                    self.ready.push_str(&self.stops.finish());
                    self.text_done = true;
                }
            }
        }
        Ok((!self.ready.is_empty()).then(|| std::mem::take(&mut self.ready)))
    }

    fn add_text(&mut self, text: &str) {
        if self.text_done {
            return;
        }
        let (certain, stopped) = self.stops.push(text);
        self.ready.push_str(&certain);
        if stopped {
            self.finish = Some(FinishReason::Stop);
            self.text_done = true;
        }
    }

    /// Runs to the end; returns all the new text.
    pub fn run(&mut self) -> Result<String> {
        let mut text = String::new();
        while let Some(chunk) = self.next_chunk()? {
            text.push_str(&chunk);
        }
        Ok(text)
    }
}
