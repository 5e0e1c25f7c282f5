//! The causal softmax of prompt attention, and the exponential it is built on.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Error, Layout, Result};

use super::{for_chunks, vectorized};
use crate::kernels::dtype::{by_dtype, Float};

/// e^x for x ≤ 0 (a softmax's scores less their max) in f32 arithmetic the compiler vectorizes:
/// 2^n e^f with |f| ≤ ln 2 / 2 and e^f to degree 7 (relative error about 1e-7 near 0); 0 below
/// -87, where e^x leaves f32's normal range; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    let t = if x < -87.0 { -87.0 } else { x } * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let f = (t - (shifted - ROUND)) * std::f32::consts::LN_2;
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * f + c;
    }
    let e = p * f32::from_bits(((n + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// scores -> probabilities in place; see `causal_softmax_`.
pub(crate) struct CausalSoftmax {
    pub(crate) start: usize,
    pub(crate) t: usize,
}

vectorized! {
    /// Softmax of the first `seen` values of `row`; the rest become 0.
    pub(crate) fn causal_softmax_row<T: Float>(row: &mut [T], seen: usize) {
        let (seen, unseen) = row.split_at_mut(seen);
        // Eight lanes each, so that the compiler vectorizes; `>` keeps a NaN out of the max, and
        // the NaN then reaches every probability through the sum.
        let mut max = [f32::NEG_INFINITY; 8];
        let mut chunks = seen.chunks_exact(8);
        for c in chunks.by_ref() {
            for (m, v) in max.iter_mut().zip(c) {
                *m = if v.f32() > *m { v.f32() } else { *m };
            }
        }
        let max = chunks.remainder().iter().map(|v| v.f32()).chain(max).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = [0f32; 8];
        let mut chunks = seen.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            for (s, v) in sum.iter_mut().zip(c) {
                let e = exp_nonpositive(v.f32() - max);
                *s += e;
                *v = T::of(e);
            }
        }
        for v in chunks.into_remainder() {
            let e = exp_nonpositive(v.f32() - max);
            sum[0] += e;
            *v = T::of(e);
        }
        let inv = 1.0 / sum.iter().sum::<f32>();
        for v in seen {
            *v = T::of(v.f32() * inv);
        }
        unseen.fill(T::of(0.0));
    }
}

impl candle_core::InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "granite-causal-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let len = self.start + self.t;
        let (from, to) = l.contiguous_offsets().ok_or_else(|| Error::Msg("expected a contiguous tensor".into()))?;
        by_dtype!(s.dtype(), self.name(), |T| {
            let scores = &mut T::slice_mut(s)?[from..to];
            let work = scores.len();
            for_chunks(scores, len, work, || (), |_, r, row| causal_softmax_row(row, self.start + r % self.t + 1));
        });
        Ok(())
    }
}
