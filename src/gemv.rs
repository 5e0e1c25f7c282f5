//! Products of f32 activation rows with weight matrices in the formats we read, split over
//! rayon's threads. `gemv`, for decode: a few rows against a matrix read once, with AVX2+FMA+F16C
//! where the CPU has them. `gemm`, for prompts: tiles of the matrix decoded to f32, then gemm.
//! Both take several matrices stacked along the output (fused q/k/v, gate/up) as `Part`s, each
//! in its own format and memory, and compute them in one parallel loop.
//! - Dense f32/f16/bf16 rows are decoded to f32 and multiplied in f32.
//! - GGUF's Q4_0/Q4_1/Q8_0 blocks are multiplied as integers: each 32 activations become 16-bit
//!   integers with one f32 scale (`Activations`), so a block's dot product is exact integer
//!   arithmetic, then scaled. The activations' rounding error is at most 2^-16 of their block's
//!   largest magnitude: far below llama.cpp's 8-bit activations, near f32.

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

/// Every format is handled in groups of 32 weights of one row (one GGUF block).
pub const GROUP: usize = 32;

/// A row-major weight matrix in one of the formats this module reads.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// GGUF blocks, as llama.cpp lays them out.
    Q4_0(&'a [u8]),
    Q4_1(&'a [u8]),
    Q8_0(&'a [u8]),
    /// Blocks of another GGUF type (the k-quants, Q5_0, Q5_1), decoded by candle: `gemm` reads
    /// them, `gemv` does not.
    Other(GgmlDType, &'a [u8]),
}

/// A weight matrix and its number of rows, which take the next columns of the output.
pub type Part<'a> = (Rows<'a>, usize);

impl<'a> Rows<'a> {
    /// `bytes` read as `format`; None for another format, or half/f32 values that are not aligned.
    pub fn of(format: GgmlDType, bytes: &'a [u8]) -> Option<Self> {
        Some(match format {
            GgmlDType::F32 => Rows::F32(cast(bytes)?),
            GgmlDType::F16 => Rows::F16(cast(bytes)?),
            GgmlDType::BF16 => Rows::BF16(cast(bytes)?),
            GgmlDType::Q4_0 => Rows::Q4_0(bytes),
            GgmlDType::Q4_1 => Rows::Q4_1(bytes),
            GgmlDType::Q8_0 => Rows::Q8_0(bytes),
            _ => return None,
        })
    }

    /// `bytes` as `Rows::Other` blocks of `format`, when candle decodes that type and the bytes
    /// are whole, aligned blocks.
    pub fn other(format: GgmlDType, bytes: &'a [u8]) -> Option<Self> {
        use candle_core::quantized::k_quants::*;
        let fits = match format {
            GgmlDType::Q5_0 => cast::<BlockQ5_0>(bytes).is_some(),
            GgmlDType::Q5_1 => cast::<BlockQ5_1>(bytes).is_some(),
            GgmlDType::Q2K => cast::<BlockQ2K>(bytes).is_some(),
            GgmlDType::Q3K => cast::<BlockQ3K>(bytes).is_some(),
            GgmlDType::Q4K => cast::<BlockQ4K>(bytes).is_some(),
            GgmlDType::Q5K => cast::<BlockQ5K>(bytes).is_some(),
            GgmlDType::Q6K => cast::<BlockQ6K>(bytes).is_some(),
            _ => false,
        };
        fits.then_some(Rows::Other(format, bytes))
    }

    /// Bytes per row of k weights.
    fn row_bytes(self, k: usize) -> usize {
        match self {
            Rows::F32(_) => 4 * k,
            Rows::F16(_) | Rows::BF16(_) => 2 * k,
            Rows::Q4_0(_) => k / GROUP * Q4_0::BYTES,
            Rows::Q4_1(_) => k / GROUP * Q4_1::BYTES,
            Rows::Q8_0(_) => k / GROUP * Q8_0::BYTES,
            Rows::Other(t, _) => k / t.block_size() * t.type_size(),
        }
    }

    /// The matrix's memory.
    pub fn bytes(self) -> &'a [u8] {
        match self {
            Rows::F32(s) => bytes_of(s),
            Rows::F16(s) => bytes_of(s),
            Rows::BF16(s) => bytes_of(s),
            Rows::Q4_0(b) | Rows::Q4_1(b) | Rows::Q8_0(b) | Rows::Other(_, b) => b,
        }
    }
}

/// How one group of 32 dense weights is stored and decoded to f32.
trait Dense {
    const BYTES: usize;
    /// Whether `avx2` returns each half of the group as its even weights, then its odd ones; the
    /// activations are then reordered to match (`evens_then_odds`).
    const EVENS_THEN_ODDS: bool = false;
    fn scalar(group: &[u8], out: &mut [f32; GROUP]);
    /// # Safety
    /// `group` points at `BYTES` readable bytes and the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(group: *const u8) -> [x86::V; 4];
}

/// x with each 16 values reordered as their 8 even ones, then their 8 odd ones.
#[cfg(target_arch = "x86_64")]
fn evens_then_odds(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(16).flat_map(|c| (0..16).map(move |i| c[if i < 8 { 2 * i } else { 2 * (i - 8) + 1 }])).collect()
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

struct F32;
struct F16;
struct BF16;

impl Dense for F32 {
    const BYTES: usize = 4 * GROUP;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (o, b) in out.iter_mut().zip(g.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        std::array::from_fn(|j| x86::load_f32(g.add(32 * j)))
    }
}

impl Dense for F16 {
    const BYTES: usize = 2 * GROUP;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = half_at(g, 2 * i);
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        std::array::from_fn(|j| x86::load_f16(g.add(16 * j)))
    }
}

/// bf16 is the top half of an f32: a 32-bit lane holding two bf16 gives the odd one by masking
/// and the even one by shifting, with no widening shuffle.
impl Dense for BF16 {
    const BYTES: usize = 2 * GROUP;
    const EVENS_THEN_ODDS: bool = true;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (o, b) in out.iter_mut().zip(g.chunks_exact(2)) {
            *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        let [evens0, odds0] = x86::split_bf16(g);
        let [evens1, odds1] = x86::split_bf16(g.add(32));
        [evens0, odds0, evens1, odds1]
    }
}

/// GGUF blocks of 32 weights, multiplied as integers. Weight j of a block is d (v_j - CENTER) + m,
/// where v_j is the block's integer j, d its first f16 and m (only where OFFSET) its second.
trait Blocks {
    const BYTES: usize;
    const CENTER: i32;
    const OFFSET: bool;
    /// The 32 integers v_j.
    fn ints(block: &[u8]) -> [i32; GROUP];
    /// Σ_j v_j q_j for 32 activations q, as 8 partial sums.
    /// # Safety
    /// `block` points at `BYTES` readable bytes, `q` at 32 values, and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(block: *const u8, q: *const i16) -> x86::I;
}

struct Q4_0;
struct Q4_1;
struct Q8_0;

/// Byte j of a nibble block holds v_j in its low nibble and v_{j+16} in its high nibble.
fn nibble_ints(nibbles: &[u8]) -> [i32; GROUP] {
    std::array::from_fn(|j| if j < 16 { nibbles[j] & 15 } else { nibbles[j - 16] >> 4 } as i32)
}

/// Q4_0: f16 d, then 16 bytes of nibbles; weight = d (v - 8).
impl Blocks for Q4_0 {
    const BYTES: usize = 18;
    const CENTER: i32 = 8;
    const OFFSET: bool = false;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        nibble_ints(&block[2..18])
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(block: *const u8, q: *const i16) -> x86::I {
        x86::nibble_dot(block.add(2), q)
    }
}

/// Q4_1: f16 d and f16 m, then nibbles as in Q4_0; weight = d v + m.
impl Blocks for Q4_1 {
    const BYTES: usize = 20;
    const CENTER: i32 = 0;
    const OFFSET: bool = true;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        nibble_ints(&block[4..20])
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(block: *const u8, q: *const i16) -> x86::I {
        x86::nibble_dot(block.add(4), q)
    }
}

/// Q8_0: f16 d, then 32 signed bytes; weight = d v.
impl Blocks for Q8_0 {
    const BYTES: usize = 34;
    const CENTER: i32 = 0;
    const OFFSET: bool = false;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        std::array::from_fn(|j| block[2 + j] as i8 as i32)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(block: *const u8, q: *const i16) -> x86::I {
        x86::byte_dot(block.add(2), q)
    }
}

/// Blocks decoded to their f32 weights, 32 per block.
#[inline(always)]
fn decode_blocks<B: Blocks>(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(B::BYTES).zip(out.chunks_exact_mut(GROUP)) {
        let (d, m) = (half_at(block, 0), if B::OFFSET { half_at(block, 2) } else { 0.0 });
        for (o, v) in out.iter_mut().zip(B::ints(block)) {
            *o = d * (v - B::CENTER) as f32 + m;
        }
    }
}

/// Activation rows as 16-bit integers with one f32 scale per group of 32: x ≈ scale q, off by at
/// most half a step, 2^-16 of the group's largest magnitude. A group holding NaN or infinity
/// gets a NaN scale, so that the products it enters are NaN, not silently finite.
struct Activations {
    q: Vec<i16>,
    scale: Vec<f32>,
    /// Σx of each group, for Q4_1's offsets.
    sum: Vec<f32>,
    /// CENTER Σq of each group, for Q4_0's centre.
    center: Vec<i32>,
}

impl Activations {
    fn new(x: &[f32], center: i32) -> Self {
        let groups = x.len() / GROUP;
        let mut a = Activations {
            q: vec![0; x.len()],
            scale: vec![0.0; groups],
            sum: vec![0.0; groups],
            center: vec![0; groups],
        };
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: the features are present.
            unsafe { x86::quantize(&mut a, x, center) };
            return a;
        }
        a.quantize(x, center);
        a
    }

    /// Written for the compiler to vectorize; `x86::quantize` compiles it with AVX2.
    #[inline(always)]
    fn quantize(&mut self, x: &[f32], center: i32) {
        let a = self;
        for (g, (xs, qs)) in x.chunks_exact(GROUP).zip(a.q.chunks_exact_mut(GROUP)).enumerate() {
            let max = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let sum: f32 = xs.iter().sum();
            let inv = if max > 0.0 { 32767.0 / max } else { 0.0 };
            for (q, v) in qs.iter_mut().zip(xs) {
                *q = (v * inv).round_ties_even() as i16;
            }
            a.scale[g] = if max.is_finite() && sum.is_finite() { max / 32767.0 } else { f32::NAN };
            a.sum[g] = sum;
            a.center[g] = center * qs.iter().map(|q| *q as i32).sum::<i32>();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub type V = __m256;

    pub type I = __m256i;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f32(p: *const u8) -> V {
        _mm256_loadu_ps(p as *const f32)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f16(p: *const u8) -> V {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// 16 bf16 as f32: the 8 even ones, then the 8 odd ones.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn split_bf16(p: *const u8) -> [V; 2] {
        let pairs = _mm256_loadu_si256(p as *const __m256i);
        let odds = _mm256_and_si256(pairs, _mm256_set1_epi32(0xffff_0000u32 as i32));
        [_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), _mm256_castsi256_ps(odds)]
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(a: &mut super::Activations, x: &[f32], center: i32) {
        a.quantize(x, center)
    }

    /// Σ v_j q_j for 16 bytes of nibbles: low nibbles are v_0..v_15, high ones v_16..v_31.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn nibble_dot(p: *const u8, q: *const i16) -> I {
        let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
        let lo = _mm256_and_si256(w, _mm256_set1_epi16(15));
        let hi = _mm256_srli_epi16(w, 4);
        let q = q as *const __m256i;
        _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(q)), _mm256_madd_epi16(hi, _mm256_loadu_si256(q.add(1))))
    }

    /// Σ v_j q_j for 32 signed bytes v.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn byte_dot(p: *const u8, q: *const i16) -> I {
        let v = |at: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(at) as *const __m128i));
        let q = q as *const __m256i;
        _mm256_add_epi32(_mm256_madd_epi16(v(0), _mm256_loadu_si256(q)), _mm256_madd_epi16(v(16), _mm256_loadu_si256(q.add(1))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum_ps(s: V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The lane sums of 8 vectors, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sums8(v: [I; 8]) -> I {
        let (a, b) = (_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let (c, d) = (_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        let (ab, cd) = (_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        // ab holds the sums of v0..v3 split over its two halves, cd those of v4..v7.
        _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20), _mm256_permute2x128_si256(ab, cd, 0x31))
    }

    /// Blocks g..g + count (count ≤ 8) of a row: their integer sums less the centre, and the first
    /// 4 bytes of each (d in the low half, m of Q4_1 in the high half); zero past `count`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block8<B: super::Blocks>(row: *const u8, q: *const i16, center: *const i32, g: usize, count: usize) -> (I, I) {
        let block = |t: usize| row.add((g + t) * B::BYTES);
        let part = |t: usize| if t < count { B::avx2(block(t), q.add((g + t) * super::GROUP)) } else { _mm256_setzero_si256() };
        let head = |t: usize| if t < count { (block(t) as *const i32).read_unaligned() } else { 0 };
        let mut ints = sums8(std::array::from_fn(part));
        if B::CENTER != 0 {
            let c = if count == 8 {
                _mm256_loadu_si256(center.add(g) as *const I)
            } else {
                let c: [i32; 8] = std::array::from_fn(|t| if t < count { *center.add(g + t) } else { 0 });
                _mm256_loadu_si256(c.as_ptr() as *const I)
            };
            ints = _mm256_sub_epi32(ints, c);
        }
        (ints, _mm256_setr_epi32(head(0), head(1), head(2), head(3), head(4), head(5), head(6), head(7)))
    }

    /// One activation row's dot product with one weight row of `groups` blocks, 8 blocks at a
    /// time: their integer sums, as f32, times their d's and the activations' scales.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<B: super::Blocks, const PREFETCH: bool>(
        row: *const u8,
        groups: usize,
        a: &super::Activations,
        first: usize,
    ) -> f32 {
        let q = a.q.as_ptr().add(first * super::GROUP);
        let (scale, sum, center) = (a.scale.as_ptr().add(first), a.sum.as_ptr().add(first), a.center.as_ptr().add(first));
        let (mut acc, mut acc_m) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut step = |g: usize, count: usize| {
            if PREFETCH {
                for line in (0..8 * B::BYTES).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(g * B::BYTES + AHEAD + line) as *const i8);
                }
            }
            let (ints, heads) = block8::<B>(row, q, center, g, count);
            let load = |p: *const f32| {
                if count == 8 {
                    _mm256_loadu_ps(p.add(g))
                } else {
                    let v: [f32; 8] = std::array::from_fn(|t| if t < count { *p.add(g + t) } else { 0.0 });
                    _mm256_loadu_ps(v.as_ptr())
                }
            };
            let halves = _mm256_packus_epi32(_mm256_and_si256(heads, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(heads, 16));
            let halves = _mm256_permute4x64_epi64(halves, 0b11_01_10_00);
            let d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ints), _mm256_mul_ps(d, load(scale)), acc);
            if B::OFFSET {
                let m = _mm256_cvtph_ps(_mm256_extracti128_si256(halves, 1));
                acc_m = _mm256_fmadd_ps(m, load(sum), acc_m);
            }
        };
        let full = groups - groups % 8;
        for g in (0..full).step_by(8) {
            step(g, 8);
        }
        if full < groups {
            step(full, groups - full);
        }
        sum_ps(_mm256_add_ps(acc, acc_m))
    }

    /// `super::block_rows` with `dot` inlined.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block_rows<B: super::Blocks>(
        w: &[u8],
        groups: usize,
        a: &super::Activations,
        m: usize,
        rows: std::ops::Range<usize>,
        out: super::Out,
        stride: usize,
    ) {
        if prefetch() {
            super::block_rows::<B>(w, groups, m, rows, out, stride, |row, first| unsafe {
                dot::<B, true>(row.as_ptr(), groups, a, first)
            })
        } else {
            super::block_rows::<B>(w, groups, m, rows, out, stride, |row, first| unsafe {
                dot::<B, false>(row.as_ptr(), groups, a, first)
            })
        }
    }

    /// Rows `rows` of out (M, stride) = x (M, k) · wᵀ, with 4 accumulators per activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<F: super::Dense, const M: usize>(
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
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dense<F: super::Dense, const M: usize, const PREFETCH: bool>(
        w: *const u8,
        k: usize,
        x: &[f32],
        rows: std::ops::Range<usize>,
        out: *mut f32,
        stride: usize,
    ) {
        let groups = k / super::GROUP;
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
                    let xs = x.as_ptr().add(i * k + g * super::GROUP);
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
            #[allow(unused_unsafe)] // safe in newer Rust, unsafe in 1.87 (our minimum)
            let id = unsafe { __cpuid(0) };
            [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat() == b"GenuineIntel"
        })
    }

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }
}

/// Whether this CPU has AVX2, FMA and F16C, which the fast paths here and in `ops` use.
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The portable path: rows `rows` of out (M, stride) = x (M, k) · wᵀ.
fn rows_scalar<F: Dense>(w: &[u8], k: usize, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32, stride: usize) {
    let groups = k / GROUP;
    let mut wv = [0f32; GROUP];
    for r in rows {
        let mut acc = vec![0f32; m];
        for g in 0..groups {
            let at = (r * groups + g) * F::BYTES;
            F::scalar(&w[at..at + F::BYTES], &mut wv);
            for (i, a) in acc.iter_mut().enumerate() {
                let xs = &x[i * k + g * GROUP..][..GROUP];
                *a += wv.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
            }
        }
        for (i, a) in acc.into_iter().enumerate() {
            // SAFETY: each (i, r) is written by exactly one caller; `out` holds m rows of `stride`.
            unsafe { *out.add(i * stride + r) = a };
        }
    }
}

/// A raw pointer that worker threads may share: every worker writes disjoint elements.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A method, so that closures capture the whole `Out` rather than its raw pointer field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// One matrix's share of a product: computes the given rows of it into its output columns.
struct Job<'a> {
    rows: usize,
    row_bytes: usize,
    work: Box<dyn Fn(Range<usize>) + Sync + 'a>,
}

/// Runs every job on all its rows, split over rayon's threads when they are worth waking.
fn split(jobs: &[Job]) {
    let total: usize = jobs.iter().map(|j| j.rows * j.row_bytes).sum();
    // Below this many weight bytes, waking the pool costs more than it saves.
    if total < 64 * 1024 {
        jobs.iter().for_each(|j| (j.work)(0..j.rows));
        return;
    }
    // rayon rather than candle's spinning barrier pool: under other load on the machine the
    // spinning cost 10x here (measured), and rayon's workers sleep when idle. About 4 pieces per
    // thread, of similar weight bytes, whatever the matrices.
    use rayon::prelude::*;
    let piece = total.div_ceil(rayon::current_num_threads() * 4);
    let pieces: Vec<(&Job, Range<usize>)> = jobs
        .iter()
        .flat_map(|j| {
            let chunk = piece.div_ceil(j.row_bytes.max(1)).max(1);
            (0..j.rows).step_by(chunk).map(move |r| (j, r..j.rows.min(r + chunk)))
        })
        .collect();
    pieces.into_par_iter().for_each(|(j, rows)| (j.work)(rows));
}

/// Columns of out (m, stride) from a dense matrix of k-wide rows.
fn dense_job<'a, F: Dense>(
    w: &'a [u8],
    k: usize,
    x: &'a [f32],
    out: Out,
    stride: usize,
) -> impl Fn(Range<usize>) + Sync + 'a {
    let m = x.len() / k;
    #[cfg(target_arch = "x86_64")]
    let reordered = (F::EVENS_THEN_ODDS && x86::available()).then(|| evens_then_odds(x));
    move |rows: Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            let x = reordered.as_deref().unwrap_or(x);
            // At most 4 activation rows per pass over the weights keeps the accumulators in registers.
            for first in (0..m).step_by(4) {
                let xs = &x[first * k..];
                // SAFETY: the features are present; shapes were checked by `gemv`.
                unsafe {
                    let (w, o) = (w.as_ptr(), out.ptr().add(first * stride));
                    match m - first {
                        1 => x86::rows::<F, 1>(w, k, xs, rows.clone(), o, stride),
                        2 => x86::rows::<F, 2>(w, k, xs, rows.clone(), o, stride),
                        3 => x86::rows::<F, 3>(w, k, xs, rows.clone(), o, stride),
                        _ => x86::rows::<F, 4>(w, k, xs, rows.clone(), o, stride),
                    }
                }
            }
            return;
        }
        rows_scalar::<F>(w, k, x, m, rows, out.ptr(), stride);
    }
}

/// The portable path for blocks: the same integer products, summed block by block.
fn dot_scalar<B: Blocks>(row: &[u8], a: &Activations, first: usize) -> f32 {
    let mut acc = 0f32;
    for (g, block) in row.chunks_exact(B::BYTES).enumerate() {
        let q = &a.q[(first + g) * GROUP..][..GROUP];
        let ints: i32 = B::ints(block).iter().zip(q).map(|(v, q)| v * *q as i32).sum();
        acc += half_at(block, 0) * a.scale[first + g] * (ints - a.center[first + g]) as f32;
        if B::OFFSET {
            acc += half_at(block, 2) * a.sum[first + g];
        }
    }
    acc
}

/// Rows `rows` of out (m, stride): each weight row against each activation row, by `dot`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn block_rows<B: Blocks>(
    w: &[u8],
    groups: usize,
    m: usize,
    rows: Range<usize>,
    out: Out,
    stride: usize,
    dot: impl Fn(&[u8], usize) -> f32,
) {
    for r in rows {
        let row = &w[r * groups * B::BYTES..][..groups * B::BYTES];
        for i in 0..m {
            // SAFETY: each (i, r) is written by exactly one caller; `out` holds m rows of `stride`.
            unsafe { *out.ptr().add(i * stride + r) = dot(row, i * groups) };
        }
    }
}

/// Columns of out (m, stride) from a matrix of GGUF blocks.
fn block_job<'a, B: Blocks>(
    w: &'a [u8],
    k: usize,
    x: &[f32],
    out: Out,
    stride: usize,
) -> impl Fn(Range<usize>) + Sync + 'a {
    let (m, groups) = (x.len() / k, k / GROUP);
    let a = Activations::new(x, B::CENTER);
    move |rows: Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // SAFETY: the features are present; shapes were checked by `gemv`.
            return unsafe { x86::block_rows::<B>(w, groups, &a, m, rows, out, stride) };
        }
        block_rows::<B>(w, groups, m, rows, out, stride, |row, first| dot_scalar::<B>(row, &a, first));
    }
}

/// The bytes of f32/f16/bf16 values as those values, when aligned and whole.
fn cast<T>(bytes: &[u8]) -> Option<&[T]> {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    if !(bytes.as_ptr() as usize).is_multiple_of(align) || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: aligned, whole values, and every bit pattern is a valid f32, f16 or bf16.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

fn bytes_of<T>(s: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain old data; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

/// Checks every shape: k a positive multiple of 32, x (m, k), out (m, Σn), each part n rows of k.
/// Returns Σn.
fn checked(parts: &[Part], k: usize, x: &[f32], out: &[f32]) -> Result<usize, String> {
    if k == 0 || !k.is_multiple_of(GROUP) {
        return Err(format!("gemv needs a row length that is a positive multiple of {GROUP}, got {k}"));
    }
    let n: usize = parts.iter().map(|(_, n)| n).sum();
    let m = x.len() / k;
    if x.len() != m * k || out.len() != m * n {
        return Err(format!("gemv shapes: x has {} values, out {}, for k {k} and n {n}", x.len(), out.len()));
    }
    for &(w, rows) in parts {
        if let Rows::Other(t, _) = w {
            if !k.is_multiple_of(t.block_size()) {
                return Err(format!("{t:?} rows of {k} are not whole blocks of {}", t.block_size()));
            }
        }
        let (found, expected) = (w.bytes().len(), rows * w.row_bytes(k));
        if found != expected {
            return Err(format!("gemv weights: {found} bytes where {rows} x {k} needs {expected}"));
        }
    }
    Ok(n)
}

/// out (m, Σn) = x (m, k) · [w₁; w₂; ...]ᵀ for matrices of n rows of k stacked along the output.
/// k must be a multiple of 32 and every slice must have its exact size; otherwise nothing is
/// computed and the error says why.
pub fn gemv(parts: &[Part], k: usize, x: &[f32], out: &mut [f32]) -> Result<(), String> {
    let stride = checked(parts, k, x, out)?;
    if let Some((Rows::Other(t, _), _)) = parts.iter().find(|(w, _)| matches!(w, Rows::Other(..))) {
        return Err(format!("gemv does not read {t:?} blocks"));
    }
    let mut out = Out(out.as_mut_ptr());
    let jobs: Vec<Job> = parts
        .iter()
        .map(|&(w, rows)| {
            let b = w.bytes();
            let work: Box<dyn Fn(Range<usize>) + Sync> = match w {
                Rows::F32(_) => Box::new(dense_job::<F32>(b, k, x, out, stride)),
                Rows::F16(_) => Box::new(dense_job::<F16>(b, k, x, out, stride)),
                Rows::BF16(_) => Box::new(dense_job::<BF16>(b, k, x, out, stride)),
                Rows::Q4_0(_) => Box::new(block_job::<Q4_0>(b, k, x, out, stride)),
                Rows::Q4_1(_) => Box::new(block_job::<Q4_1>(b, k, x, out, stride)),
                Rows::Q8_0(_) => Box::new(block_job::<Q8_0>(b, k, x, out, stride)),
                Rows::Other(..) => unreachable!("rejected above"),
            };
            // SAFETY: the parts' rows add up to `stride` columns.
            out = Out(unsafe { out.ptr().add(rows) });
            Job { rows, row_bytes: w.row_bytes(k), work }
        })
        .collect();
    split(&jobs);
    Ok(())
}

/// Rows `rows` of a checked matrix decoded to f32 into `out`.
pub(crate) fn decode_rows(w: Rows, k: usize, rows: Range<usize>, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let values = rows.start * k..rows.end * k;
    let blocks = |bytes: usize| rows.start * k / GROUP * bytes..rows.end * k / GROUP * bytes;
    #[inline(always)]
    fn decode(w: Rows, values: Range<usize>, blocks: impl Fn(usize) -> Range<usize>, out: &mut [f32]) {
        match w {
            Rows::F32(s) => out.copy_from_slice(&s[values]),
            Rows::F16(s) => s[values].convert_to_f32_slice(out),
            Rows::BF16(s) => s[values].convert_to_f32_slice(out),
            Rows::Q4_0(b) => decode_blocks::<Q4_0>(&b[blocks(Q4_0::BYTES)], out),
            Rows::Q4_1(b) => decode_blocks::<Q4_1>(&b[blocks(Q4_1::BYTES)], out),
            Rows::Q8_0(b) => decode_blocks::<Q8_0>(&b[blocks(Q8_0::BYTES)], out),
            Rows::Other(..) => unreachable!("decoded by decode_rows"),
        }
    }
    if let Rows::Other(t, b) = w {
        let row_bytes = w.row_bytes(k);
        return decode_other(t, &b[rows.start * row_bytes..rows.end * row_bytes], out);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fast(w: Rows, values: Range<usize>, blocks: impl Fn(usize) -> Range<usize>, out: &mut [f32]) {
            decode(w, values, blocks, out)
        }
        // SAFETY: the features are present.
        return unsafe { fast(w, values, blocks, out) };
    }
    decode(w, values, blocks, out)
}

/// Whole blocks of a `Rows::Other` type decoded to f32 by candle.
fn decode_other(format: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use candle_core::quantized::k_quants::*;
    fn decode<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        B::to_float(cast(bytes).expect("checked by Rows::other"), out)
    }
    match format {
        GgmlDType::Q5_0 => decode::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => decode::<BlockQ5_1>(bytes, out),
        GgmlDType::Q2K => decode::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => decode::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => decode::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => decode::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => decode::<BlockQ6K>(bytes, out),
        _ => unreachable!("Rows::other takes no other type"),
    }
}

/// `gemv` for many activation rows (a prompt): tiles of each matrix's rows, each small enough to
/// stay in cache, are decoded to f32 and multiplied by gemm, the tiles split over rayon's threads.
/// The weights enter at their exact values, the activations as they are.
pub fn gemm(parts: &[Part], k: usize, x: &[f32], out: &mut [f32]) -> Result<(), String> {
    let stride = checked(parts, k, x, out)?;
    let mut out = Out(out.as_mut_ptr());
    for &(w, n) in parts {
        gemm_part(w, n, k, x, out, stride);
        // SAFETY: the parts' rows add up to `stride` columns.
        out = Out(unsafe { out.ptr().add(n) });
    }
    Ok(())
}

/// Columns of out (m, stride) from one checked matrix of n rows.
fn gemm_part(w: Rows, n: usize, k: usize, x: &[f32], out: Out, stride: usize) {
    use rayon::prelude::*;
    let m = x.len() / k;
    // Tiles of at most 256 KiB of f32, as many as a multiple of the threads, of a multiple of 48
    // rows (whole blocks of gemm's 16 x 6 kernel either way round).
    let threads = rayon::current_num_threads();
    let tiles = n.div_ceil((64 * 1024 / k).max(48)).div_ceil(threads) * threads;
    let tile = n.div_ceil(tiles).next_multiple_of(48).min(n);
    thread_local!(static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    (0..n.div_ceil(tile)).into_par_iter().for_each(|t| TILE.with_borrow_mut(|buf| {
        let rows = t * tile..n.min((t + 1) * tile);
        // f32 rows are multiplied where they are; the other formats decoded into `buf`.
        let tile_values = match w {
            Rows::F32(s) => &s[rows.start * k..rows.end * k],
            _ => {
                buf.resize(rows.len() * k, 0.0);
                decode_rows(w, k, rows.clone(), buf);
                &buf[..]
            }
        };
        // SAFETY: x is (m, k) and the tile (rows, k), row-major; out (m, stride) row-major, of
        // which this tile writes columns `rows` only.
        unsafe {
            gemm::gemm(
                m,
                rows.len(),
                k,
                out.ptr().add(rows.start),
                1,
                stride as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                tile_values.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable integer path against the AVX2 one (which tests/gemv.rs checks against
    /// candle), on blocks of every value and rows with and without a partial batch of 8.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_blocks_equal_avx2() {
        fn check<B: Blocks>(name: &str) {
            for groups in [1, 8, 11, 48] {
                let row: Vec<u8> = (0..groups * B::BYTES)
                    .map(|i| if i % B::BYTES < 4 { [0x00, 0x30, 0x66, 0xb0][i % 4] } else { (i * 37 % 251) as u8 })
                    .collect();
                let x: Vec<f32> = (0..groups * GROUP).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0).collect();
                let a = Activations::new(&x, B::CENTER);
                let portable = dot_scalar::<B>(&row, &a, 0);
                // SAFETY: checked just before.
                let fast = x86::available().then(|| unsafe { x86::dot::<B, true>(row.as_ptr(), groups, &a, 0) });
                if let Some(fast) = fast {
                    let err = (portable - fast).abs() / portable.abs().max(1.0);
                    assert!(err < 1e-5, "{name}, {groups} blocks: portable {portable}, avx2 {fast}");
                }
            }
        }
        check::<Q4_0>("q4_0");
        check::<Q4_1>("q4_1");
        check::<Q8_0>("q8_0");
    }
}
