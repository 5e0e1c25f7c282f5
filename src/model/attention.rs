//! Grouped-query self-attention with RoPE, over the KV cache when there is one.

use candle_core::Tensor;

use crate::config::GraniteConfig;
use crate::error::Result;
use crate::kernels;
use crate::loading::safetensors::Weights;
use crate::model::kv_cache::KvCache;
use crate::model::linear::Linear;

/// What every layer needs to know about the positions of one forward.
pub(crate) struct Positions {
    /// Each (t, head_dim / 2), or per row (b, t, head_dim / 2).
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Additive causal mask, (t, start + t) or per row (b, 1, t, start + t); see `causal_mask`.
    pub(crate) mask: Option<Tensor>,
}

pub(crate) struct Attention {
    /// q, k and v projections stacked: (n_heads + 2 * n_kv_heads) * head_dim rows.
    pub(crate) qkv_proj: Linear,
    pub(crate) o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// The softmax scale: Granite's attention_multiplier.
    scale: f64,
}

impl Attention {
    pub(crate) fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        let (n_heads, n_kv_heads, head_dim) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let proj = |name: &str, heads: usize| (format!("{prefix}.{name}"), heads * head_dim);
        let (q, k, v) = (proj("q_proj", n_heads), proj("k_proj", n_kv_heads), proj("v_proj", n_kv_heads));
        let parts = [(q.0.as_str(), q.1), (k.0.as_str(), k.1), (v.0.as_str(), v.1)];
        Ok(Self {
            qkv_proj: Linear::load_stacked(w, &parts, cfg.hidden_size, cfg.attention_bias)?,
            o_proj: Linear::load(
                w,
                &format!("{prefix}.o_proj"),
                cfg.hidden_size,
                n_heads * head_dim,
                cfg.attention_bias,
            )?,
            n_heads,
            n_kv_heads,
            head_dim,
            scale: cfg.attention_multiplier(),
        })
    }

    /// x: (b, t, hidden) -> (b, t, hidden).
    pub(crate) fn forward(&self, x: &Tensor, pos: &Positions, cache: Option<(&mut KvCache, usize)>) -> Result<Tensor> {
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
                let q = kernels::rope_write_kv(&q, &k, &v, &pos.cos, &pos.sin, k_cache, v_cache, start)?;
                if pos.mask.is_none() && t == 1 {
                    // One unpadded query per row: attention straight over the cache.
                    let out = kernels::decode_attention(&q, k_cache, v_cache, start + 1, self.scale)?;
                    return self.o_proj.forward(&out.reshape((b, 1, nh * hd))?);
                }
                (q, k_cache.narrow(2, 0, start + t)?, v_cache.narrow(2, 0, start + t)?)
            }
            None => {
                let rope = |x: &Tensor| candle_nn::rotary_emb::rope(&x.contiguous()?, &pos.cos, &pos.sin);
                (rope(&q)?, rope(&k)?, v.contiguous()?)
            }
        };
        let out = match &pos.mask {
            // Unpadded on the CPU: causal attention in tiles, with no score matrix.
            None if q.device().is_cpu() => kernels::prefill_attention(&q, &k, &v, k.dim(2)? - t, self.scale)?,
            mask => self.attention_by_scores(&q, &k, &v, mask.as_ref())?,
        };
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out)
    }

    /// softmax(scale q kᵀ + mask) v with the scores formed: padded batches, and GPUs (where the
    /// mask is None only for one unpadded query, which sees every key). (b, nh, t, hd).
    fn attention_by_scores(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let (nkv, len) = (self.n_kv_heads, k.dim(2)?);
        // GQA without copying K/V: the n_rep query heads of one kv head become rows of one matrix.
        let n_rep = nh / nkv;
        let q = (q * self.scale)?.reshape((b, nkv, n_rep * t, hd))?;
        let scores = q.matmul(&k.t()?)?; // (b, nkv, n_rep t, len)
        let scores = match mask {
            Some(m) => scores.reshape((b, nh, t, len))?.broadcast_add(m)?.reshape((b, nkv, n_rep * t, len))?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(v)?.reshape((b, nh, t, hd))?) // (b, nkv, n_rep t, hd) as (b, nh, t, hd)
    }
}
