//! The softmax of an attention row, and the exponential it is built on.

use super::vectorized;

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

/// The first `seen` values of `row` become e^(x - m), where m is the largest of them and of
/// `floor`; the rest become 0. Returns (m, the sum of the new values). Eight lanes each, so that
/// the compiler vectorizes; `>` keeps a NaN out of the max, and the NaN then reaches the sum.
#[inline(always)]
pub(crate) fn exp_row(row: &mut [f32], seen: usize, floor: f32) -> (f32, f32) {
    let (seen, unseen) = row.split_at_mut(seen);
    let mut max = [floor; 8];
    let mut chunks = seen.chunks_exact(8);
    for c in chunks.by_ref() {
        for (m, v) in max.iter_mut().zip(c) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    let max = chunks.remainder().iter().copied().chain(max).fold(floor, f32::max);
    let mut sum = [0f32; 8];
    let mut chunks = seen.chunks_exact_mut(8);
    for c in chunks.by_ref() {
        for (s, v) in sum.iter_mut().zip(c) {
            *v = exp_nonpositive(*v - max);
            *s += *v;
        }
    }
    for v in chunks.into_remainder() {
        *v = exp_nonpositive(*v - max);
        sum[0] += *v;
    }
    unseen.fill(0.0);
    (max, sum.iter().sum())
}

vectorized! {
    /// Softmax of `row`, in place.
    pub(crate) fn softmax_row(row: &mut [f32]) {
        let (_, sum) = exp_row(row, row.len(), f32::NEG_INFINITY);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}
