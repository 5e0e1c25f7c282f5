//! Attention of one query per (row, head) over a KV cache.

use candle_core::{CustomOp3, Layout, Result};

use super::softmax::softmax_row;
use super::{for_chunks, vectorized};
use crate::kernels::dtype::{qkv_cpu_fwd, Float, QkvOp};
pub(crate) use crate::kernels::shapes::DecodeAttention;

/// a · b with eight independent sums, so that the compiler vectorizes it.
#[inline(always)]
pub(crate) fn dot<T: Float>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.f32()).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += xa[i] * xb[i].f32();
        }
    }
    sum8(acc) + tail
}

/// The sum of 8 lanes as a tree, which the compiler keeps in vector registers.
#[inline(always)]
fn sum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `attend` for a head size known when compiling: the sums stay in registers, four chains of
/// them for q · k so that consecutive multiply-adds do not wait on each other.
#[inline(always)]
fn attend_sized<T: Float, const D: usize>(
    q: &[f32],
    slots: &[u32],
    (k, k_step): (&[T], usize),
    (v, v_step): (&[T], usize),
    scores: &mut [f32],
    out: &mut [T],
) {
    let q: &[f32; D] = q.try_into().expect("head size");
    for (&slot, s) in slots.iter().zip(scores.iter_mut()) {
        let at = slot as usize * k_step;
        let row: &[T; D] = k[at..at + D].try_into().expect("head size");
        let mut acc = [[0f32; 8]; 4];
        for c in 0..D / 8 {
            for i in 0..8 {
                acc[c % 4][i] += q[8 * c + i] * row[8 * c + i].f32();
            }
        }
        *s = sum8(std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i])));
    }
    softmax_row(scores);
    let mut acc = [0f32; D];
    for (&slot, s) in slots.iter().zip(scores.iter()) {
        let at = slot as usize * v_step;
        let row: &[T; D] = v[at..at + D].try_into().expect("head size");
        for (a, x) in acc.iter_mut().zip(row) {
            *a += s * x.f32();
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::of(a);
    }
}

vectorized! {
    /// One query over the keys and values at rows slot · step of `k` and `v`, one per slot and
    /// score: out = softmax(q · k_p) · v_p.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: Float>(
        q: &[f32],
        slots: &[u32],
        k: &[T],
        k_step: usize,
        v: &[T],
        v_step: usize,
        scores: &mut [f32],
        acc: &mut [f32],
        out: &mut [T],
    ) {
        let d = q.len();
        match d {
            64 => return attend_sized::<T, 64>(q, slots, (k, k_step), (v, v_step), scores, out),
            128 => return attend_sized::<T, 128>(q, slots, (k, k_step), (v, v_step), scores, out),
            _ => {}
        }
        for (&slot, s) in slots.iter().zip(scores.iter_mut()) {
            let at = slot as usize * k_step;
            *s = dot(q, &k[at..at + d]);
        }
        softmax_row(scores);
        acc.fill(0.0);
        for (&slot, s) in slots.iter().zip(scores.iter()) {
            let at = slot as usize * v_step;
            for (a, x) in acc.iter_mut().zip(&v[at..at + d]) {
                *a += s * x.f32();
            }
        }
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = T::of(*a);
        }
    }
}

/// Attention of one query per (batch row, head) of q (b, n_heads, 1, d): row bi attends to the
/// cache slots `slots(bi)` of the caches' batch row `cache_row(bi)`.
fn attend_rows<'s, T: Float>(
    (q, ql): (&[T], &Layout),
    (k, kl): (&[T], &Layout),
    (v, vl): (&[T], &Layout),
    scale: f32,
    slots: impl Fn(usize) -> &'s [u32] + Sync,
    cache_row: impl Fn(usize) -> usize + Sync,
) -> Result<Vec<T>> {
    let (b, nh, _, d) = ql.shape().dims4()?;
    let (_, nkv, _, _) = kl.shape().dims4()?;
    let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
    let rep = nh / nkv;
    let lens = (0..b).map(|bi| slots(bi).len());
    let (longest, positions) = (lens.clone().max().unwrap_or(0), lens.sum::<usize>());
    let mut out = vec![T::of(0.0); b * nh * d];
    let work = positions * nh * d * 2;
    let init = || (vec![0f32; d], vec![0f32; longest], vec![0f32; d]);
    for_chunks(&mut out, d, work, init, |(qf, scores, acc), bh, out| {
        let (bi, hi) = (bh / nh, bh % nh);
        let qo = ql.start_offset() + bi * qs[0] + hi * qs[1];
        for (f, x) in qf.iter_mut().zip(&q[qo..qo + d]) {
            *f = x.f32() * scale;
        }
        let (slots, row) = (slots(bi), cache_row(bi));
        let ko = kl.start_offset() + row * ks[0] + (hi / rep) * ks[1];
        let vo = vl.start_offset() + row * vs[0] + (hi / rep) * vs[1];
        attend(qf, slots, &k[ko..], ks[2], &v[vo..], vs[2], &mut scores[..slots.len()], acc, out);
    });
    Ok(out)
}

impl QkvOp for DecodeAttention<'_> {
    fn cpu<T: Float>(&self, q: (&[T], &Layout), k: (&[T], &Layout), v: (&[T], &Layout)) -> Result<Vec<T>> {
        attend_rows(q, k, v, self.scale, |_| self.slots, |bi| bi)
    }
}

/// (q, k_cache, v_cache) -> attention output, each row of q over its own slots of caches with
/// one batch row; see `decode_attention_rows`. The CPU only.
pub(crate) struct RowsAttention<'a> {
    pub slots: &'a [&'a [u32]],
    pub scale: f32,
}

impl QkvOp for RowsAttention<'_> {
    fn cpu<T: Float>(&self, q: (&[T], &Layout), k: (&[T], &Layout), v: (&[T], &Layout)) -> Result<Vec<T>> {
        attend_rows(q, k, v, self.scale, |bi| self.slots[bi], |_| 0)
    }
}

impl CustomOp3 for RowsAttention<'_> {
    fn name(&self) -> &'static str {
        "granite-rows-attention"
    }

    qkv_cpu_fwd!();
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "granite-decode-attention"
    }

    qkv_cpu_fwd!();

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Ok((crate::kernels::cuda::decode_attention(self, (q, ql), (k, kl), (v, vl))?, ql.shape().clone()))
    }
}
