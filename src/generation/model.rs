//! A loaded model directory (`Generator`) and the parameters of one generation.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use llguidance::toktrie::TokEnv;
use llguidance::ParserFactory;

use crate::config::GraniteConfig;
use crate::error::{Error, Result};
use crate::generation::defaults::GenerationDefaults;
use crate::generation::sampling::check_finite;
use crate::generation::scheduler::{Scheduler, SchedulerStats};
use crate::generation::threads::pin_thread_count;
use crate::loading::gguf::Gguf;
use crate::loading::quantization::{Precision, Quantization};
use crate::loading::safetensors::Weights;
use crate::model::granite::Granite;
use crate::model::kv_pool::PrefixReuse;
use crate::model::span::Logits;
use crate::text::chat::ChatTemplate;
use crate::text::token_env::TokenEnv;
use crate::text::tokenizer::Tokenizer;
use crate::text::tool_calls::{ToolCall, ToolFormat};

/// What a model's own files say about it, for people (`granite-rs info`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelInfo {
    /// "HF model directory" or "GGUF file".
    pub format: &'static str,
    pub architecture: Option<String>,
    pub name: Option<String>,
    /// config.json's torch_dtype, or llama.cpp's name of a GGUF's file type ("Q4_1").
    pub stored_dtype: Option<String>,
    /// The context length the model was trained for, where the file says it apart from config.
    pub trained_context_length: Option<usize>,
}

/// A loaded model with its tokenizer; shared, immutable, safe to use from many threads.
pub struct Generator {
    model: Granite,
    info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    defaults: GenerationDefaults,
    chat_template: Option<ChatTemplate>,
    /// From config.json and generation_config.json together.
    eos_token_ids: Vec<u32>,
    /// Compiles grammars against our tokenizer; made by the first constrained generation.
    grammars: OnceLock<std::result::Result<ParserFactory, String>>,
    /// Runs every generation's forward, started by the first.
    scheduler: OnceLock<std::result::Result<Scheduler, String>>,
}

/// How a model is loaded, beyond its path and device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadOptions {
    /// Compute dtype; None: float32 on the CPU, bfloat16 on a GPU.
    pub dtype: Option<DType>,
    pub quantization: Quantization,
    /// How a prompt's activations enter the CPU matrix products.
    pub precision: Precision,
    /// CPU threads; None: one per physical core. Process-wide, fixed by the first load.
    pub num_threads: Option<usize>,
    /// The KV cache budget of all sequences together (`Granite::load`).
    pub kv_cache_bytes: Option<usize>,
    /// Whether requests reuse the KV blocks of prompt starts computed before (`KvPool`). None:
    /// where the reused blocks give every request the bits it gets alone (`PrefixReuse::Exact`:
    /// attention-only models without experts whose prompt products sum each row alike however
    /// many rows share them, on the CPU); Some(true): every block, in every model but those with
    /// Mamba2 layers (`PrefixReuse::All`); Some(false): never.
    pub prefix_caching: Option<bool>,
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
            return Self::load_gguf(path, device, dtype, opts);
        }
        if !path.is_dir() {
            return Err(Error::NotFound { what: "model directory or .gguf file", path: path.into() });
        }
        let config = GraniteConfig::from_file(&path.join("config.json"))?;
        let defaults = GenerationDefaults::from_dir(path)?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let chat_template = ChatTemplate::from_dir(path)?;
        let weights =
            Weights::from_dir(path, dtype, device)?.with_quantization(opts.quantization).with_precision(opts.precision);
        let info = ModelInfo {
            format: "HF model directory",
            architecture: config.architectures.first().cloned().or_else(|| config.model_type.clone()),
            name: None,
            stored_dtype: config.dtype.clone().or_else(|| config.torch_dtype.clone()),
            trained_context_length: None,
        };
        Self::assemble(config, weights, tokenizer, defaults, chat_template, info, (dtype, device, opts))
    }

    /// A GGUF file: config, tokenizer and chat template from its metadata.
    fn load_gguf(path: &Path, device: &Device, dtype: DType, opts: &LoadOptions) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        let config = gguf.config()?;
        let tokenizer = crate::text::gguf_tokenizer::tokenizer_from_gguf(gguf.content())?;
        let chat_template = gguf.chat_template()?;
        let weights = Weights::from_tensors(gguf.weights(&config)?, dtype, device)
            .with_quantization(opts.quantization)
            .with_precision(opts.precision);
        let (name, stored_dtype) = gguf.describe();
        let info = ModelInfo {
            format: "GGUF file",
            architecture: config.model_type.clone(),
            name,
            stored_dtype,
            trained_context_length: Some(config.max_position_embeddings),
        };
        let defaults = GenerationDefaults::default();
        Self::assemble(config, weights, tokenizer, defaults, chat_template, info, (dtype, device, opts))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        config: GraniteConfig,
        weights: Weights,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults,
        chat_template: Option<ChatTemplate>,
        info: ModelInfo,
        (dtype, device, opts): (DType, &Device, &LoadOptions),
    ) -> Result<Self> {
        let model = Granite::load(&config, &weights, dtype, device, opts.kv_cache_bytes)?;
        // Exact where the rest of a prompt computed apart gets the bits of the whole: not with
        // experts (each takes the decode path by the rows it gets of a span), nor where a
        // prompt's products sum a row by the number of rows (`Granite::prompt_rows_independent`).
        let exact = config.experts()?.is_none() && model.prompt_rows_independent();
        let reuse = match (opts.prefix_caching, model.ssm_shape()) {
            (Some(false), _) | (_, Some(_)) => PrefixReuse::Off,
            (Some(true), None) => PrefixReuse::All,
            (None, None) if exact => PrefixReuse::Exact,
            (None, None) => PrefixReuse::Off,
        };
        model.kv_pool().set_prefix_reuse(reuse);
        let mut eos_token_ids = config.eos_token_ids();
        for id in defaults.eos_token_id.iter().flat_map(|e| e.to_vec()) {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let tokenizer = Arc::new(tokenizer);
        Ok(Self {
            model,
            info,
            tokenizer,
            defaults,
            chat_template,
            eos_token_ids,
            grammars: OnceLock::new(),
            scheduler: OnceLock::new(),
        })
    }

    pub fn model(&self) -> &Granite {
        &self.model
    }

    pub fn config(&self) -> &GraniteConfig {
        self.model.config()
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
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

    /// What compiles a request's grammar: llguidance's factory over this model's token trie, built
    /// once (a vocabulary it cannot read is an `Unsupported` error each time it is asked for).
    pub(crate) fn grammars(&self) -> Result<&ParserFactory> {
        let made = self.grammars.get_or_init(|| {
            let env = TokenEnv::new(self.tokenizer.clone(), self.config().vocab_size, &self.eos_token_ids)
                .map_err(|e| e.to_string())?;
            let env: TokEnv = Arc::new(env);
            let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
            factory.quiet();
            Ok(factory)
        });
        made.as_ref().map_err(|e| Error::Unsupported(e.clone()))
    }

    /// The scheduler every generation runs on (continuous batching), started on first use.
    pub(crate) fn scheduler(self: &Arc<Self>) -> Result<&Scheduler> {
        let started = self.scheduler.get_or_init(|| Scheduler::start(Arc::downgrade(self)).map_err(|e| e.to_string()));
        started.as_ref().map_err(|e| Error::Batch(e.clone()))
    }

    /// What the scheduler is doing and has done (all zero before the first generation).
    pub fn scheduler_stats(&self) -> SchedulerStats {
        self.scheduler.get().and_then(|s| s.as_ref().ok()).map_or_else(SchedulerStats::default, Scheduler::stats)
    }

    /// The tool calls in `new_tokens` (read with special tokens, an end-of-sequence token left
    /// out), written in `format`, and the text outside them.
    pub fn tool_calls(&self, new_tokens: &[u32], format: ToolFormat) -> Result<(String, Vec<ToolCall>)> {
        let ids: Vec<u32> = new_tokens.iter().copied().filter(|t| !self.eos_token_ids.contains(t)).collect();
        Ok(format.parse(&self.tokenizer.decode(&ids, false)?))
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn defaults(&self) -> &GenerationDefaults {
        &self.defaults
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

    /// The longest sequence: the model's positions, or with dynamic RoPE scaling (which rescales
    /// to any length, as transformers does) what the KV cache budget holds.
    pub fn context_length(&self) -> usize {
        if self.config().positions_unbounded() {
            self.model.kv_pool().capacity()
        } else {
            self.config().context_length()
        }
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
