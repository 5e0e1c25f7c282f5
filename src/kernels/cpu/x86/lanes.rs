//! Decode products of Q4_0, Q4_1 and Q8_0 blocks on AVX512-VNNI with 16 weight rows side by side,
//! one per 32-bit lane: a block of 16 rows is transposed in registers so that each `vpdpbusd`
//! multiplies 4 weights of every row by 4 activations broadcast from memory, and a block's sums
//! land one per lane, scaled there, with no horizontal sum. The activations are 15-bit (`Split`),
//! two products per 4 weights, or 8-bit (`Split::narrow`), one. Each lane's sums run in one order
//! however many activation rows share a pass, so an activation row's result does not depend on
//! the others.

use std::arch::x86_64::*;
use std::ops::Range;

use crate::kernels::cpu::activations::Split;
use crate::kernels::cpu::formats::{Blocks, GROUP};
use crate::kernels::cpu::Out;

/// Weight rows side by side, one per lane.
const LANES: usize = 16;
/// Activation rows per pass over a block's unpacked weights (their sums stay in registers).
const PASS: usize = 8;

/// Whether the CPU has AVX512F, BW and VNNI, and F16C.
pub fn available() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("f16c")
    })
}

/// The centre c of the unsigned integers u = v + c the kernel multiplies: weight = d (u - c) + m.
pub const fn center<B: Blocks>() -> i32 {
    if B::NIBBLES {
        B::CENTER
    } else {
        128
    }
}

/// After the transpose, lane L holds row σ(L) = 4 (L mod 4) + L / 4 of the 16; σ is its own
/// inverse.
const fn sigma(l: usize) -> usize {
    4 * (l % 4) + l / 4
}

/// Rows `rows` of out (m, stride) from a matrix of blocks against a `Split` of x by `center::<B>()`:
/// 16 rows at a time, each against every activation row in passes of 8, so that the weights
/// come from memory once however many activation rows there are.
/// # Safety
/// `available()`; `w` holds the rows of `groups` blocks, `a` m rows of `groups` groups, out m rows
/// of `stride` (shapes checked by `gemv`); each (i, r) of `out` is written by this call only.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
pub unsafe fn block_rows<B: Blocks>(
    w: &[u8],
    groups: usize,
    a: &Split,
    m: usize,
    rows: Range<usize>,
    out: Out,
    stride: usize,
) {
    let row_bytes = groups * B::BYTES;
    let order = _mm512_loadu_si512(std::array::from_fn::<i32, LANES, _>(|l| sigma(l) as i32).as_ptr() as *const _);
    // The last rows, when fewer than 16, followed by rows of zeros.
    let mut padded = Vec::new();
    for r0 in rows.clone().step_by(LANES) {
        let n = (rows.end - r0).min(LANES);
        let base = if n == LANES {
            w.as_ptr().add(r0 * row_bytes)
        } else {
            padded.extend_from_slice(&w[r0 * row_bytes..(r0 + n) * row_bytes]);
            padded.resize(LANES * row_bytes, 0);
            padded.as_ptr()
        };
        let mask = (u32::MAX >> (32 - n)) as u16;
        for first in (0..m).step_by(PASS) {
            let store = |acc: &[__m512]| {
                for (i, acc) in acc.iter().enumerate() {
                    let at = out.ptr().add((first + i) * stride + r0);
                    _mm512_mask_storeu_ps(at, mask, _mm512_permutexvar_ps(order, *acc));
                }
            };
            let pass = (base, row_bytes, a, first, groups);
            if a.wide() {
                store_pass::<B, true>(m - first, pass, store);
            } else {
                store_pass::<B, false>(m - first, pass, store);
            }
        }
    }
}

/// `sixteen_rows` for min(rows, 8) activation rows, handed to `store`.
/// # Safety
/// As `sixteen_rows`.
#[inline(always)]
unsafe fn store_pass<B: Blocks, const WIDE: bool>(rows: usize, pass: Pass, store: impl Fn(&[__m512])) {
    match rows {
        1 => store(&sixteen_rows::<B, 1, WIDE>(pass)),
        2 => store(&sixteen_rows::<B, 2, WIDE>(pass)),
        3 => store(&sixteen_rows::<B, 3, WIDE>(pass)),
        4 => store(&sixteen_rows::<B, 4, WIDE>(pass)),
        5 => store(&sixteen_rows::<B, 5, WIDE>(pass)),
        6 => store(&sixteen_rows::<B, 6, WIDE>(pass)),
        7 => store(&sixteen_rows::<B, 7, WIDE>(pass)),
        _ => store(&sixteen_rows::<B, PASS, WIDE>(pass)),
    }
}

/// A pass's 16 weight rows (from, bytes per row), activations, first activation row and groups.
type Pass<'a> = (*const u8, usize, &'a Split, usize, usize);

/// The 16 bytes at `p` of each of 16 rows `stride` apart as 4 registers: register t's lane L
/// holds bytes 4t..4t + 4 of row σ(L).
/// # Safety
/// The CPU has AVX512F; each `p + j stride` points at 16 readable bytes.
#[inline(always)]
unsafe fn transpose(p: *const u8, stride: usize) -> [__m512i; 4] {
    // z[q]'s 128-bit lane r: row 4q + r.
    let z: [__m512i; 4] = std::array::from_fn(|q| {
        let rows = p.add(4 * q * stride);
        let load = |r: usize| _mm_loadu_si128(rows.add(r * stride) as *const __m128i);
        let v = _mm512_castsi128_si512(load(0));
        let v = _mm512_inserti32x4::<1>(v, load(1));
        let v = _mm512_inserti32x4::<2>(v, load(2));
        _mm512_inserti32x4::<3>(v, load(3))
    });
    let (a, b) = (_mm512_unpacklo_epi32(z[0], z[1]), _mm512_unpackhi_epi32(z[0], z[1]));
    let (c, d) = (_mm512_unpacklo_epi32(z[2], z[3]), _mm512_unpackhi_epi32(z[2], z[3]));
    // Lane r's slot q now holds row 4q + r: lane index 4r + q.
    [_mm512_unpacklo_epi64(a, c), _mm512_unpackhi_epi64(a, c), _mm512_unpacklo_epi64(b, d), _mm512_unpackhi_epi64(b, d)]
}

/// The block at `block` of 16 rows `stride` apart as u: register j's lane L holds u of weights
/// 4j..4j + 4 of row σ(L).
/// # Safety
/// As `transpose`, for whole blocks.
#[inline(always)]
unsafe fn unpack<B: Blocks>(block: *const u8, stride: usize) -> [__m512i; 8] {
    let [t0, t1, t2, t3] = transpose(block.add(B::START), stride);
    if B::NIBBLES {
        // Byte b holds weight b in its low nibble and weight b + 16 in its high one.
        let nibble = _mm512_set1_epi8(15);
        let high = |t: __m512i| _mm512_and_si512(_mm512_srli_epi16(t, 4), nibble);
        let low = |t: __m512i| _mm512_and_si512(t, nibble);
        [low(t0), low(t1), low(t2), low(t3), high(t0), high(t1), high(t2), high(t3)]
    } else {
        let [s0, s1, s2, s3] = transpose(block.add(B::START + 16), stride);
        let flip = _mm512_set1_epi8(-128);
        [t0, t1, t2, t3, s0, s1, s2, s3].map(|t| _mm512_xor_si512(t, flip))
    }
}

/// The sums of 16 rows at `base`, `row_bytes` apart, against activation rows first..first + M,
/// lane L holding row σ(L); `WIDE`: `a.wide()`.
/// # Safety
/// As `block_rows`, with M ≤ m - first; `base` holds 16 rows.
#[inline(always)]
unsafe fn sixteen_rows<B: Blocks, const M: usize, const WIDE: bool>(
    (base, row_bytes, a, first, groups): Pass,
) -> [__m512; M] {
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); M];
    // The 16 rows after the next, a share of their lines per block: read across 16 rows, these
    // lines are not streamed in by the hardware's prefetch in time.
    let (ahead, lines) = (base.wrapping_add(2 * LANES * row_bytes), (LANES * row_bytes).div_ceil(64));
    let share = lines.div_ceil(groups);
    for g in 0..groups {
        for line in g * share..((g + 1) * share).min(lines) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line) as *const i8);
        }
        let block = base.add(g * B::BYTES);
        let u = unpack::<B>(block, row_bytes);
        // Each lane's block head: d in its low half, Q4_1's m in its high one (transposed as
        // the integers are: a gather of 16 costs more).
        let heads = transpose(block, row_bytes)[0];
        let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(heads));
        let offset = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(heads)));
        for (i, acc) in acc.iter_mut().enumerate() {
            let t = (first + i) * groups + g;
            let dot = |q: &[i8], from: usize| {
                let q = q.as_ptr().add(t * GROUP) as *const i32;
                (from..from + 4)
                    .fold(zero, |s, j| _mm512_dpbusd_epi32(s, u[j], _mm512_set1_epi32(q.add(j).read_unaligned())))
            };
            let high = _mm512_add_epi32(dot(&a.hi, 0), dot(&a.hi, 4));
            let mut ints = if WIDE {
                _mm512_add_epi32(_mm512_slli_epi32::<7>(high), _mm512_add_epi32(dot(&a.lo, 0), dot(&a.lo, 4)))
            } else {
                high
            };
            if center::<B>() != 0 {
                ints = _mm512_sub_epi32(ints, _mm512_set1_epi32(a.a.center[t]));
            }
            let scale = _mm512_mul_ps(d, _mm512_set1_ps(a.a.scale[t]));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), scale, *acc);
            if B::OFFSET {
                *acc = _mm512_fmadd_ps(offset, _mm512_set1_ps(a.a.sum[t]), *acc);
            }
        }
    }
    acc
}

/// The same sums one at a time, in the kernel's order.
#[cfg(test)]
pub(crate) fn reference<B: Blocks>(row: &[u8], a: &Split, first: usize) -> f32 {
    use crate::kernels::cpu::formats::half_at;
    let mut acc = 0f32;
    for (g, block) in row.chunks_exact(B::BYTES).enumerate() {
        let t = first + g;
        let q = |j: usize| match a.wide() {
            true => 128 * a.hi[t * GROUP + j] as i32 + a.lo[t * GROUP + j] as i32,
            false => a.hi[t * GROUP + j] as i32,
        };
        let ints: i32 =
            B::ints(block).iter().enumerate().map(|(j, v)| (v + center::<B>() - B::CENTER) * q(j)).sum::<i32>()
                - a.a.center[t];
        acc = (ints as f32).mul_add(half_at(block, 0) * a.a.scale[t], acc);
        if B::OFFSET {
            acc = half_at(block, 2).mul_add(a.a.sum[t], acc);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::formats::{Q4_0, Q4_1, Q8_0};

    /// Every activation row's every output, for every count of rows and of activation rows, is the
    /// reference's bit for bit: what a row gets does not depend on what shares its pass.
    #[test]
    fn kernel_is_the_reference_bit_for_bit() {
        fn check<B: Blocks>(name: &str) {
            if !available() {
                return;
            }
            for (n, groups, m) in [(1, 1, 1), (16, 3, 1), (19, 18, 3), (40, 8, 8), (33, 5, 11)] {
                // Heads of f16 d (and m) in [2^-7, 1), then arbitrary integers.
                let w: Vec<u8> = (0..n * groups * B::BYTES)
                    .map(|i| match i % B::BYTES {
                        j if j < B::START && j % 2 == 0 => (i * 29 % 256) as u8,
                        j if j < B::START => 0x20 + (i * 7 % 27) as u8,
                        _ => (i * 37 % 251) as u8,
                    })
                    .collect();
                let x: Vec<f32> = (0..m * groups * GROUP).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
                for a in [Split::new(&x, center::<B>()), Split::narrow(&x, center::<B>())] {
                    let stride = n + 5;
                    let mut out = vec![f32::NAN; m * stride];
                    // Two jobs, split off the multiple of 16 rows.
                    let cut = n.min(16);
                    for part in [0..cut, cut..n] {
                        // SAFETY: `available()`; shapes as the kernel needs them.
                        unsafe { block_rows::<B>(&w, groups, &a, m, part, Out(out.as_mut_ptr()), stride) };
                    }
                    for i in 0..m {
                        for r in 0..n {
                            let want = reference::<B>(&w[r * groups * B::BYTES..][..groups * B::BYTES], &a, i * groups);
                            let got = out[i * stride + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{name} {n}x{groups} m {m}: ({i}, {r}) {got} vs {want}"
                            );
                        }
                        assert!(
                            out[i * stride + n..(i + 1) * stride].iter().all(|v| v.is_nan()),
                            "{name}: wrote past the rows"
                        );
                    }
                }
            }
        }
        check::<Q4_0>("q4_0");
        check::<Q4_1>("q4_1");
        check::<Q8_0>("q8_0");
    }

    /// The 15-bit (8-bit) activations' product is within the rounding of the activations of the
    /// f32 one.
    #[test]
    fn reference_is_the_product_of_the_decoded_weights() {
        fn check<B: Blocks>(name: &str) {
            let groups = 6;
            let w: Vec<u8> = (0..groups * B::BYTES)
                .map(|i| if i % B::BYTES < B::START { [0x00, 0x30, 0x66, 0xb0][i % 4] } else { (i * 37 % 251) as u8 })
                .collect();
            let x: Vec<f32> = (0..groups * GROUP).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
            let mut decoded = vec![0f32; groups * GROUP];
            crate::kernels::cpu::formats::decode_blocks::<B>(&w, &mut decoded);
            let exact: f64 = decoded.iter().zip(&x).map(|(w, x)| *w as f64 * *x as f64).sum();
            let weights: f64 = decoded.iter().map(|w| w.abs() as f64).sum();
            for (a, top) in [(Split::new(&x, center::<B>()), 16383.0), (Split::narrow(&x, center::<B>()), 127.0)] {
                // Each activation off by at most half a step of max |x| / top (max |x| < 5.2).
                let bound = weights * 5.2 / 2.0 / top + 1e-3 * exact.abs();
                let got = reference::<B>(&w, &a, 0) as f64;
                assert!((got - exact).abs() <= bound, "{name}, top {top}: {got} vs {exact}");
            }
        }
        check::<Q4_0>("q4_0");
        check::<Q4_1>("q4_1");
        check::<Q8_0>("q8_0");
    }
}
