//! The op API: fused decoder ops as candle ops. RMSNorm with the residual add, RoPE with the
//! KV-cache write, single-query attention over the cache, tiled causal attention of a prompt
//! (CPU only), SwiGLU. Each runs on the CPU (f32, f16, bf16; computed in f32, rows in parallel
//! when there is enough work; `cpu/`) and, with the `cuda` feature, as one of our kernels (`cuda/`). `cpu/` also holds the weight
//! formats and the matrix products (`gemv`, `gemm`) that `model::linear` runs projections on.
//!
//! Kernels are leaves: nothing here imports model, generation or Python code.
//!
//! `greedy` picks a token on the device: candle's `argmax` there does not return the first of
//! equal maxima, which exact ties in bf16 logits make matter.

pub mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dtype;
mod shapes;

use candle_core::{bail, DType, Result, Tensor, D};

use cpu::attention::{DecodeAttention, RowsAttention};
use cpu::greedy::Greedy;
use cpu::norm::RmsNorm;
use cpu::prefill::PrefillAttention;
use cpu::rope::{CacheWrite, Rope};
use cpu::swiglu::Swiglu;

/// new_residual = residual + scale * branch; normed = rmsnorm(new_residual) * weight.
/// residual and branch (..., hidden), contiguous; weight (hidden,). Both results have residual's
/// shape (views of one buffer); new_residual is rounded to the dtype before it is normalized.
pub fn add_rms_norm(
    residual: &Tensor,
    branch: &Tensor,
    scale: f64,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if residual.shape() != branch.shape() {
        bail!("add_rms_norm: residual {:?} and branch {:?} differ", residual.shape(), branch.shape());
    }
    check_norm(residual, weight)?;
    let both = residual.apply_op3_no_bwd(branch, weight, &RmsNorm { eps: eps as f32, scale: Some(scale as f32) })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// rmsnorm(x) * weight over the last dim; x contiguous, weight (hidden,).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm(x, weight)?;
    x.apply_op2_no_bwd(weight, &RmsNorm { eps: eps as f32, scale: None })
}

/// Rotate-half RoPE on q and k (as `candle_nn::rotary_emb::rope`), the rotated k and v of new
/// position i written into the caches at slot `slots[i]` (dim 2). Returns the rotated q,
/// (b, n_heads, t, head_dim) contiguous.
///
/// q (b, n_heads, t, head_dim), k and v (b, n_kv, t, head_dim): any strides with the last one 1,
/// so views of the qkv projection need no copy. cos, sin: (t_cs, head_dim / 2) or per row
/// (b, t_cs, head_dim / 2), t_cs >= t (the first t rows are used), contiguous. Caches
/// (b, n_kv, slots, head_dim), contiguous; `slots` has t distinct entries below their count. All
/// of one dtype and device.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &[u32],
) -> Result<Tensor> {
    let (b, _, t, d) = q.dims4()?;
    let bad_q = q.stride()[3] != 1 || d % 2 != 0;
    if bad_q || k.dims4()? != v.dims4()? || k.dim(0)? != b || k.dim(2)? != t || k.dim(3)? != d {
        bail!("rope_write_kv: q {:?}, k {:?}, v {:?} do not match", q.shape(), k.shape(), v.shape());
    }
    check_tables(cos, sin, b, t, d)?;
    check_cache(k_cache, k, slots)?;
    check_cache(v_cache, v, slots)?;
    k_cache.inplace_op2(k, &CacheWrite { tables: Some((cos, sin)), slots })?;
    v_cache.inplace_op2(v, &CacheWrite { tables: None, slots })?;
    q.apply_op3_no_bwd(cos, sin, &Rope)
}

/// Attention of one query per (row, head) over the cached positions 0..slots.len(), position p
/// at slot `slots[p]` of the caches (dim 2), GQA (n_heads a multiple of n_kv), softmax(scale q
/// k^T) v in f32 without a mask. q (b, n_heads, 1, head_dim), caches (b, n_kv, cache slots,
/// head_dim), each with any strides but the last 1; head_dim <= 256. Returns (b, n_heads, 1,
/// head_dim) contiguous, so `.reshape((b, 1, n_heads * head_dim))` is free.
pub fn decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slots: &[u32], scale: f64) -> Result<Tensor> {
    check_decode(q, k_cache, v_cache, q.dim(0)?, &[slots])?;
    if q.device().is_cpu() {
        return q.apply_op3_no_bwd(k_cache, v_cache, &DecodeAttention { slots, scale: scale as f32 });
    }
    // Our CUDA kernel reads positions in order.
    let (k, v) = (gather_slots(k_cache, slots)?, gather_slots(v_cache, slots)?);
    let in_order: Vec<u32> = (0..slots.len() as u32).collect();
    q.apply_op3_no_bwd(&k, &v, &DecodeAttention { slots: &in_order, scale: scale as f32 })
}

/// `decode_attention` of rows that each attend to their own positions of one cache, on the CPU:
/// q (n, n_heads, 1, head_dim), caches (1, n_kv, cache slots, head_dim); row i reads positions
/// 0..slots[i].len() at slots `slots[i]`.
pub fn decode_attention_rows(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, slots: &[&[u32]], scale: f64) -> Result<Tensor> {
    if q.dim(0)? != slots.len() || !q.device().is_cpu() {
        bail!("decode_attention_rows: q {:?} on {:?} for {} rows of slots (the CPU only)", q.shape(), q.device(), slots.len());
    }
    check_decode(q, k_cache, v_cache, 1, slots)?;
    q.apply_op3_no_bwd(k_cache, v_cache, &RowsAttention { slots, scale: scale as f32 })
}

/// The shapes `decode_attention` takes, with caches of `cache_rows` batch rows.
fn check_decode(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, cache_rows: usize, slots: &[&[u32]]) -> Result<()> {
    let (_, nh, t, d) = q.dims4()?;
    let (kb, nkv, cap, kd) = k_cache.dims4()?;
    if t != 1 || kb != cache_rows || kd != d || v_cache.dims4()? != (kb, nkv, cap, kd) || nkv == 0 || nh % nkv != 0 {
        bail!("decode_attention: q {:?}, caches {:?} {:?}", q.shape(), k_cache.shape(), v_cache.shape());
    }
    for slots in slots {
        if slots.is_empty() || slots.iter().any(|&s| s as usize >= cap) || d > 256 {
            bail!("decode_attention: {} positions in {cap} slots, head_dim {d} (at most 256)", slots.len());
        }
    }
    for (name, x) in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] {
        if x.stride()[3] != 1 {
            bail!("decode_attention: {name} needs a last stride of 1");
        }
    }
    Ok(())
}

/// Causal attention of t queries, the last t of the key positions 0..slots.len(), on the CPU,
/// in tiles (no score matrix is formed): query i sees keys 0..=slots.len() - t + i, key position
/// p at slot `slots[p]` of k and v (dim 2), softmax(scale q k^T) v in f32. q (b, n_heads, t,
/// head_dim), k and v (b, n_kv, slots, head_dim), each with any strides but the last 1, n_heads
/// a multiple of n_kv. Returns (b, n_heads, t, head_dim) contiguous.
pub fn prefill_attention(q: &Tensor, k: &Tensor, v: &Tensor, slots: &[u32], scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, cap, kd) = k.dims4()?;
    let bad = t == 0 || kb != b || kd != d || nkv == 0 || nh % nkv != 0 || slots.len() < t;
    if bad || v.dims4()? != (kb, nkv, cap, kd) || slots.iter().any(|&s| s as usize >= cap) {
        bail!("prefill_attention: q {:?}, k {:?}, v {:?}, {} key positions", q.shape(), k.shape(), v.shape(), slots.len());
    }
    if [q, k, v].iter().any(|x| x.stride()[3] != 1 || !x.device().is_cpu()) {
        bail!("prefill_attention: q, k and v need a last stride of 1, on the CPU");
    }
    q.apply_op3_no_bwd(k, v, &PrefillAttention { slots, scale: scale as f32 })
}

/// cache (b, h, cache slots, d) at `slots` along dim 2, in their order: (b, h, slots.len(), d), a
/// view when the slots are 0, 1, 2, ..., else a copy.
pub fn gather_slots(cache: &Tensor, slots: &[u32]) -> Result<Tensor> {
    if slots.iter().enumerate().all(|(p, &s)| s as usize == p) {
        return cache.narrow(2, 0, slots.len());
    }
    cache.index_select(&Tensor::new(slots, cache.device())?, 2)
}

/// Greedy decoding's pick from f32 logits (vocab,) on any device: the first index of the largest
/// value (as transformers' argmax), and whether every value is finite, in one transfer to the host.
pub fn greedy(logits: &Tensor) -> Result<(u32, bool)> {
    if logits.rank() != 1 || logits.dtype() != DType::F32 {
        bail!("greedy: f32 logits (vocab,) expected, got {:?} {:?}", logits.dtype(), logits.shape());
    }
    match logits.contiguous()?.apply_op1_no_bwd(&Greedy)?.to_vec1::<u32>()?[..] {
        [token, finite] => Ok((token, finite == 1)),
        _ => bail!("greedy: expected two results"),
    }
}

/// silu(gate) * up for gate_up (..., 2 * n), gate the first half; contiguous.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.dim(D::Minus1)? % 2 != 0 {
        bail!("swiglu: odd last dim in {:?}", gate_up.shape());
    }
    gate_up.apply_op1_no_bwd(&Swiglu)
}

fn check_norm(x: &Tensor, weight: &Tensor) -> Result<()> {
    if weight.dims() != [x.dim(D::Minus1)?] {
        bail!("rms_norm: weight {:?} for input {:?}", weight.shape(), x.shape());
    }
    Ok(())
}

fn check_tables(cos: &Tensor, sin: &Tensor, b: usize, t: usize, d: usize) -> Result<()> {
    let ok = match *cos.dims() {
        [t_cs, half] => t_cs >= t && half * 2 == d,
        [cb, t_cs, half] => cb == b && t_cs >= t && half * 2 == d,
        _ => false,
    };
    if !ok || cos.shape() != sin.shape() || !cos.is_contiguous() || !sin.is_contiguous() {
        bail!("rope: cos {:?} and sin {:?} for b {b}, t {t}, head_dim {d}", cos.shape(), sin.shape());
    }
    Ok(())
}

/// Whether x (b, h, t, d) can be written into `cache` (b, h, cache slots, d) at `slots`.
fn check_cache(cache: &Tensor, x: &Tensor, slots: &[u32]) -> Result<()> {
    let (b, h, t, d) = x.dims4()?;
    let (cb, ch, cap, cd) = cache.dims4()?;
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    let distinct = sorted.windows(2).all(|w| w[0] < w[1]) && sorted.last().is_none_or(|&s| (s as usize) < cap);
    if (cb, ch, cd) != (b, h, d) || slots.len() != t || !distinct || !cache.is_contiguous() || x.stride()[3] != 1 || d % 2 != 0 {
        bail!("rope_write_kv: cannot write {:?} into cache {:?} at {} slots", x.layout(), cache.shape(), slots.len());
    }
    Ok(())
}
