//! The Granite decoder: Llama with four scalars (embedding, residual, attention, logits).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Activation, GraniteConfig};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::linear::{Linear, Weight};
use crate::ops;
use crate::rope::RotaryEmbedding;
use crate::weights::Weights;

/// A linear layer from `{prefix}.weight` (out, in) and, when present, `{prefix}.bias` (out,).
fn linear(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.matrix(&format!("{prefix}.weight"), [out_dim, in_dim])?;
    let bias = bias.then(|| w.get(&format!("{prefix}.bias"), &[out_dim])).transpose()?;
    Ok(Linear::new(weight, bias))
}

/// Several HF projections that read the same input, stacked into one matmul.
fn fused_linear(w: &Weights, prefixes: &[(&str, usize)], in_dim: usize, bias: bool) -> Result<Linear> {
    let parts = prefixes.iter().map(|(p, out_dim)| linear(w, p, *out_dim, in_dim, bias)).collect::<Result<Vec<_>>>()?;
    Linear::stack(parts)
}

/// What every layer needs to know about the positions of one forward.
struct Positions {
    /// Each (t, head_dim / 2), or per row (b, t, head_dim / 2).
    cos: Tensor,
    sin: Tensor,
    /// Additive causal mask, (t, start + t) or per row (b, 1, t, start + t); see `causal_mask`.
    mask: Option<Tensor>,
}

struct Attention {
    /// q, k and v projections stacked: (n_heads + 2 * n_kv_heads) * head_dim rows.
    qkv_proj: Linear,
    o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// The softmax scale: Granite's attention_multiplier.
    scale: f64,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        let (n_heads, n_kv_heads, head_dim) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let proj = |name: &str, heads: usize| (format!("{prefix}.{name}"), heads * head_dim);
        let (q, k, v) = (proj("q_proj", n_heads), proj("k_proj", n_kv_heads), proj("v_proj", n_kv_heads));
        let parts = [(q.0.as_str(), q.1), (k.0.as_str(), k.1), (v.0.as_str(), v.1)];
        Ok(Self {
            qkv_proj: fused_linear(w, &parts, cfg.hidden_size, cfg.attention_bias)?,
            o_proj: linear(w, &format!("{prefix}.o_proj"), cfg.hidden_size, n_heads * head_dim, cfg.attention_bias)?,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: cfg.attention_multiplier(),
        })
    }

    /// x: (b, t, hidden) -> (b, t, hidden).
    fn forward(&self, x: &Tensor, pos: &Positions, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Views of the projection, (b, heads, t, hd) each: the ops below read them in place.
        let qkv = self.qkv_proj.forward(x)?.reshape((b, t, nh + 2 * nkv, hd))?;
        let heads = |start: usize, n: usize| qkv.narrow(2, start, n)?.transpose(1, 2);
        let (q, k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
        let (q, k, v) = match cache {
            Some((cache, layer)) => {
                let start = cache.len();
                let (k_cache, v_cache) = cache.layer(layer);
                let q = ops::rope_write_kv(&q, &k, &v, &pos.cos, &pos.sin, k_cache, v_cache, start)?;
                if pos.mask.is_none() && t == 1 {
                    // One unpadded query per row: attention straight over the cache.
                    let out = ops::decode_attention(&q, k_cache, v_cache, start + 1, self.scale)?;
                    return self.o_proj.forward(&out.reshape((b, 1, nh * hd))?);
                }
                (q, k_cache.narrow(2, 0, start + t)?, v_cache.narrow(2, 0, start + t)?)
            }
            None => {
                let rope = |x: &Tensor| candle_nn::rotary_emb::rope(&x.contiguous()?, &pos.cos, &pos.sin);
                (rope(&q)?, rope(&k)?, v.contiguous()?)
            }
        };
        let len = k.dim(2)?;
        // GQA without copying K/V: the n_rep query heads of one kv head become rows of one matrix.
        let n_rep = nh / nkv;
        let q = (q * self.scale)?.reshape((b, nkv, n_rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?; // (b, nkv, n_rep t, len)
        let probs = match &pos.mask {
            Some(m) => {
                let scores = scores.reshape((b, nh, t, len))?.broadcast_add(m)?.reshape((b, nkv, n_rep * t, len))?;
                candle_nn::ops::softmax_last_dim(&scores)?
            }
            None if scores.device().is_cpu() => {
                ops::causal_softmax_(&scores, len - t, t)?;
                scores
            }
            // Elsewhere the mask is None only for one unpadded query, which sees every key.
            None => candle_nn::ops::softmax_last_dim(&scores)?,
        };
        let out = probs.matmul(&v)?; // (b, nkv, n_rep t, hd)
        let out = out.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

struct Mlp {
    /// gate_proj and up_proj stacked: 2 * intermediate_size rows.
    gate_up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        let (gate, up) = (format!("{prefix}.gate_proj"), format!("{prefix}.up_proj"));
        let parts = [(gate.as_str(), cfg.intermediate_size), (up.as_str(), cfg.intermediate_size)];
        Ok(Self {
            gate_up_proj: fused_linear(w, &parts, cfg.hidden_size, cfg.mlp_bias)?,
            down_proj: linear(w, &format!("{prefix}.down_proj"), cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)?,
            act: cfg.activation()?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?; // (b, t, 2 intermediate)
        let hidden = match self.act {
            Activation::Silu => ops::swiglu(&gate_up)?,
            act => {
                let halves = gate_up.chunk(2, D::Minus1)?;
                let gate = match act {
                    Activation::Gelu => halves[0].gelu_erf()?,
                    Activation::GeluTanh => halves[0].gelu()?,
                    _ => halves[0].relu()?,
                };
                (gate * &halves[1])?
            }
        };
        self.down_proj.forward(&hidden)
    }
}

struct DecoderLayer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        let norm = |name: &str| w.get(&format!("{prefix}.{name}.weight"), &[cfg.hidden_size]);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(w, &format!("{prefix}.self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(w, &format!("{prefix}.mlp"), cfg)?,
        })
    }
}

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
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(w, &format!("model.layers.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            linear(w, "lm_head", vocab, hidden, false)?
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
        let layers = self.layers.iter().flat_map(|l| {
            [&l.self_attn.qkv_proj, &l.self_attn.o_proj, &l.mlp.gate_up_proj, &l.mlp.down_proj]
                .into_iter()
                .flat_map(|p| p.weights())
        });
        let head = if self.cfg.tie_word_embeddings { &[] } else { self.lm_head.weights() };
        std::iter::once(&self.embed_tokens).chain(layers).chain(head).collect()
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

    /// Additive causal mask: query i sees keys 0..=start + i, less the pad keys of its row (a pad
    /// query sees itself, to keep its softmax finite). (t, start + t) without padding, else
    /// (b, 1, t, start + t). None without padding for one query, or on the CPU, where
    /// `ops::causal_softmax_` masks as it goes.
    fn causal_mask(&self, start: usize, t: usize, left_pad: &[usize]) -> Result<Option<Tensor>> {
        let padded = left_pad.iter().any(|p| *p > 0);
        if !padded && (t == 1 || self.device.is_cpu()) {
            return Ok(None);
        }
        let rows: &[usize] = if padded { left_pad } else { &[0] };
        let len = start + t;
        let mask: Vec<f32> = rows
            .iter()
            .flat_map(|&pad| (0..t).flat_map(move |i| (0..len).map(move |j| (pad, start + i, j))))
            .map(|(pad, q, j)| if j <= q && (j >= pad || j == q) { 0.0 } else { f32::NEG_INFINITY })
            .collect();
        let mask = Tensor::from_vec(mask, (rows.len(), 1, t, len), &self.device)?;
        let mask = if padded { mask } else { mask.squeeze(0)?.squeeze(0)? };
        Ok(Some(mask.to_dtype(self.dtype)?))
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
        let pos = Positions { cos, sin, mask: self.causal_mask(start, t, opts.left_pad)? };
        let x = self.embed_tokens.rows(ids, self.dtype)?.affine(self.cfg.embedding_multiplier(), 0.0)?;
        // Each residual add is fused with the RMSNorm that follows it, the next layer's included.
        let (eps, residual_multiplier) = (self.cfg.rms_norm_eps, self.cfg.residual_multiplier());
        let norms: Vec<&Tensor> = self
            .layers
            .iter()
            .flat_map(|l| [&l.input_layernorm, &l.post_attention_layernorm])
            .chain([&self.norm])
            .collect();
        let (mut x, mut h) = (x.clone(), ops::rms_norm(&x, norms[0], eps)?);
        for (i, layer) in self.layers.iter().enumerate() {
            // A cancelled forward leaves the cache length as it was: what it wrote is overwritten later.
            if opts.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Err(Error::Cancelled);
            }
            let attn = layer.self_attn.forward(&h, &pos, cache.as_deref_mut().map(|c| (c, i)))?;
            (x, h) = ops::add_rms_norm(&x, &attn, residual_multiplier, norms[2 * i + 1], eps)?;
            let mlp = layer.mlp.forward(&h)?;
            (x, h) = ops::add_rms_norm(&x, &mlp, residual_multiplier, norms[2 * i + 2], eps)?;
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
