//! Decode products of the k-quants (Q4_K, Q5_K, Q6_K): each weight row streamed once from its
//! stored blocks, unpacked in registers, against up to 4 tokens rounded to 8 bits per 32. Each
//! token's sums run in the same order however many tokens share a pass, so a token's result
//! does not depend on the others.
//!
//! A superblock of 256 weights has units of one scale: 8 of 32 (Q4_K, Q5_K) or 16 of 16 (Q6_K).
//! Per token and superblock `Tokens` holds the units' activation scales d and sums d·Σq, so
//! that a unit's product is a·d·Σu·q + b·d·Σq, and the 8-bit q in the order the kernel unpacks
//! the weights' bytes.

use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::{decode_block, round_group, Format, Rows, GROUP};
use crate::kernels::cpu::Out;

/// Weights per superblock.
const SUPER: usize = 256;

/// Position p of a superblock's groups of 32 in `Tokens::q` holds group `order(format)[p]`:
/// Q4_K's and Q5_K's bytes of nibbles hold groups 2c and 2c + 1 in their low and high halves,
/// so 64 bytes unpack into groups (0, 2), then (1, 3), then (4, 6) and (5, 7).
fn order(format: Format) -> [usize; 8] {
    match format {
        Format::Q6K => [0, 1, 2, 3, 4, 5, 6, 7],
        _ => [0, 2, 1, 3, 4, 6, 5, 7],
    }
}

/// Up to `TOKENS` tokens' activations for one format (k a multiple of 256).
struct Tokens {
    m: usize,
    k: usize,
    /// Units per superblock.
    units: usize,
    /// [token][k] 8-bit, groups permuted by `order`.
    q: Vec<i8>,
    /// [token][superblock][d of each unit, then d·Σq of each unit].
    f: Vec<f32>,
}

impl Tokens {
    fn new(format: Format, x: &[f32], k: usize) -> Self {
        let (m, halves) = (x.len() / k, format.halves());
        let units = SUPER / GROUP * halves;
        let (mut q, mut f) = (vec![0i8; m * k], vec![0f32; m * k / SUPER * 2 * units]);
        let order = order(format);
        for (t, row) in x.chunks_exact(k).enumerate() {
            for (s, block) in row.chunks_exact(SUPER).enumerate() {
                let fs = &mut f[(t * k / SUPER + s) * 2 * units..][..2 * units];
                for (p, &g) in order.iter().enumerate() {
                    let (ints, d) = round_group(block[g * GROUP..][..GROUP].try_into().expect("a group"));
                    q[t * k + s * SUPER + p * GROUP..][..GROUP].copy_from_slice(&ints);
                    let width = GROUP / halves;
                    for h in 0..halves {
                        let sum: i32 = ints[h * width..][..width].iter().map(|&v| v as i32).sum();
                        (fs[g * halves + h], fs[units + g * halves + h]) = (d, d * sum as f32);
                    }
                }
            }
        }
        Self { m, k, units, q, f }
    }

    /// Token t's 8-bit activation at position i of its row, in the row's own order.
    fn natural(&self, format: Format, t: usize, i: usize) -> i8 {
        let (s, g, j) = (i / SUPER, i % SUPER / GROUP, i % GROUP);
        let p = order(format).iter().position(|&o| o == g).expect("a permutation");
        self.q[t * self.k + s * SUPER + p * GROUP + j]
    }
}

/// Whether `gemv_job` reads this type: a k-quant, on a CPU with the int8 kernels.
pub(crate) fn decodes(t: GgmlDType) -> bool {
    super::available() && matches!(t, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

/// Tokens per pass over the weights: the kernel's accumulators.
const TOKENS: usize = 4;

/// Columns of out (m, stride) from the rows of a matrix `decodes` takes (k a multiple of 256,
/// checked by `gemv`), for rows given to the returned function.
pub(crate) fn gemv_job<'a>(w: Rows<'a>, k: usize, x: &[f32], out: Out, stride: usize) -> impl Fn(Range<usize>) + Sync + 'a {
    let format = Format::of(w.format()).expect("gemv_job of a format it reads");
    let passes: Vec<(Tokens, Out)> = x
        .chunks(TOKENS * k)
        .enumerate()
        // SAFETY: out holds m rows of `stride`.
        .map(|(i, x)| (Tokens::new(format, x, k), Out(unsafe { out.ptr().add(i * TOKENS * stride) })))
        .collect();
    move |rows: Range<usize>| {
        for (tokens, out) in &passes {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `decodes` checked the features; the rows and out were checked by `gemv`.
            unsafe {
                avx512::rows(format, w.bytes(), tokens, rows.clone(), *out, stride)
            };
            #[cfg(not(target_arch = "x86_64"))]
            reference(format, w.bytes(), tokens, rows.clone(), *out, stride);
        }
    }
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // the kernel's test reference there
/// The kernel's sums one at a time, from blocks decoded by `decode_block`.
fn reference(format: Format, w: &[u8], x: &Tokens, rows: Range<usize>, out: Out, stride: usize) {
    let (_, bytes) = format.block();
    let (supers, units) = (x.k / SUPER, x.units);
    let (mut u, mut a, mut b) = ([0u8; 256], [0f32; 16], [0f32; 16]);
    for r in rows {
        let mut acc = vec![0f32; x.m];
        for s in 0..supers {
            decode_block(format, &w[(r * supers + s) * bytes..][..bytes], &mut u, &mut a, &mut b);
            for (t, acc) in acc.iter_mut().enumerate() {
                let fs = &x.f[(t * supers + s) * 2 * units..][..2 * units];
                for j in 0..units {
                    let width = SUPER / units;
                    let ints: i32 = (j * width..(j + 1) * width)
                        .map(|i| u[i] as i32 * x.natural(format, t, s * SUPER + i) as i32)
                        .sum();
                    *acc += a[j] * fs[j] * ints as f32 + b[j] * fs[units + j];
                }
            }
        }
        for (t, acc) in acc.into_iter().enumerate() {
            // SAFETY: each (t, r) is written by this job only; out holds m rows of `stride`.
            unsafe { *out.ptr().add(t * stride + r) = acc };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Format, Out, Tokens, SUPER};

    /// `super::reference` on AVX-512.
    /// # Safety
    /// The CPU has AVX512F, BW, VNNI and F16C; w holds the rows, out x.m rows of `stride`.
    pub(super) unsafe fn rows(format: Format, w: &[u8], x: &Tokens, rows: Range<usize>, out: Out, stride: usize) {
        macro_rules! tokens {
            ($kernel:ident $(, $flag:literal)?) => {
                match x.m {
                    1 => $kernel::<1 $(, $flag)?>(w, x, rows, out, stride),
                    2 => $kernel::<2 $(, $flag)?>(w, x, rows, out, stride),
                    3 => $kernel::<3 $(, $flag)?>(w, x, rows, out, stride),
                    _ => $kernel::<4 $(, $flag)?>(w, x, rows, out, stride),
                }
            };
        }
        match format {
            Format::Q4K => tokens!(q4k, false),
            Format::Q5K => tokens!(q4k, true),
            _ => tokens!(q6k),
        }
    }

    /// 16 lanes of f32: lanes 0..8 take unit `a`, lanes 8..16 unit `b`.
    /// # Safety
    /// The CPU has AVX-512F.
    #[inline(always)]
    unsafe fn pair(a: i32, b: i32) -> __m512i {
        _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(a), _mm512_set1_epi32(b))
    }

    /// Accumulators per token, whatever the number of tokens: enough independent sums to hide the
    /// latency of adding into them, in one order for every token.
    const CHAINS: usize = 4;

    /// Each token's sum of lanes into its column `r`.
    /// # Safety
    /// The CPU has AVX-512F, and `out` has room for M rows of `stride` past column `r`.
    #[inline(always)]
    unsafe fn store<const M: usize>(acc: &[[__m512; CHAINS]; M], out: Out, stride: usize, r: usize) {
        for (t, a) in acc.iter().enumerate() {
            let sum = a.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
            *out.ptr().add(t * stride + r) = _mm512_reduce_add_ps(sum);
        }
    }

    /// Q4_K (FIVE false) and Q5_K (FIVE true) rows against M tokens.
    /// # Safety
    /// As `rows`, and x.m == M.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q4k<const M: usize, const FIVE: bool>(w: &[u8], x: &Tokens, rows: Range<usize>, out: Out, stride: usize) {
        let bytes = if FIVE { 176 } else { 144 };
        let supers = x.k / SUPER;
        let (low, zero, five) = (_mm512_set1_epi8(15), _mm512_setzero_si512(), _mm512_set1_epi8(16));
        // The groups of 32 in each unpacked register, as `super::order` lays them out.
        let groups = [(0, 2), (1, 3), (4, 6), (5, 7)];
        let lanes = groups.map(|(a, b)| pair(a, b));
        let bits = groups.map(|(a, b)| _mm512_mask_blend_epi8(!0u64 << 32, _mm512_set1_epi8(1 << a), _mm512_set1_epi8(1 << b)));
        // d for lanes 0..8 (the scales), dmin for 8..16 (the mins).
        let d_then_min = pair(0, 1);
        for r in rows {
            let mut acc = [[_mm512_setzero_ps(); CHAINS]; M];
            for s in 0..supers {
                let block = w.as_ptr().add((r * supers + s) * bytes);
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128((block as *const i32).read_unaligned()));
                let d = _mm512_permutexvar_ps(d_then_min, _mm512_castps128_ps512(d));
                // The 6-bit scales and mins as bytes 0..8 and 8..16 (llama.cpp's unpacking).
                let word = |i: usize| (block.add(4 + 4 * i) as *const u32).read_unaligned();
                let (s0, s1, s2) = (word(0), word(1), word(2));
                let (lo6, lo4, hi2) = (0x3f3f3f3f, 0x0f0f0f0f, 0x03030303);
                let scales_high = (s2 & lo4) | (((s0 >> 6) & hi2) << 4);
                let mins_high = ((s2 >> 4) & lo4) | (((s1 >> 6) & hi2) << 4);
                let sm = _mm_set_epi32(mins_high as i32, (s1 & lo6) as i32, scales_high as i32, (s0 & lo6) as i32);
                let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm));
                let sm = _mm512_mul_ps(sm, d);
                let qs = block.add(if FIVE { 48 } else { 16 });
                let (v0, v1) = (_mm512_loadu_si512(qs as *const _), _mm512_loadu_si512(qs.add(64) as *const _));
                let mut u = [
                    _mm512_and_si512(v0, low),
                    _mm512_and_si512(_mm512_srli_epi16(v0, 4), low),
                    _mm512_and_si512(v1, low),
                    _mm512_and_si512(_mm512_srli_epi16(v1, 4), low),
                ];
                if FIVE {
                    let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(16) as *const __m256i));
                    for (u, bits) in u.iter_mut().zip(bits) {
                        *u = _mm512_mask_add_epi8(*u, _mm512_test_epi8_mask(high, bits), *u, five);
                    }
                }
                for (t, acc) in acc.iter_mut().enumerate() {
                    let f = _mm512_loadu_ps(x.f.as_ptr().add((t * supers + s) * 16));
                    // Lanes 0..8: each unit's a·d; lanes 8..16: -b·d·Σq, taken off the sum.
                    let scaled = _mm512_mul_ps(sm, f);
                    acc[0] = _mm512_mask_sub_ps(acc[0], 0xff00, acc[0], scaled);
                    let q = x.q.as_ptr().add(t * x.k + s * SUPER);
                    for (i, (u, lanes)) in u.iter().zip(lanes).enumerate() {
                        let ints = _mm512_dpbusd_epi32(zero, *u, _mm512_loadu_si512(q.add(64 * i) as *const _));
                        let acc = &mut acc[i % CHAINS];
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_permutexvar_ps(lanes, scaled), *acc);
                    }
                }
            }
            store(&acc, out, stride, r);
        }
    }

    /// Q6_K rows against M tokens.
    /// # Safety
    /// As `rows`, and x.m == M.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn q6k<const M: usize>(w: &[u8], x: &Tokens, rows: Range<usize>, out: Out, stride: usize) {
        let supers = x.k / SUPER;
        let (low, zero, bits) = (_mm512_set1_epi8(15), _mm512_setzero_si512(), _mm512_set1_epi8(0x30));
        // Bits 4..6 of byte l of each unpacked register come from qh's byte l at bits 0..2, 2..4
        // (first register), 4..6, 6..8 (second), by shifts of 16-bit lanes.
        let half = |a: i16, b: i16| _mm512_mask_blend_epi16(!0u32 << 16, _mm512_set1_epi16(a), _mm512_set1_epi16(b));
        let (left, right) = (half(4, 2), half(0, 2));
        // Register (n, s)'s lane l holds unit 8n + 4s + l / 4.
        let lanes: [__m512i; 4] = std::array::from_fn(|i| {
            let units: [i32; 16] = std::array::from_fn(|l| (4 * i + l / 4) as i32);
            _mm512_loadu_si512(units.as_ptr() as *const _)
        });
        for r in rows {
            let mut acc = [[_mm512_setzero_ps(); CHAINS]; M];
            for s in 0..supers {
                let block = w.as_ptr().add((r * supers + s) * 210);
                let d = _mm_cvtph_ps(_mm_cvtsi32_si128((block.add(208) as *const u16).read_unaligned() as i32));
                let a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(block.add(192) as *const __m128i)));
                let a = _mm512_mul_ps(a, _mm512_broadcastss_ps(d));
                let b = _mm512_mul_ps(a, _mm512_set1_ps(-32.0));
                let mut u = [zero; 4];
                for n in 0..2 {
                    let v = _mm512_loadu_si512(block.add(64 * n) as *const _);
                    let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(128 + 32 * n) as *const __m256i));
                    let first = _mm512_and_si512(_mm512_sllv_epi16(h, left), bits);
                    let second = _mm512_and_si512(_mm512_srlv_epi16(h, right), bits);
                    u[2 * n] = _mm512_or_si512(_mm512_and_si512(v, low), first);
                    u[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), second);
                }
                for (t, acc) in acc.iter_mut().enumerate() {
                    let f = x.f.as_ptr().add((t * supers + s) * 32);
                    let scaled = _mm512_mul_ps(a, _mm512_loadu_ps(f));
                    acc[0] = _mm512_fmadd_ps(b, _mm512_loadu_ps(f.add(16)), acc[0]);
                    let q = x.q.as_ptr().add(t * x.k + s * SUPER);
                    for (i, (u, lanes)) in u.iter().zip(lanes).enumerate() {
                        let ints = _mm512_dpbusd_epi32(zero, *u, _mm512_loadu_si512(q.add(64 * i) as *const _));
                        let acc = &mut acc[i % CHAINS];
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ints), _mm512_permutexvar_ps(lanes, scaled), *acc);
                    }
                }
            }
            store(&acc, out, stride, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::super::testing::{matrix, rows};
    use super::*;
    const FORMATS: [GgmlDType; 3] = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K];

    /// out for every token and row, by the kernel or the reference, into a wider out.
    fn product(w: Rows, n: usize, k: usize, x: &[f32], kernel: bool) -> Vec<f32> {
        let (m, stride) = (x.len() / k, n + 3);
        let mut out = vec![f32::NAN; m * stride];
        let o = Out(out.as_mut_ptr());
        if kernel {
            gemv_job(w, k, x, o, stride)(0..n);
        } else {
            let format = Format::of(w.format()).unwrap();
            reference(format, w.bytes(), &Tokens::new(format, x, k), 0..n, o, stride);
        }
        out.chunks_exact(stride).flat_map(|row| row[..n].to_vec()).collect()
    }

    #[test]
    fn kernel_and_reference_are_the_product_of_the_decoded_values() {
        for (n, m, k, seed) in [(5, 1, 256, 3), (9, 3, 512, 4), (4, 8, 2048, 5)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            for format in FORMATS {
                let (bytes, w) = matrix(format, n, k, seed + 10);
                let w_rows = rows(format, &bytes);
                let f = Format::of(format).unwrap();
                let tokens = Tokens::new(f, &x, k);
                let mut runs = vec![("reference", product(w_rows, n, k, &x, false))];
                if decodes(format) {
                    runs.push(("kernel", product(w_rows, n, k, &x, true)));
                }
                for (name, got) in runs {
                    for t in 0..m {
                        for r in 0..n {
                            // The exact product of the decoded weights and the rounded activations.
                            let exact: f64 = (0..k)
                                .map(|i| {
                                    let g = (t * k + i) / GROUP;
                                    let d = tokens.f[(g / 8) * 2 * tokens.units + g % 8 * f.halves()];
                                    w[r * k + i] as f64 * (tokens.natural(f, t, i) as f32 * d) as f64
                                })
                                .sum();
                            let g = got[t * n + r] as f64;
                            assert!((g - exact).abs() < 1e-4 * (k as f64).sqrt(), "{name} {format:?} {n}x{m}x{k} ({t}, {r}): {g} vs {exact}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn activations_round_to_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (m, k) = (3, 512);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
        for format in [Format::Q4K, Format::Q6K] {
            let tokens = Tokens::new(format, &x, k);
            for (g, xs) in x.chunks_exact(GROUP).enumerate() {
                let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (t, i0) = (g * GROUP / k, g * GROUP % k);
                let d = tokens.f[(g / 8) * 2 * tokens.units + g % 8 * format.halves()];
                for (j, v) in xs.iter().enumerate() {
                    let back = tokens.natural(format, t, i0 + j) as f32 * d;
                    assert!((v - back).abs() <= max / 254.0 * 1.0001, "{format:?} group {g}: {v} vs {back}");
                }
            }
        }
    }
}
