//! The Granite decoder: Llama with four scalars (embedding, residual, attention, logits); each
//! layer a mixer and a feed-forward (`layer`).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::config::GraniteConfig;
use crate::error::{Error, Result};
use crate::kernels;
use crate::loading::safetensors::Weights;
use crate::loading::weight::Weight;
use crate::model::attention::Positions;
use crate::model::kv_cache::KvCache;
use crate::model::layer::DecoderLayer;
use crate::model::linear::Linear;
use crate::model::mask::causal_mask;
use crate::model::rope::RotaryEmbedding;

/// How a forward runs beyond its inputs.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Per row, how many pad tokens precede its text (empty: no padding).
    pub left_pad: &'a [usize],
    /// Checked before each layer; once set the forward returns `Error::Cancelled`.
    pub cancel: Option<&'a AtomicBool>,
}

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logits {
    All,
    Last,
}

pub struct Granite {
    /// (vocab, hidden)
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    /// The final RMSNorm's weight.
    norm: Tensor,
    /// Shares `embed_tokens` when the embeddings are tied.
    lm_head: Linear,
    rotary: RotaryEmbedding,
    cfg: GraniteConfig,
    dtype: DType,
    device: Device,
}

impl Granite {
    pub fn load(cfg: &GraniteConfig, w: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.matrix("model.embed_tokens.weight", [vocab, hidden])?;
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(w, cfg, i)).collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None, w.precision())
        } else {
            Linear::load(w, "lm_head", vocab, hidden, false)?
        };
        let rotary = RotaryEmbedding::new(cfg.rope()?, cfg.head_dim(), cfg.max_position_embeddings, dtype, device);
        Ok(Self {
            embed_tokens,
            layers,
            norm: w.get("model.norm.weight", &[hidden])?,
            lm_head,
            rotary,
            cfg: cfg.clone(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &GraniteConfig {
        &self.cfg
    }

    /// Every weight matrix once (a tied lm_head is the embedding): what one decode step reads.
    pub fn matrices(&self) -> Vec<&Weight> {
        let layers = self.layers.iter().flat_map(|l| l.projections().flat_map(Linear::weights));
        let head = if self.cfg.tie_word_embeddings { &[] } else { self.lm_head.weights() };
        std::iter::once(&self.embed_tokens).chain(layers).chain(head).collect()
    }

    /// Parameters: every weight matrix once, the biases and the norms.
    pub fn parameter_count(&self) -> usize {
        let matrices: usize = self.matrices().iter().filter_map(|w| w.dims2().ok()).map(|(n, k)| n * k).sum();
        let per_layer: usize = self.layers.iter().map(DecoderLayer::other_parameters).sum();
        matrices + per_layer + self.norm.elem_count() + self.lm_head.bias_len()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let c = &self.cfg;
        KvCache::new(c.num_hidden_layers, batch, c.num_kv_heads(), c.head_dim(), capacity, self.dtype, &self.device)
    }

    /// ids: (b, t) u32, continuing the sequences in `cache` (or fresh ones without it).
    /// Returns f32 logits (b, t, vocab) for `Logits::All`, (b, 1, vocab) for `Logits::Last`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, which: Logits) -> Result<Tensor> {
        self.forward_with(ids, cache, which, &ForwardOptions::default())
    }

    /// `forward` for left-padded batches, stopping between layers once `cancel` is set.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        which: Logits,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        if self.device.is_cpu() {
            // The whole forward on one of rayon's threads, so that each matmul's parallel loop
            // starts inside the pool rather than waking this thread at its end (measured on the
            // embedded model: decode 115 -> 136 tokens/s on 2 threads, 50 -> 82 on 1).
            rayon::scope(|_| self.forward_on_thread(ids, cache, which, opts))
        } else {
            self.forward_on_thread(ids, cache, which, opts)
        }
    }

    fn forward_on_thread(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        which: Logits,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 {
            return Err(Error::invalid("cannot run the model on an empty sequence"));
        }
        if !opts.left_pad.is_empty() && opts.left_pad.len() != b {
            return Err(Error::invalid(format!("left_pad has {} rows for a batch of {b}", opts.left_pad.len())));
        }
        let start = cache.as_ref().map_or(0, |c| c.len());
        if let Some(c) = cache.as_deref_mut() {
            c.reserve(t)?;
        }
        let (cos, sin) = self.rotary.cos_sin(start, t, opts.left_pad)?;
        let pos = Positions { cos, sin, mask: causal_mask(start, t, opts.left_pad, self.dtype, &self.device)? };
        let x = self.embed_tokens.rows(ids, self.dtype)?.affine(self.cfg.embedding_multiplier(), 0.0)?;
        // Each residual add is fused with the RMSNorm that follows it, the next layer's included.
        let (eps, residual_multiplier) = (self.cfg.rms_norm_eps, self.cfg.residual_multiplier());
        let norms: Vec<&Tensor> = self
            .layers
            .iter()
            .flat_map(|l| [&l.input_layernorm, &l.post_attention_layernorm])
            .chain([&self.norm])
            .collect();
        let (mut x, mut h) = (x.clone(), kernels::rms_norm(&x, norms[0], eps)?);
        for (i, layer) in self.layers.iter().enumerate() {
            // A cancelled forward leaves the cache length as it was: what it wrote is overwritten
            // later. Its queued GPU work finishes before the cache is handed on.
            if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                self.device.synchronize()?;
                return Err(Error::Cancelled);
            }
            let mixed = layer.mixer.forward(&h, &pos, cache.as_deref_mut().map(|c| (c, i)))?;
            (x, h) = kernels::add_rms_norm(&x, &mixed, residual_multiplier, norms[2 * i + 1], eps)?;
            let fed = layer.feed_forward.forward(&h)?;
            (x, h) = kernels::add_rms_norm(&x, &fed, residual_multiplier, norms[2 * i + 2], eps)?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        if which == Logits::Last {
            h = h.narrow(1, t - 1, 1)?;
        }
        let logits = self.lm_head.forward(&h)?;
        Ok((logits / self.cfg.logits_scaling())?.to_dtype(DType::F32)?)
    }
}
