//! Activations rounded to integers for the integer block products: 16-bit (`Activations`), or
//! for `vpdpbusd` 15-bit in two bytes or 8-bit in one (`Split`).

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

/// Activation rows as signed bytes for `vpdpbusd` (unsigned weight bytes times signed bytes),
/// with `Activations`' scales, sums and centres; x ≈ scale q, off by at most half a step:
/// - `new`: 15-bit q = 128 hi + lo, hi a signed byte and lo in 0..128, 2^-15 of the group's
///   largest magnitude; two products give a block's exact Σ v q.
/// - `narrow`: 8-bit q = hi (|q| ≤ 127, lo empty), 2^-8 of it, as llama.cpp rounds activations
///   for these blocks; one product.
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

    pub(crate) fn narrow(x: &[f32], center: i32) -> Self {
        let a = Activations::rounded(x, center, 127.0);
        Self { hi: a.q.iter().map(|&q| q as i8).collect(), lo: Vec::new(), a }
    }

    /// Whether q = 128 hi + lo (else q = hi).
    pub(crate) fn wide(&self) -> bool {
        !self.lo.is_empty()
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
