//! The AVX2+FMA+F16C decode products (`gemv`'s rows): integer block dot products, with
//! AVX512-VNNI where present, and dense row products. Every function needs those features
//! present (`loads::available`).

use std::arch::x86_64::*;

use super::loads::{I, V};
use crate::kernels::cpu::activations::Activations;
use crate::kernels::cpu::formats::{Blocks, Dense, GROUP};
use crate::kernels::cpu::Out;

/// Σ v_j q_j of one block's unpacked v and its 32 activations q, as 8 partial sums (exact
/// either way: with VNNI, `vpdpwssd` adds the pairs' products into the sums).
/// # Safety
/// The CPU has AVX2, FMA and F16C (and AVX512-VNNI and VL with `VNNI`); `q` points at 32 values.
#[inline(always)]
unsafe fn block_dot<const VNNI: bool>(v: &[I; 2], q: *const i16) -> I {
    let q = q as *const __m256i;
    if VNNI {
        let first = _mm256_dpwssd_epi32(_mm256_setzero_si256(), v[0], _mm256_loadu_si256(q));
        return _mm256_dpwssd_epi32(first, v[1], _mm256_loadu_si256(q.add(1)));
    }
    _mm256_add_epi32(
        _mm256_madd_epi16(v[0], _mm256_loadu_si256(q)),
        _mm256_madd_epi16(v[1], _mm256_loadu_si256(q.add(1))),
    )
}

/// The sum of the 8 lanes.
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_ps(s: V) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// The lane sums of 8 vectors, in order.
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sums8(v: [I; 8]) -> I {
    let (a, b) = (_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    let (c, d) = (_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    let (ab, cd) = (_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    // ab holds the sums of v0..v3 split over its two halves, cd those of v4..v7.
    _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31))
}

/// The block kernels, compiled once per feature set (closures inside take the set too):
/// `$dots`, M activation rows' dot products with one weight row of `groups` blocks, 8 blocks at
/// a time: the blocks' integer sums (exact), as f32, times their d's and the activations'
/// scales, each block unpacked once for all M rows and each row's sums the same for any M;
/// `$rows`, rows `rows` of out (m, stride) from a matrix of blocks, up to 4 activation rows per
/// pass.
///
/// Safety of both: the CPU has `$features`; `row` points at `groups` blocks and `a` holds groups
/// `firsts[i]..firsts[i] + groups` for every i; shapes checked by `gemv`; each (i, r) of `out` is
/// written by this call only.
macro_rules! block_kernels {
    ($dots:ident, $rows:ident, $features:literal, $vnni:literal) => {
        /// See `block_kernels`.
        /// # Safety
        /// See `block_kernels`.
        #[target_feature(enable = $features)]
        pub unsafe fn $dots<B: Blocks, const M: usize, const PREFETCH: bool>(
            row: *const u8,
            groups: usize,
            a: &Activations,
            firsts: [usize; M],
        ) -> [f32; M] {
            let (mut acc, mut acc_m) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
            let mut step = |g: usize, count: usize| {
                if PREFETCH {
                    for line in (0..8 * B::BYTES).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(g * B::BYTES + AHEAD + line) as *const i8);
                    }
                }
                let block = |t: usize| row.add((g + t) * B::BYTES);
                let zero = _mm256_setzero_si256();
                let v: [[I; 2]; 8] = std::array::from_fn(|t| if t < count { B::unpack(block(t)) } else { [zero; 2] });
                let head = |t: usize| if t < count { (block(t) as *const i32).read_unaligned() } else { 0 };
                let heads = _mm256_setr_epi32(head(0), head(1), head(2), head(3), head(4), head(5), head(6), head(7));
                // d in the low halves of the heads, Q4_1's m in the high ones.
                let halves = _mm256_packus_epi32(
                    _mm256_and_si256(heads, _mm256_set1_epi32(0xffff)),
                    _mm256_srli_epi32(heads, 16),
                );
                let halves = _mm256_permute4x64_epi64(halves, 0b11_01_10_00);
                let d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
                let m = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
                for (i, &first) in firsts.iter().enumerate() {
                    let load = |p: *const f32| {
                        if count == 8 {
                            _mm256_loadu_ps(p.add(first + g))
                        } else {
                            let v: [f32; 8] =
                                std::array::from_fn(|t| if t < count { *p.add(first + g + t) } else { 0.0 });
                            _mm256_loadu_ps(v.as_ptr())
                        }
                    };
                    let q = a.q.as_ptr().add((first + g) * GROUP);
                    let parts =
                        std::array::from_fn(
                            |t| if t < count { block_dot::<$vnni>(&v[t], q.add(t * GROUP)) } else { zero },
                        );
                    let mut ints = sums8(parts);
                    if B::CENTER != 0 {
                        let center = a.center.as_ptr().add(first + g);
                        let c = if count == 8 {
                            _mm256_loadu_si256(center as *const I)
                        } else {
                            let c: [i32; 8] = std::array::from_fn(|t| if t < count { *center.add(t) } else { 0 });
                            _mm256_loadu_si256(c.as_ptr() as *const I)
                        };
                        ints = _mm256_sub_epi32(ints, c);
                    }
                    acc[i] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), _mm256_mul_ps(d, load(a.scale.as_ptr())), acc[i]);
                    if B::OFFSET {
                        acc_m[i] = _mm256_fmadd_ps(m, load(a.sum.as_ptr()), acc_m[i]);
                    }
                }
            };
            let full = groups - groups % 8;
            for g in (0..full).step_by(8) {
                step(g, 8);
            }
            if full < groups {
                step(full, groups - full);
            }
            std::array::from_fn(|i| sum_ps(_mm256_add_ps(acc[i], acc_m[i])))
        }

        /// See `block_kernels`.
        /// # Safety
        /// See `block_kernels`.
        #[target_feature(enable = $features)]
        unsafe fn $rows<B: Blocks, const PREFETCH: bool>(
            w: &[u8],
            groups: usize,
            a: &Activations,
            m: usize,
            rows: std::ops::Range<usize>,
            out: Out,
            stride: usize,
        ) {
            for r in rows {
                let row = w.as_ptr().add(r * groups * B::BYTES);
                for first in (0..m).step_by(4) {
                    let put = |sums: &[f32]| {
                        for (i, s) in sums.iter().enumerate() {
                            *out.ptr().add((first + i) * stride + r) = *s;
                        }
                    };
                    let at = |i: usize| (first + i) * groups;
                    match m - first {
                        1 => put(&$dots::<B, 1, PREFETCH>(row, groups, a, [at(0)])),
                        2 => put(&$dots::<B, 2, PREFETCH>(row, groups, a, [at(0), at(1)])),
                        3 => put(&$dots::<B, 3, PREFETCH>(row, groups, a, [at(0), at(1), at(2)])),
                        _ => put(&$dots::<B, 4, PREFETCH>(row, groups, a, [at(0), at(1), at(2), at(3)])),
                    }
                }
            }
        }
    };
}

block_kernels!(dots, rows_avx2, "avx2,fma,f16c", false);
block_kernels!(dots_vnni, rows_vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", true);

/// Whether the CPU has AVX512F, VL and VNNI.
fn avx512_vnni() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// Rows `rows` of out (m, stride) from a matrix of blocks against the activations, on `dots`.
/// # Safety
/// The CPU has AVX2, FMA and F16C; shapes checked by `gemv`; each (i, r) of `out` is written by
/// this call only.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn block_rows<B: Blocks>(
    w: &[u8],
    groups: usize,
    a: &Activations,
    m: usize,
    rows: std::ops::Range<usize>,
    out: Out,
    stride: usize,
) {
    match (avx512_vnni(), prefetch()) {
        (true, true) => rows_vnni::<B, true>(w, groups, a, m, rows, out, stride),
        (true, false) => rows_vnni::<B, false>(w, groups, a, m, rows, out, stride),
        (false, true) => rows_avx2::<B, true>(w, groups, a, m, rows, out, stride),
        (false, false) => rows_avx2::<B, false>(w, groups, a, m, rows, out, stride),
    }
}

/// Rows `rows` of out (M, stride) = x (M, k) · wᵀ, with 4 accumulators per activation row.
/// # Safety
/// The CPU has AVX2, FMA and F16C; `w` holds the rows, `x` M rows of k and `out` M rows of `stride`
/// (shapes checked by `gemv`); each (i, r) of `out` is written by this call only.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows<F: Dense, const M: usize>(
    w: *const u8,
    k: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    if prefetch() {
        dense::<F, M, true>(w, k, x, rows, out, stride)
    } else {
        dense::<F, M, false>(w, k, x, rows, out, stride)
    }
}

/// `rows`, with software prefetch or without.
/// # Safety
/// The CPU has AVX2, FMA and F16C; as `rows`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dense<F: Dense, const M: usize, const PREFETCH: bool>(
    w: *const u8,
    k: usize,
    x: &[f32],
    rows: std::ops::Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    let groups = k / GROUP;
    for r in rows {
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        let row = w.add(r * groups * F::BYTES);
        for g in 0..groups {
            if PREFETCH {
                let ahead = row.wrapping_add(g * F::BYTES + AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                if F::BYTES > 64 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
                }
            }
            let wv = F::avx2(row.add(g * F::BYTES));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xs = x.as_ptr().add(i * k + g * GROUP);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xs.add(8 * j)), *a);
                }
            }
        }
        for (i, [a0, a1, a2, a3]) in acc.iter().enumerate() {
            *out.add(i * stride + r) = sum_ps(_mm256_add_ps(_mm256_add_ps(*a0, *a1), _mm256_add_ps(*a2, *a3)));
        }
    }
}

/// How far ahead of its use each line of weights is prefetched (a prefetch past the end of
/// the matrix is harmless).
const AHEAD: usize = 2048;

/// Whether to prefetch weights in software: only on Intel. SmolLM2 decode, 2 cores: on an
/// Intel Xeon (Emerald Rapids) f32 +10% and Q4_1 +35%; on an AMD EPYC (Zen 4), whose hardware
/// prefetch alone keeps up, f32 10% slower.
fn prefetch() -> bool {
    static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INTEL.get_or_init(|| {
        // SAFETY: CPUID leaf 0 exists on every x86-64 CPU.
        #[allow(unused_unsafe)] // safe in newer Rust, unsafe in 1.87 (our minimum)
        let id = unsafe { __cpuid(0) };
        [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat() == b"GenuineIntel"
    })
}
