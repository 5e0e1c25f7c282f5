//! The Granite decoder: Llama with four scalars (embedding, residual, attention, logits); each
//! layer a mixer and a feed-forward (`layer`). One forward runs several sequences packed
//! together: the projections and feed-forwards see every row of every span at once, the mixers
//! each span over its own cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Tensor};

use crate::config::{GraniteConfig, LayerKind};
use crate::error::{Error, Result};
use crate::kernels;
use crate::loading::safetensors::Weights;
use crate::loading::weight::Weight;
use crate::model::kv_cache::KvCache;
use crate::model::kv_pool::KvPool;
use crate::model::layer::DecoderLayer;
use crate::model::linear::{Linear, PackedRows};
use crate::model::mamba::Mamba;
use crate::model::mask::causal_mask;
use crate::model::rope::RotaryEmbedding;
use crate::model::span::{Logits, Positions, Span, SpanRows};
use crate::model::ssm_state::StateShape;

/// How a forward runs beyond its inputs.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Checked before each layer; once set the forward returns `Error::Cancelled`.
    pub cancel: Option<&'a AtomicBool>,
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
    /// Every sequence's KV cache memory (of the attention layers).
    kv_pool: Arc<KvPool>,
    /// One sequence's Mamba2 state, if there are Mamba layers.
    ssm_shape: Option<StateShape>,
    /// Held by the forward that runs; see `forward_spans`.
    turn: Mutex<()>,
    cfg: GraniteConfig,
    dtype: DType,
    device: Device,
}

/// The KV cache budget when none is given: one sequence of the whole context, within 1 to 16 GiB.
fn default_kv_cache_bytes(cfg: &GraniteConfig, attention_layers: usize, dtype: DType) -> usize {
    let per_position = 2 * attention_layers * cfg.num_kv_heads() * cfg.head_dim() * dtype.size_in_bytes();
    per_position.saturating_mul(cfg.context_length()).clamp(1 << 30, 16 << 30)
}

impl Granite {
    /// `kv_cache_bytes`: the budget of every sequence's KV cache together; None: one sequence of
    /// the whole context, within 1 to 16 GiB.
    pub fn load(
        cfg: &GraniteConfig,
        w: &Weights,
        dtype: DType,
        device: &Device,
        kv_cache_bytes: Option<usize>,
    ) -> Result<Self> {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let embed_tokens = w.matrix("model.embed_tokens.weight", [vocab, hidden])?;
        // Each mixer's place among those of its kind: attention in the KV pool, Mamba in the state.
        let (mut attention, mut mamba) = (0, 0);
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let kind = cfg.layer_kind(i)?;
            let seen = if kind == LayerKind::Attention { &mut attention } else { &mut mamba };
            layers.push(DecoderLayer::load(w, cfg, i, kind, *seen)?);
            *seen += 1;
        }
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None, w.precision())
        } else {
            Linear::load(w, "lm_head", vocab, hidden, false)?
        };
        let rope = if cfg.uses_rope()? { Some(cfg.rope()?) } else { None };
        let rotary = RotaryEmbedding::new(rope, cfg.head_dim(), cfg.max_position_embeddings, dtype, device);
        let budget = kv_cache_bytes.unwrap_or_else(|| default_kv_cache_bytes(cfg, attention, dtype));
        let kv_pool = KvPool::new(attention, (cfg.num_kv_heads(), cfg.head_dim()), budget, dtype, device)?;
        let ssm_shape = if mamba > 0 { Some(Mamba::state_shape(cfg, mamba)?) } else { None };
        Ok(Self {
            embed_tokens,
            layers,
            norm: w.get("model.norm.weight", &[hidden])?,
            lm_head,
            rotary,
            kv_pool: Arc::new(kv_pool),
            ssm_shape,
            turn: Mutex::new(()),
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

    /// Parameters one token's forward uses: all but the experts its router does not select.
    pub fn active_parameter_count(&self) -> usize {
        self.parameter_count() - self.layers.iter().map(DecoderLayer::idle_parameters).sum::<usize>()
    }

    /// Whether the rest of a prompt computed apart from its start (cached) gets the bits it gets
    /// computed whole: on the CPU, when every layer's projections give a prompt's rows the same
    /// bits however many rows share a product (the mixers' and norms' arithmetic is per row).
    pub fn prompt_rows_independent(&self) -> bool {
        self.device.is_cpu() && self.layers.iter().all(|l| l.projections().all(Linear::prompt_rows_independent))
    }

    /// How many layers mix with attention (the others with Mamba2).
    pub fn attention_layers(&self) -> usize {
        self.layers.len() - self.ssm_shape.map_or(0, |s| s.layers)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for one sequence, which takes blocks from the pool as it grows.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.kv_pool.clone(), self.ssm_shape)
    }

    pub fn kv_pool(&self) -> &KvPool {
        &self.kv_pool
    }

    /// The sizes of one sequence's Mamba2 state, if there are Mamba layers.
    pub fn ssm_shape(&self) -> Option<StateShape> {
        self.ssm_shape
    }

    /// ids: (1, t) u32, continuing the sequence in `cache` (or a fresh one without it).
    /// Returns f32 logits (1, t, vocab) for `Logits::All`, (1, 1, vocab) for `Logits::Last`.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>, which: Logits) -> Result<Tensor> {
        self.forward_with(ids, cache, which, &ForwardOptions::default())
    }

    /// `forward`, stopping between layers once `cancel` is set.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        which: Logits,
        opts: &ForwardOptions,
    ) -> Result<Tensor> {
        let tokens = match ids.dims2()? {
            (1, _) => ids.flatten_all()?.to_vec1::<u32>()?,
            (b, _) => return Err(Error::invalid(format!("forward takes one sequence, got {b}; run several as spans"))),
        };
        let mut spans = [Span { tokens: &tokens, as_prompt: false, cache, logits: which }];
        let logits = self.forward_spans(&mut spans, opts)?.pop().expect("one span, one result");
        Ok(logits.unsqueeze(0)?)
    }

    /// One forward over several sequences' spans. Returns per span f32 logits (len, vocab) for
    /// `Logits::All`, (1, vocab) for `Logits::Last`. Each span's result is what it gives alone.
    ///
    /// One forward runs at a time; calls from other threads wait their turn here, outside the
    /// thread pool. Every forward writes the pool's buffers, and a forward that held a buffer's
    /// lock while its pool thread took up another forward's work would wait on itself.
    pub fn forward_spans(&self, spans: &mut [Span], opts: &ForwardOptions) -> Result<Vec<Tensor>> {
        let _turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        if self.device.is_cpu() {
            // The whole forward on one of rayon's threads, so that each matmul's parallel loop
            // starts inside the pool rather than waking this thread at its end (measured on the
            // embedded model: decode 115 -> 136 tokens/s on 2 threads, 50 -> 82 on 1).
            rayon::scope(|_| self.forward_on_thread(spans, opts))
        } else {
            self.forward_on_thread(spans, opts)
        }
    }

    fn forward_on_thread(&self, spans: &mut [Span], opts: &ForwardOptions) -> Result<Vec<Tensor>> {
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        let which: Vec<Logits> = spans.iter().map(|s| s.logits).collect();
        let mut ids = Vec::new();
        let mut rows = Vec::with_capacity(spans.len());
        for span in spans.iter_mut() {
            let len = span.tokens.len();
            if len == 0 {
                return Err(Error::invalid("cannot run the model on an empty sequence"));
            }
            let mut cache = span.cache.as_deref_mut();
            let start = cache.as_ref().map_or(0, |c| c.len());
            let slots = match cache.as_deref_mut() {
                Some(c) => {
                    c.reserve(len)?;
                    c.slots(start + len)
                }
                None => (0..len as u32).collect(),
            };
            let (cos, sin) = self.rotary.cos_sin(start, len)?;
            let pos = Positions { cos, sin, mask: causal_mask(start, len, self.dtype, &self.device)? };
            let as_prompt = span.as_prompt;
            rows.push(SpanRows { tokens: span.tokens, as_prompt, offset: ids.len(), len, pos, slots, cache });
            ids.extend_from_slice(span.tokens);
        }
        let packed = PackedRows::of_spans(rows.iter().map(|r| (r.len, r.as_prompt)));
        let ids = Tensor::from_vec(ids, (1, rows.iter().map(|r| r.len).sum::<usize>()), &self.device)?;
        let x = self.embed_tokens.rows(&ids, self.dtype)?.affine(self.cfg.embedding_multiplier(), 0.0)?;
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
            // A cancelled forward leaves the cache lengths as they were: what it wrote is
            // overwritten later. Its queued GPU work finishes before the caches are handed on.
            if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                self.device.synchronize()?;
                return Err(Error::Cancelled);
            }
            let mixed = layer.mixer.forward(&h, &mut rows, &packed)?;
            (x, h) = kernels::add_rms_norm(&x, &mixed, residual_multiplier, norms[2 * i + 1], eps)?;
            let fed = layer.feed_forward.forward(&h, &packed)?;
            (x, h) = kernels::add_rms_norm(&x, &fed, residual_multiplier, norms[2 * i + 2], eps)?;
        }
        for r in &mut rows {
            if let Some(c) = r.cache.as_deref_mut() {
                c.append(r.tokens, packed.runs_as_prompt(r.len, r.as_prompt));
            }
        }
        // The rows that get logits: each span's last, or all of them.
        let picked: Vec<(usize, usize)> = rows
            .iter()
            .zip(&which)
            .map(|(r, w)| match w {
                Logits::All => (r.offset, r.len),
                Logits::Last => (r.offset + r.len - 1, 1),
            })
            .collect();
        if which.contains(&Logits::Last) {
            let index: Vec<u32> = picked.iter().flat_map(|&(at, n)| at as u32..(at + n) as u32).collect();
            h = h.index_select(&Tensor::new(index, &self.device)?, 1)?;
        }
        let logits = self.lm_head.forward_packed(&h, &PackedRows::new(picked.iter().map(|p| p.1)))?;
        let logits = (logits / self.cfg.logits_scaling())?.to_dtype(DType::F32)?.squeeze(0)?;
        let mut at = 0;
        picked
            .iter()
            .map(|&(_, n)| {
                at += n;
                Ok(logits.narrow(0, at - n, n)?)
            })
            .collect()
    }
}
