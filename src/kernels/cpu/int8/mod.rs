//! Products of GGUF block weights with the activations rounded to 8-bit integers, on
//! AVX512-VNNI dot products (Zen 4 on, Ice Lake on): `gemm` for prompts, `gemv` for decode.
//! Every block type here stores a weight as a·u + b: u an unsigned integer of at most 8 bits,
//! a and b per 32 weights (per 16 for Q6_K). Each token's 32 activations become q·d (q signed
//! 8-bit, d = max |x| / 127, as llama.cpp's Q8_0 activations), so a group's product is
//! a·d·Σu·q + b·d·Σq, the sum exact in integers.

mod gemm;
mod gemv;

use candle_core::quantized::GgmlDType;

use super::formats::{half_at, Rows, GROUP};

pub(crate) use gemm::{gemm, Quantized};
pub(crate) use gemv::{decodes, gemv_job};

/// Whether this CPU runs the int8 kernels: AVX512F, BW and VNNI, and F16C.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// How a block type's weights become a·u + b, and how many scales each group of 32 has.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Format {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Format {
    /// The formats these kernels read; None for the others.
    pub(super) fn of(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Format::Q4_0,
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            GgmlDType::Q4K => Format::Q4K,
            GgmlDType::Q5K => Format::Q5K,
            GgmlDType::Q6K => Format::Q6K,
            _ => return None,
        })
    }

    /// Scales per group of 32: Q6_K has one per 16 weights.
    pub(super) fn halves(self) -> usize {
        if self == Format::Q6K {
            2
        } else {
            1
        }
    }

    /// Weights per block, and bytes per block.
    pub(super) fn block(self) -> (usize, usize) {
        let t = match self {
            Format::Q4_0 => GgmlDType::Q4_0,
            Format::Q4_1 => GgmlDType::Q4_1,
            Format::Q8_0 => GgmlDType::Q8_0,
            Format::Q4K => GgmlDType::Q4K,
            Format::Q5K => GgmlDType::Q5K,
            Format::Q6K => GgmlDType::Q6K,
        };
        (t.block_size(), t.type_size())
    }
}

/// Whether `int8::gemm` reads weights stored as `t` on this CPU.
pub fn reads(t: GgmlDType) -> bool {
    available() && Format::of(t).is_some()
}

/// The k-quants' 6-bit scale and min of sub-block j (llama.cpp's `get_scale_min_k4`).
fn scale_min(scales: &[u8], j: usize) -> (f32, f32) {
    if j < 4 {
        ((scales[j] & 63) as f32, (scales[j + 4] & 63) as f32)
    } else {
        let sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc as f32, m as f32)
    }
}

/// One block decoded: its integers u (block-size of them) and per 32 weights (per 16 for Q6_K)
/// a and b, so that weight i = a·u_i + b.
#[inline(always)]
pub(super) fn decode_block(format: Format, block: &[u8], u: &mut [u8; 256], a: &mut [f32; 16], b: &mut [f32; 16]) {
    // 16 bytes of nibbles at `q` into 32 integers at `u`: the low nibbles, then the high ones.
    #[inline(always)]
    fn nibbles(q: &[u8], u: &mut [u8]) {
        let (q, (lo, hi)): (&[u8; 16], (&mut [u8], &mut [u8])) = (q.try_into().unwrap(), u.split_at_mut(16));
        let (lo, hi): (&mut [u8; 16], &mut [u8; 16]) = (lo.try_into().unwrap(), hi.try_into().unwrap());
        for i in 0..16 {
            lo[i] = q[i] & 15;
            hi[i] = q[i] >> 4;
        }
    }
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let d = half_at(block, 0);
            let (start, offset) = if format == Format::Q4_0 { (2, -8.0 * d) } else { (4, half_at(block, 2)) };
            nibbles(&block[start..start + 16], &mut u[..32]);
            (a[0], b[0]) = (d, offset);
        }
        Format::Q8_0 => {
            for (u, &v) in u.iter_mut().zip(&block[2..34]) {
                *u = v ^ 0x80;
            }
            let d = half_at(block, 0);
            (a[0], b[0]) = (d, -128.0 * d);
        }
        Format::Q4K | Format::Q5K => {
            // d, dmin, 12 bytes of scales, [Q5_K: 32 bytes of fifth bits], 128 bytes of nibbles:
            // each 32 bytes hold two sub-blocks, the low nibbles and then the high ones.
            let (d, dmin, scales) = (half_at(block, 0), half_at(block, 2), &block[4..16]);
            let (high, qs) = if format == Format::Q5K { (Some(&block[16..48]), &block[48..176]) } else { (None, &block[16..144]) };
            for c in 0..4 {
                // 32 bytes: the low nibbles are sub-block 2c, the high ones 2c + 1.
                for half in 0..2 {
                    let (q, at) = (&qs[32 * c + 16 * half..][..16], 64 * c + 16 * half);
                    for i in 0..16 {
                        u[at + i] = q[i] & 15;
                        u[at + 32 + i] = q[i] >> 4;
                    }
                }
            }
            if let Some(high) = high {
                for (s, u) in u.chunks_exact_mut(32).enumerate() {
                    for (u, h) in u.iter_mut().zip(high) {
                        *u |= ((h >> s) & 1) << 4;
                    }
                }
            }
            for j in 0..8 {
                let (sc, m) = scale_min(scales, j);
                (a[j], b[j]) = (d * sc, -dmin * m);
            }
        }
        Format::Q6K => {
            // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed scales, d; weight =
            // d·scale·(q - 32). Per half of 128: value l + 32i takes ql's nibble (l, i) and
            // qh's bits 2i of byte l.
            let (ql, qh, scales, d) = (&block[..128], &block[128..192], &block[192..208], half_at(block, 208));
            for n in 0..2 {
                for l in 0..32 {
                    let (lo, hi, h) = (ql[64 * n + l], ql[64 * n + l + 32], qh[32 * n + l]);
                    let at = 128 * n + l;
                    u[at] = (lo & 15) | ((h & 3) << 4);
                    u[at + 32] = (hi & 15) | (((h >> 2) & 3) << 4);
                    u[at + 64] = (lo >> 4) | (((h >> 4) & 3) << 4);
                    u[at + 96] = (hi >> 4) | (((h >> 6) & 3) << 4);
                }
            }
            for (j, &s) in scales.iter().enumerate() {
                let scale = d * s as i8 as f32;
                (a[j], b[j]) = (scale, -32.0 * scale);
            }
        }
    }
}

/// 32 activations as q·d, q of 8 bits and d = max |x| / 127 (to nearest); a group holding NaN or
/// infinity gets d = NaN, so that the products it enters are NaN, not silently finite.
pub(super) fn round_group(xs: &[f32; GROUP]) -> ([i8; GROUP], f32) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` found AVX512F.
        return unsafe { avx512::round_group(xs) };
    }
    let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    let finite = xs.iter().all(|v| v.is_finite());
    (std::array::from_fn(|i| (xs[i] * inv).round_ties_even() as i8), if finite { max / 127.0 } else { f32::NAN })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::GROUP;

    /// `super::round_group`: ties to even, as the scalar path.
    /// # Safety
    /// The CPU has AVX512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_group(xs: &[f32; GROUP]) -> ([i8; GROUP], f32) {
        let (a, b) = (_mm512_loadu_ps(xs.as_ptr()), _mm512_loadu_ps(xs.as_ptr().add(16)));
        let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        // Any NaN or infinity makes the sum NaN or infinite, and so not 0 when multiplied by 0.
        let finite = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * 0.0 == 0.0;
        let inv = _mm512_set1_ps(if max > 0.0 { 127.0 / max } else { 0.0 });
        let mut ints = [0i8; GROUP];
        let round = |v: __m512| _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));
        _mm_storeu_si128(ints.as_mut_ptr() as *mut __m128i, round(a));
        _mm_storeu_si128(ints.as_mut_ptr().add(16) as *mut __m128i, round(b));
        (ints, if finite { max / 127.0 } else { f32::NAN })
    }
}

#[cfg(test)]
pub(super) mod testing {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::Rows;

    /// A random (n, k) matrix quantized to `format` by candle: its bytes and dequantized values.
    pub(in super::super) fn matrix(format: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let t = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, format).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let decoded = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        (bytes, decoded)
    }

    pub(in super::super) fn rows(format: GgmlDType, bytes: &[u8]) -> Rows<'_> {
        Rows::of(format, bytes).or_else(|| Rows::other(format, bytes)).unwrap()
    }

    pub(in super::super) const FORMATS: [GgmlDType; 6] =
        [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];
}
