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

use cpu::attention::DecodeAttention;
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

/// Rotate-half RoPE on q and k (as `candle_nn::rotary_emb::rope`), the rotated k and v written into
/// the caches at positions pos..pos + t. Returns the rotated q, (b, n_heads, t, head_dim) contiguous.
///
/// q (b, n_heads, t, head_dim), k and v (b, n_kv, t, head_dim): any strides with the last one 1,
/// so views of the qkv projection need no copy. cos, sin: (t_cs, head_dim / 2) or per row
/// (b, t_cs, head_dim / 2), t_cs >= t (the first t rows are used), contiguous. Caches
/// (b, n_kv, capacity, head_dim), contiguous, pos + t <= capacity. All of one dtype and device.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: usize,
) -> Result<Tensor> {
    let (b, _, t, d) = q.dims4()?;
    let bad_q = q.stride()[3] != 1 || d % 2 != 0;
    if bad_q || k.dims4()? != v.dims4()? || k.dim(0)? != b || k.dim(2)? != t || k.dim(3)? != d {
        bail!("rope_write_kv: q {:?}, k {:?}, v {:?} do not match", q.shape(), k.shape(), v.shape());
    }
    check_tables(cos, sin, b, t, d)?;
    check_cache(k_cache, k, pos)?;
    check_cache(v_cache, v, pos)?;
    k_cache.inplace_op2(k, &CacheWrite { tables: Some((cos, sin)), pos })?;
    v_cache.inplace_op2(v, &CacheWrite { tables: None, pos })?;
    q.apply_op3_no_bwd(cos, sin, &Rope)
}

/// Attention of one query per (row, head) over the first `len` cached positions, GQA (n_heads a
/// multiple of n_kv), softmax(scale q k^T) v in f32 without a mask. q (b, n_heads, 1, head_dim),
/// caches (b, n_kv, capacity, head_dim), each with any strides but the last 1; head_dim <= 256.
/// Returns (b, n_heads, 1, head_dim) contiguous, so `.reshape((b, 1, n_heads * head_dim))` is free.
pub fn decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, len: usize, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, cap, kd) = k_cache.dims4()?;
    if t != 1 || kb != b || kd != d || v_cache.dims4()? != (kb, nkv, cap, kd) || nkv == 0 || nh % nkv != 0 {
        bail!("decode_attention: q {:?}, caches {:?} {:?}", q.shape(), k_cache.shape(), v_cache.shape());
    }
    if len == 0 || len > cap || d > 256 {
        bail!("decode_attention: len {len} of capacity {cap}, head_dim {d} (at most 256)");
    }
    for (name, x) in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] {
        if x.stride()[3] != 1 {
            bail!("decode_attention: {name} needs a last stride of 1");
        }
    }
    q.apply_op3_no_bwd(k_cache, v_cache, &DecodeAttention { len, scale: scale as f32 })
}

/// Causal attention of t queries after `start` cached positions, on the CPU, in tiles (no
/// (t, start + t) score matrix is formed): query i sees keys 0..=start + i, softmax(scale q k^T) v
/// in f32. q (b, n_heads, t, head_dim), k and v (b, n_kv, start + t, head_dim), each with any
/// strides but the last 1, n_heads a multiple of n_kv. Returns (b, n_heads, t, head_dim) contiguous.
pub fn prefill_attention(q: &Tensor, k: &Tensor, v: &Tensor, start: usize, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, len, kd) = k.dims4()?;
    let bad = t == 0 || kb != b || kd != d || nkv == 0 || nh % nkv != 0 || len != start + t;
    if bad || v.dims4()? != (kb, nkv, len, kd) {
        bail!("prefill_attention: q {:?}, k {:?}, v {:?} after {start} cached", q.shape(), k.shape(), v.shape());
    }
    if [q, k, v].iter().any(|x| x.stride()[3] != 1 || !x.device().is_cpu()) {
        bail!("prefill_attention: q, k and v need a last stride of 1, on the CPU");
    }
    q.apply_op3_no_bwd(k, v, &PrefillAttention { start, scale: scale as f32 })
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

/// Whether x (b, h, t, d) can be written into `cache` (b, h, cap, d) at `pos`.
fn check_cache(cache: &Tensor, x: &Tensor, pos: usize) -> Result<()> {
    let (b, h, t, d) = x.dims4()?;
    let (cb, ch, cap, cd) = cache.dims4()?;
    if (cb, ch, cd) != (b, h, d) || pos + t > cap || !cache.is_contiguous() || x.stride()[3] != 1 || d % 2 != 0 {
        bail!("rope_write_kv: cannot write {:?} into cache {:?} at {pos}", x.layout(), cache.shape());
    }
    Ok(())
}
