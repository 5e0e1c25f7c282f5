//! Activations rounded to integers for the integer block products: 16-bit (`Activations`), or
//! 15-bit in two bytes (`Split`) for `vpdpbusd`.

use super::formats::GROUP;
use super::vectorized;

/// Activation rows as 16-bit integers with one f32 scale per group of 32: x ≈ scale q, off by at
/// most half a step, 2^-16 of the group's largest magnitude. A group holding NaN or infinity
/// gets a NaN scale, so that the products it enters are NaN, not silently finite.
pub(crate) struct Activations {
    pub(crate) q: Vec<i16>,
    pub(crate) scale: Vec<f32>,
    /// Σx of each group, for Q4_1's offsets.
    pub(crate) sum: Vec<f32>,
    /// centre · Σq of each group: Q4_0's 8, or 128 for signed bytes read as unsigned.
    pub(crate) center: Vec<i32>,
}

impl Activations {
    pub(crate) fn new(x: &[f32], center: i32) -> Self {
        Self::rounded(x, center, 32767.0)
    }

    /// x ≈ scale q with |q| ≤ top.
    fn rounded(x: &[f32], center: i32, top: f32) -> Self {
        let groups = x.len() / GROUP;
        let mut a = Activations {
            q: vec![0; x.len()],
            scale: vec![0.0; groups],
            sum: vec![0.0; groups],
            center: vec![0; groups],
        };
        quantize(&mut a, x, center, top);
        a
    }
}

/// Activation rows as 15-bit integers q = 128 hi + lo, hi a signed byte and lo in 0..128, with
/// `Activations`' scales, sums and centres: x ≈ scale q, off by at most half a step, 2^-15 of the
/// group's largest magnitude. Two `vpdpbusd` (unsigned weight bytes times signed bytes) give a
/// block's exact Σ v q.
pub(crate) struct Split {
    pub(crate) hi: Vec<i8>,
    pub(crate) lo: Vec<i8>,
    pub(crate) a: Activations,
}

impl Split {
    pub(crate) fn new(x: &[f32], center: i32) -> Self {
        let a = Activations::rounded(x, center, 16383.0);
        let hi = a.q.iter().map(|q| (q >> 7) as i8).collect();
        let lo = a.q.iter().map(|q| (q & 127) as i8).collect();
        Self { hi, lo, a }
    }
}

vectorized! {
    /// Fills `a` from x.
    fn quantize(a: &mut Activations, x: &[f32], center: i32, top: f32) {
        for (g, (xs, qs)) in x.chunks_exact(GROUP).zip(a.q.chunks_exact_mut(GROUP)).enumerate() {
            let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sum: f32 = xs.iter().sum();
            let inv = if max > 0.0 { top / max } else { 0.0 };
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round_ties_even() as i16;
            }
            a.scale[g] = if max.is_finite() && sum.is_finite() { max / top } else { f32::NAN };
            a.sum[g] = sum;
            a.center[g] = center * qs.iter().map(|q| *q as i32).sum::<i32>();
        }
    }
}
