//! The AVX2+FMA+F16C loads of the weight formats, each a leaf: 8 lanes of f32 from f32, f16 and
//! bf16 values, 16-bit integers from nibbles and bytes. Every function needs those features
//! present (`available`).

use std::arch::x86_64::*;

pub type V = __m256;

pub type I = __m256i;

/// 8 f32 from `p`.
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points at 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn load_f32(p: *const u8) -> V {
    _mm256_loadu_ps(p as *const f32)
}

/// 8 f16 from `p`, as f32.
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn load_f16(p: *const u8) -> V {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// 16 bf16 as f32: the 8 even ones, then the 8 odd ones.
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points at 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn split_bf16(p: *const u8) -> [V; 2] {
    let pairs = _mm256_loadu_si256(p as *const __m256i);
    let odds = _mm256_and_si256(pairs, _mm256_set1_epi32(0xffff_0000u32 as i32));
    [_mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), _mm256_castsi256_ps(odds)]
}

/// 16 bytes of nibbles as 16-bit integers: the low nibbles (v_0..v_15), then the high ones
/// (v_16..v_31).
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn nibbles(p: *const u8) -> [I; 2] {
    let w = _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const __m128i));
    [_mm256_and_si256(w, _mm256_set1_epi16(15)), _mm256_srli_epi16(w, 4)]
}

/// 32 signed bytes as 16-bit integers, in two halves.
/// # Safety
/// The CPU has AVX2, FMA and F16C; `p` points at 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn bytes(p: *const u8) -> [I; 2] {
    let v = |at: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(at) as *const __m128i));
    [v(0), v(16)]
}

/// Whether the CPU has AVX2, FMA and F16C.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}
