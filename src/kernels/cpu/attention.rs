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
/// them for q · k so that consecutive multiply-adds do not wait on each other. Each key and
/// value row is read once for all the group's heads, fetched `AHEAD` slots before it is used.
#[inline(always)]
fn attend_sized<T: Float, const D: usize>(
    q: &[f32],
    slots: &[u32],
    (k, k_step): (&[T], usize),
    (v, v_step): (&[T], usize),
    scores: &mut [f32],
    acc: &mut [f32],
    out: &mut [T],
) {
    let (heads, len) = (q.len() / D, slots.len());
    for (p, &slot) in slots.iter().enumerate() {
        if let Some(&next) = slots.get(p + AHEAD) {
            prefetch(&k[next as usize * k_step..][..D]);
            prefetch(&v[next as usize * v_step..][..D]);
        }
        let at = slot as usize * k_step;
        let row: &[T; D] = k[at..at + D].try_into().expect("head size");
        for h in 0..heads {
            let q: &[f32; D] = q[h * D..][..D].try_into().expect("head size");
            let mut acc = [[0f32; 8]; 4];
            for c in 0..D / 8 {
                for i in 0..8 {
                    acc[c % 4][i] += q[8 * c + i] * row[8 * c + i].f32();
                }
            }
            scores[h * len + p] = sum8(std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i])));
        }
    }
    for h in 0..heads {
        softmax_row(&mut scores[h * len..][..len]);
    }
    // The values in runs of slots that stay in L1 while each head reads them, each head's sums
    // in registers over a run.
    acc.fill(0.0);
    for first in (0..len).step_by(VALUE_RUN) {
        let run = &slots[first..len.min(first + VALUE_RUN)];
        for h in 0..heads {
            let sums: &mut [f32; D] = (&mut acc[h * D..][..D]).try_into().expect("head size");
            let mut a = *sums;
            for (&slot, s) in run.iter().zip(&scores[h * len + first..]) {
                let at = slot as usize * v_step;
                let row: &[T; D] = v[at..at + D].try_into().expect("head size");
                for (a, x) in a.iter_mut().zip(row) {
                    *a += s * x.f32();
                }
            }
            *sums = a;
        }
    }
    for (o, a) in out.iter_mut().zip(acc.iter()) {
        *o = T::of(*a);
    }
}

/// Slots of values per run in `attend_sized`.
const VALUE_RUN: usize = 32;
/// How many slots ahead `attend_sized` asks for the key and value rows: a sequence's slots
/// jump from block to block of the cache, where the hardware's prefetch starts late.
const AHEAD: usize = 16;

/// Asks the CPU to bring `row`'s cache lines into L1.
#[inline(always)]
fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..std::mem::size_of_val(row)).step_by(64) {
        // SAFETY: a prefetch never faults, and the address is inside `row`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((row.as_ptr() as *const i8).add(line))
        };
    }
}

vectorized! {
    /// The queries of one group of heads (rows of d in `q`) over the keys and values at rows
    /// slot · step of `k` and `v`, one per slot, and the group's scores (a row of them per head):
    /// out = softmax(q · k_p) · v_p per head.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: Float>(
        q: &[f32],
        d: usize,
        slots: &[u32],
        k: &[T],
        k_step: usize,
        v: &[T],
        v_step: usize,
        scores: &mut [f32],
        acc: &mut [f32],
        out: &mut [T],
    ) {
        match d {
            64 => return attend_sized::<T, 64>(q, slots, (k, k_step), (v, v_step), scores, acc, out),
            128 => return attend_sized::<T, 128>(q, slots, (k, k_step), (v, v_step), scores, acc, out),
            _ => {}
        }
        let len = slots.len();
        let heads = q.chunks_exact(d).zip(scores.chunks_exact_mut(len)).zip(acc.chunks_exact_mut(d).zip(out.chunks_exact_mut(d)));
        for ((q, scores), (acc, out)) in heads {
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
    let init = || (vec![0f32; rep * d], vec![0f32; rep * longest], vec![0f32; rep * d]);
    // One job per (row, kv head): its query heads side by side in `out`.
    for_chunks(&mut out, rep * d, work, init, |(qf, scores, acc), group, out| {
        let (bi, g) = (group / nkv, group % nkv);
        for (h, qf) in qf.chunks_exact_mut(d).enumerate() {
            let qo = ql.start_offset() + bi * qs[0] + (g * rep + h) * qs[1];
            for (f, x) in qf.iter_mut().zip(&q[qo..qo + d]) {
                *f = x.f32() * scale;
            }
        }
        let (slots, row) = (slots(bi), cache_row(bi));
        let ko = kl.start_offset() + row * ks[0] + g * ks[1];
        let vo = vl.start_offset() + row * vs[0] + g * vs[1];
        let scores = &mut scores[..rep * slots.len()];
        attend(qf, d, slots, &k[ko..], ks[2], &v[vo..], vs[2], scores, acc, out);
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
