//! Grouped-query self-attention with RoPE: the projections over every span's rows at once, the
//! attention of each span over its own KV cache (when it has one).

use candle_core::Tensor;

use crate::config::GraniteConfig;
use crate::error::Result;
use crate::kernels;
use crate::loading::safetensors::Weights;
use crate::model::linear::{Linear, PackedRows};
use crate::model::span::{Positions, SpanRows};

pub(crate) struct Attention {
    /// q, k and v projections stacked: (n_heads + 2 * n_kv_heads) * head_dim rows.
    pub(crate) qkv_proj: Linear,
    pub(crate) o_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// The softmax scale: Granite's attention_multiplier.
    scale: f64,
    /// This layer's keys and values among the pool's layers.
    kv_layer: usize,
}

impl Attention {
    /// `kv_layer`: this layer's place among the pool's layers.
    pub(crate) fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig, kv_layer: usize) -> Result<Self> {
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
            kv_layer,
        })
    }

    /// x: (1, T, hidden), the rows of `spans` one after another -> (1, T, hidden).
    pub(crate) fn forward(&self, x: &Tensor, spans: &[SpanRows], packed: &PackedRows) -> Result<Tensor> {
        let total = x.dim(1)?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = self.qkv_proj.forward_packed(x, packed)?.reshape((1, total, nh + 2 * nkv, hd))?;
        let singles = self.singles(spans);
        let joint = match singles.len() {
            0 | 1 => None,
            n if n == spans.len() => {
                return self.o_proj.forward_packed(&self.attend_singles(&qkv, spans, &singles)?, packed)
            }
            _ => Some(self.attend_singles(&qkv, spans, &singles)?),
        };
        let mut outs = spans
            .iter()
            .enumerate()
            .map(|(i, s)| match (&joint, singles.iter().position(|&j| j == i)) {
                (Some(joint), Some(j)) => Ok(joint.narrow(1, j, 1)?),
                _ => self.attend(
                    &qkv.narrow(1, s.offset, s.len)?,
                    s.as_prompt,
                    &s.pos,
                    &s.slots,
                    s.cache.as_deref().map(|c| c.layer(self.kv_layer)),
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        let out = match outs.len() {
            1 => outs.pop().expect("one span"),
            _ => Tensor::cat(&outs, 1)?,
        };
        self.o_proj.forward_packed(&out, packed)
    }

    /// The spans of one decode row each over the first such span's cache storage, on the CPU:
    /// attended in one op (`attend_singles`), each as `attend` would alone.
    fn singles(&self, spans: &[SpanRows]) -> Vec<usize> {
        let storage = |s: &SpanRows| match s.cache.as_deref() {
            Some(c)
                if s.len == 1 && !s.as_prompt && s.pos.mask.is_none() && c.layer(self.kv_layer).0.device().is_cpu() =>
            {
                Some(c.layer(self.kv_layer).0.id())
            }
            _ => None,
        };
        let Some(first) = spans.iter().find_map(storage) else { return Vec::new() };
        (0..spans.len()).filter(|&i| storage(&spans[i]) == Some(first)).collect()
    }

    /// The attention of the `singles` spans' rows -> (1, singles, n_heads * head_dim).
    fn attend_singles(&self, qkv: &Tensor, spans: &[SpanRows], singles: &[usize]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let qkv = match singles.len() == spans.len() {
            true => qkv.clone(),
            false => {
                let rows: Vec<u32> = singles.iter().map(|&i| spans[i].offset as u32).collect();
                qkv.index_select(&Tensor::new(rows, qkv.device())?, 1)?
            }
        };
        let heads = |start: usize, n: usize| qkv.narrow(2, start, n)?.transpose(1, 2);
        let (q, k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
        let tables = |f: fn(&Positions) -> &Tensor| {
            Tensor::cat(&singles.iter().map(|&i| f(&spans[i].pos)).collect::<Vec<_>>(), 0)
        };
        let (cos, sin) = (tables(|p| &p.cos)?, tables(|p| &p.sin)?);
        let new: Vec<u32> = singles.iter().map(|&i| *spans[i].slots.last().expect("a position")).collect();
        let (k_cache, v_cache) = spans[singles[0]].cache.as_deref().expect("a cache").layer(self.kv_layer);
        // (1, n_heads, rows, head_dim), then as (rows, n_heads, 1, head_dim).
        let q = kernels::rope_write_kv(&q, &k, &v, &cos, &sin, k_cache, v_cache, &new)?;
        let slots: Vec<&[u32]> = singles.iter().map(|&i| spans[i].slots.as_slice()).collect();
        let out = kernels::decode_attention_rows(&q.transpose(0, 2)?, k_cache, v_cache, &slots, self.scale)?;
        Ok(out.reshape((1, singles.len(), nh * hd))?)
    }

    /// One span's attention: qkv (b, t, n_heads + 2 n_kv_heads, head_dim) -> (b, t, n_heads * head_dim);
    /// one query as a prompt's (tiled) if `as_prompt`.
    /// With a cache (this layer's k and v storage), the keys of the span's positions go to the
    /// last t of `slots`, and every key is read from there.
    fn attend(
        &self,
        qkv: &Tensor,
        as_prompt: bool,
        pos: &Positions,
        slots: &[u32],
        cache: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _, _) = qkv.dims4()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        // Views of the projection, (b, heads, t, hd) each: the ops below read them in place.
        let heads = |start: usize, n: usize| qkv.narrow(2, start, n)?.transpose(1, 2);
        let (q, k, v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
        let (q, k, v) = match cache {
            Some((k_cache, v_cache)) => {
                let new = &slots[slots.len() - t..];
                let q = kernels::rope_write_kv(&q, &k, &v, &pos.cos, &pos.sin, k_cache, v_cache, new)?;
                if pos.mask.is_none() && t == 1 && !as_prompt {
                    // One query: attention straight over the cache.
                    let out = kernels::decode_attention(&q, k_cache, v_cache, slots, self.scale)?;
                    return Ok(out.reshape((b, 1, nh * hd))?);
                }
                (q, k_cache.clone(), v_cache.clone())
            }
            None => {
                let rope = |x: &Tensor| candle_nn::rotary_emb::rope(&x.contiguous()?, &pos.cos, &pos.sin);
                (rope(&q)?, rope(&k)?, v.contiguous()?)
            }
        };
        let out = match &pos.mask {
            // On the CPU: causal attention in tiles, with no score matrix.
            None if q.device().is_cpu() => kernels::prefill_attention(&q, &k, &v, slots, self.scale)?,
            mask => {
                let (k, v) = (kernels::gather_slots(&k, slots)?, kernels::gather_slots(&v, slots)?);
                self.attention_by_scores(&q, &k, &v, mask.as_ref())?
            }
        };
        Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }

    /// softmax(scale q kᵀ + mask) v with the scores formed, on GPUs (where the mask is None only
    /// for one query, which sees every key). (b, nh, t, hd).
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
