//! Matrix-vector products for decode: a few f32 activation rows against a weight matrix that is
//! read once and decoded to f32 on the fly, from dense f32/f16/bf16 rows or from GGUF's
//! Q4_0/Q4_1/Q8_0 blocks. AVX2+FMA+F16C where the CPU has them, split over rayon's threads.
//! The quantized formats are computed exactly as their dequantized f32 weights would be.

use std::ops::Range;

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
}

/// How one group of 32 weights is stored and decoded.
trait Format {
    const BYTES: usize;
    fn scalar(group: &[u8], out: &mut [f32; GROUP]);
    /// # Safety
    /// `group` points at `BYTES` readable bytes and the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(group: *const u8) -> [x86::V; 4];
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

struct F32;
struct F16;
struct BF16;
struct Q4_0;
struct Q4_1;
struct Q8_0;

impl Format for F32 {
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

impl Format for F16 {
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

impl Format for BF16 {
    const BYTES: usize = 2 * GROUP;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (o, b) in out.iter_mut().zip(g.chunks_exact(2)) {
            *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        std::array::from_fn(|j| x86::load_bf16(g.add(16 * j)))
    }
}

/// Q4_0: f16 scale d, then 16 bytes; weight j is (low nibble of byte j - 8) d, weight j + 16
/// is (high nibble of byte j - 8) d.
impl Format for Q4_0 {
    const BYTES: usize = 18;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        let d = half_at(g, 0);
        for (j, q) in g[2..18].iter().enumerate() {
            out[j] = ((q & 15) as f32 - 8.0) * d;
            out[j + 16] = ((q >> 4) as f32 - 8.0) * d;
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        let d = x86::scalar_f16(g);
        x86::nibbles(g.add(2), d, -8.0 * d)
    }
}

/// Q4_1: f16 scale d and f16 offset m, then nibbles as in Q4_0; weight = nibble d + m.
impl Format for Q4_1 {
    const BYTES: usize = 20;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        let (d, m) = (half_at(g, 0), half_at(g, 2));
        for (j, q) in g[4..20].iter().enumerate() {
            out[j] = (q & 15) as f32 * d + m;
            out[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        x86::nibbles(g.add(4), x86::scalar_f16(g), x86::scalar_f16(g.add(2)))
    }
}

/// Q8_0: f16 scale d, then 32 signed bytes; weight = q d.
impl Format for Q8_0 {
    const BYTES: usize = 34;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        let d = half_at(g, 0);
        for (o, q) in out.iter_mut().zip(&g[2..34]) {
            *o = *q as i8 as f32 * d;
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        x86::bytes(g.add(2), x86::scalar_f16(g))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub type V = __m256;

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

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_bf16(p: *const u8) -> V {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scalar_f16(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// 32 weights from 16 bytes of nibbles (low nibbles first): nibble * d + m.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn nibbles(p: *const u8, d: f32, m: f32) -> [V; 4] {
        let raw = _mm_loadu_si128(p as *const __m128i);
        let mask = _mm_set1_epi8(15);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
        let widen = |b: __m128i| _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), d, m);
        [widen(lo), widen(_mm_srli_si128(lo, 8)), widen(hi), widen(_mm_srli_si128(hi, 8))]
    }

    /// 32 weights from 32 signed bytes: q * d.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn bytes(p: *const u8, d: f32) -> [V; 4] {
        let d = _mm256_set1_ps(d);
        std::array::from_fn(|j| {
            let b = _mm_loadl_epi64(p.add(8 * j) as *const __m128i);
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d)
        })
    }

    /// Rows `rows` of out (M, n) = x (M, k) · wᵀ, with 4 accumulators per activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows<F: super::Format, const M: usize>(
        w: *const u8,
        k: usize,
        x: &[f32],
        rows: std::ops::Range<usize>,
        out: *mut f32,
        n: usize,
    ) {
        let groups = k / super::GROUP;
        for r in rows {
            let mut acc = [[_mm256_setzero_ps(); 4]; M];
            let row = w.add(r * groups * F::BYTES);
            for g in 0..groups {
                let wv = F::avx2(row.add(g * F::BYTES));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xs = x.as_ptr().add(i * k + g * super::GROUP);
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xs.add(8 * j)), *a);
                    }
                }
            }
            for (i, [a0, a1, a2, a3]) in acc.iter().enumerate() {
                let s = _mm256_add_ps(_mm256_add_ps(*a0, *a1), _mm256_add_ps(*a2, *a3));
                let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
                *out.add(i * n + r) = _mm_cvtss_f32(s);
            }
        }
    }

    pub fn available() -> bool {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
        })
    }
}

/// The portable path: rows `rows` of out (M, n) = x (M, k) · wᵀ.
fn rows_scalar<F: Format>(w: &[u8], k: usize, x: &[f32], m: usize, rows: Range<usize>, out: *mut f32, n: usize) {
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
            // SAFETY: each (i, r) is written by exactly one caller; `out` holds m * n values.
            unsafe { *out.add(i * n + r) = a };
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

fn run<F: Format>(w: &[u8], n: usize, k: usize, x: &[f32], out: &mut [f32]) {
    let m = x.len() / k;
    let out = Out(out.as_mut_ptr());
    let work = |rows: Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if x86::available() {
            // At most 4 activation rows per pass over the weights keeps the accumulators in registers.
            for first in (0..m).step_by(4) {
                let xs = &x[first * k..];
                // SAFETY: the features are present; shapes were checked by `gemv`.
                unsafe {
                    let (w, o) = (w.as_ptr(), out.ptr().add(first * n));
                    match m - first {
                        1 => x86::rows::<F, 1>(w, k, xs, rows.clone(), o, n),
                        2 => x86::rows::<F, 2>(w, k, xs, rows.clone(), o, n),
                        3 => x86::rows::<F, 3>(w, k, xs, rows.clone(), o, n),
                        _ => x86::rows::<F, 4>(w, k, xs, rows.clone(), o, n),
                    }
                }
            }
            return;
        }
        rows_scalar::<F>(w, k, x, m, rows, out.ptr(), n);
    };
    // Below this many weight bytes, waking the pool costs more than it saves.
    if n * (k / GROUP) * F::BYTES < 64 * 1024 {
        work(0..n);
    } else {
        // rayon rather than candle's spinning barrier pool: under other load on the machine the
        // spinning cost 10x here (measured), and rayon's workers sleep when idle.
        use rayon::prelude::*;
        let chunk = n.div_ceil(rayon::current_num_threads() * 4).max(1);
        (0..n.div_ceil(chunk)).into_par_iter().for_each(|c| work(c * chunk..n.min((c + 1) * chunk)));
    }
}

fn bytes_of<T>(s: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain old data; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

/// out (m, n) = x (m, k) · wᵀ for a weight matrix of n rows of k. k must be a multiple of 32
/// and every slice must have its exact size; otherwise nothing is computed and the error says why.
pub fn gemv(w: Rows, n: usize, k: usize, x: &[f32], out: &mut [f32]) -> Result<(), String> {
    if k == 0 || !k.is_multiple_of(GROUP) {
        return Err(format!("gemv needs a row length that is a positive multiple of {GROUP}, got {k}"));
    }
    let m = x.len() / k;
    if x.len() != m * k || out.len() != m * n {
        return Err(format!("gemv shapes: x has {} values, out {}, for k {k} and n {n}", x.len(), out.len()));
    }
    let (bytes, expected) = match w {
        Rows::F32(s) => (bytes_of(s), n * k * 4),
        Rows::F16(s) => (bytes_of(s), n * k * 2),
        Rows::BF16(s) => (bytes_of(s), n * k * 2),
        Rows::Q4_0(b) => (b, n * k / GROUP * Q4_0::BYTES),
        Rows::Q4_1(b) => (b, n * k / GROUP * Q4_1::BYTES),
        Rows::Q8_0(b) => (b, n * k / GROUP * Q8_0::BYTES),
    };
    if bytes.len() != expected {
        return Err(format!("gemv weights: {} bytes where {n} x {k} needs {expected}", bytes.len()));
    }
    match w {
        Rows::F32(_) => run::<F32>(bytes, n, k, x, out),
        Rows::F16(_) => run::<F16>(bytes, n, k, x, out),
        Rows::BF16(_) => run::<BF16>(bytes, n, k, x, out),
        Rows::Q4_0(_) => run::<Q4_0>(bytes, n, k, x, out),
        Rows::Q4_1(_) => run::<Q4_1>(bytes, n, k, x, out),
        Rows::Q8_0(_) => run::<Q8_0>(bytes, n, k, x, out),
    }
    Ok(())
}
