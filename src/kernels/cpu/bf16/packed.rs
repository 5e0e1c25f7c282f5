//! The layout bf16 prompt products take the activations in.

use crate::kernels::cpu::Out;

/// Tokens side by side in a packed block: one AMX tile's columns, one 512-bit register.
pub const TOKENS: usize = 16;

/// x (m, k) rounded to bf16, as [block of 16 tokens][pair along k][token] of u32 (the even
/// element in the low half); tokens past m are zero.
pub(crate) struct Packed {
    pub(crate) data: Vec<u32>,
    pub(crate) m: usize,
    pub(crate) pairs: usize,
}

impl Packed {
    /// Block `b`'s pairs.
    pub(crate) fn block(&self, b: usize) -> &[u32] {
        &self.data[b * self.pairs * TOKENS..][..self.pairs * TOKENS]
    }

    pub(crate) fn blocks(&self) -> usize {
        self.m.div_ceil(TOKENS)
    }
}

/// Writes a 16-token result column `v` (lanes are tokens t0..t0 + 16) into out's column `col`.
/// # Safety
/// out has (m, stride) values and col < stride.
#[inline]
pub(crate) unsafe fn scatter(v: &[f32; TOKENS], out: Out, stride: usize, t0: usize, m: usize, col: usize) {
    for (i, &value) in v.iter().enumerate().take(m.saturating_sub(t0)) {
        *out.ptr().add((t0 + i) * stride + col) = value;
    }
}
