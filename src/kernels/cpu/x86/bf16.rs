//! Prompt products of bf16 weights on AVX512-BF16 dot products (Zen 4 on, Cooper Lake on), and
//! the packing of activations into bf16 pairs (`bf16::pack`).

use std::arch::x86_64::*;

use half::bf16;

use crate::kernels::cpu::bf16::packed::{scatter, Packed, TOKENS};
use crate::kernels::cpu::Out;

/// Token `i` of a packed block: `row` rounded to bf16 (to nearest even), 32 values at a time
/// into 16 pairs, stored 16 u32 apart.
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; row.len() is a multiple of 32, block holds
/// row.len() / 2 × 16 values and i < 16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn pack_row(row: &[f32], block: &mut [u32], i: usize) {
    let apart = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    for (c, values) in row.chunks_exact(32).enumerate() {
        let pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(values.as_ptr().add(16)), _mm512_loadu_ps(values.as_ptr()));
        let at = block.as_mut_ptr().add(c * 16 * TOKENS + i);
        _mm512_i32scatter_epi32::<4>(at as *mut _, apart, std::mem::transmute::<__m512bh, __m512i>(pairs));
    }
}

/// Rows × token blocks per register tile: 8 × 3 accumulators, 3 loads of x and 8
/// broadcasts of W for 24 dot products per pair.
const ROWS: usize = 8;
const BLOCKS: usize = 3;

/// # Safety
/// The CPU has AVX512F and AVX512-BF16; out has (x.m, stride) values and w's rows fit in stride.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn gemm(w: &[bf16], k: usize, x: &Packed, out: Out, stride: usize) {
    let n = w.len() / k;
    let mut r = 0;
    while r < n {
        let rows = if n - r >= ROWS { ROWS } else { 1 };
        let mut b = 0;
        while b < x.blocks() {
            let blocks = (x.blocks() - b).min(BLOCKS);
            match (rows, blocks) {
                (ROWS, 3) => tile::<ROWS, 3>(w, k, x, r, b, out, stride),
                (ROWS, 2) => tile::<ROWS, 2>(w, k, x, r, b, out, stride),
                (ROWS, _) => tile::<ROWS, 1>(w, k, x, r, b, out, stride),
                (_, 3) => tile::<1, 3>(w, k, x, r, b, out, stride),
                (_, 2) => tile::<1, 2>(w, k, x, r, b, out, stride),
                _ => tile::<1, 1>(w, k, x, r, b, out, stride),
            }
            b += blocks;
        }
        r += rows;
    }
}

/// Rows r..r + R of w against token blocks b..b + B.
/// # Safety
/// As `gemm`'s, and those rows and blocks exist.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize, const B: usize>(
    w: &[bf16],
    k: usize,
    x: &Packed,
    r: usize,
    b: usize,
    out: Out,
    stride: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    let rows: [*const u32; R] = std::array::from_fn(|i| w.as_ptr().add((r + i) * k) as *const u32);
    let blocks: [*const u32; B] = std::array::from_fn(|j| x.block(b + j).as_ptr());
    for p in 0..x.pairs {
        let xs: [__m512bh; B] = std::array::from_fn(|j| {
            // SAFETY (of the read): block b + j holds x.pairs × 16 values.
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(blocks[j].add(p * TOKENS) as *const _))
        });
        for i in 0..R {
            let pair =
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(rows[i].add(p).read_unaligned() as i32));
            for j in 0..B {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xs[j], pair);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let mut lanes = [0f32; TOKENS];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *v);
            scatter(&lanes, out, stride, (b + j) * TOKENS, x.m, r + i);
        }
    }
}
