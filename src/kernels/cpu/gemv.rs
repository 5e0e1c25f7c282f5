//! `gemv`, for decode: a few activation rows against weight matrices read once, split over
//! rayon's threads, with AVX2+FMA+F16C where the CPU has them. Several matrices stacked along the
//! output (fused q/k/v, gate/up), each in its own format and memory, run in one parallel loop.
//! - Dense f32/f16/bf16 rows are decoded to f32 and multiplied in f32.
//! - GGUF's Q4_0/Q4_1/Q8_0 blocks are multiplied as integers: each 32 activations become 15-bit
//!   integers with one f32 scale (`Split`), so a block's dot product is exact integer arithmetic,
//!   then scaled; on AVX512-VNNI 16 weight rows at a time, one per lane (`x86::lanes`). Without
//!   it, 16-bit integers (`Activations`), one row at a time. The activations' rounding error is at
//!   most 2^-15 (2^-16) of their block's largest magnitude: far below llama.cpp's 8-bit
//!   activations, near f32. With `Precision::Int8` on AVX512-VNNI, 8-bit activations as
//!   llama.cpp's (`Split::narrow`): half the products, for many rows at once.
//! - The k-quants Q4_K, Q5_K and Q6_K, where the CPU has AVX512-VNNI, against activations
//!   rounded to 8 bits per 32 (`int8::gemv_job`), as llama.cpp's and candle's are (per 256).

use std::ops::Range;

use candle_core::quantized::GgmlDType;

use super::activations::Activations;
#[cfg(target_arch = "x86_64")]
use super::activations::Split;
#[cfg(target_arch = "x86_64")]
use super::formats::evens_then_odds;
use super::formats::{checked, half_at, Blocks, Dense, Part, Rows, BF16, F16, F32, GROUP, OWN_TYPES, Q4_0, Q4_1, Q8_0};
use super::int8;
use super::precision::Precision;
#[cfg(target_arch = "x86_64")]
use super::x86::{decode, lanes, loads};
use super::Out;

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
            // Whole passes of the lane-wise kernel (16 rows).
            let chunk = piece.div_ceil(j.row_bytes.max(1)).next_multiple_of(16);
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
    let reordered = (F::EVENS_THEN_ODDS && loads::available()).then(|| evens_then_odds(x));
    move |rows: Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if loads::available() {
            let x = reordered.as_deref().unwrap_or(x);
            // At most 4 activation rows per pass over the weights keeps the accumulators in
            // registers; with more, the passes take 16 KiB of weight rows at a time, so that
            // the weights come from memory once (each row's sums are the same either way).
            let chunk = if m <= 4 { rows.len() } else { (16 * 1024 / (k / GROUP * F::BYTES)).max(1) };
            for start in rows.clone().step_by(chunk.max(1)) {
                let part = start..rows.end.min(start + chunk);
                for first in (0..m).step_by(4) {
                    let xs = &x[first * k..];
                    // SAFETY: the features are present; shapes were checked by `gemv`.
                    unsafe {
                        let (w, o) = (w.as_ptr(), out.ptr().add(first * stride));
                        match m - first {
                            1 => decode::rows::<F, 1>(w, k, xs, part.clone(), o, stride),
                            2 => decode::rows::<F, 2>(w, k, xs, part.clone(), o, stride),
                            3 => decode::rows::<F, 3>(w, k, xs, part.clone(), o, stride),
                            _ => decode::rows::<F, 4>(w, k, xs, part.clone(), o, stride),
                        }
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
pub(super) fn block_rows<B: Blocks>(
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

/// Columns of out (m, stride) from a matrix of GGUF blocks: 16 rows per lane-wise pass on
/// AVX512-VNNI (15-bit activations, 8-bit at `Precision::Int8`), else one row at a time (16-bit
/// activations).
fn block_job<'a, B: Blocks + 'a>(
    w: &'a [u8],
    k: usize,
    x: &[f32],
    out: Out,
    stride: usize,
    precision: Precision,
) -> Box<dyn Fn(Range<usize>) + Sync + 'a> {
    let (m, groups) = (x.len() / k, k / GROUP);
    #[cfg(target_arch = "x86_64")]
    if lanes::available() {
        let split = if precision == Precision::Int8 { Split::narrow } else { Split::new };
        let a = split(x, lanes::center::<B>());
        // SAFETY: the features are present; shapes were checked by `gemv`.
        return Box::new(move |rows: Range<usize>| unsafe {
            lanes::block_rows::<B>(w, groups, &a, m, rows, out, stride)
        });
    }
    let _ = precision; // 16-bit activations at every precision
    let a = Activations::new(x, B::CENTER);
    Box::new(move |rows: Range<usize>| {
        #[cfg(target_arch = "x86_64")]
        if loads::available() {
            // SAFETY: the features are present; shapes were checked by `gemv`.
            return unsafe { decode::block_rows::<B>(w, groups, &a, m, rows, out, stride) };
        }
        block_rows::<B>(w, groups, m, rows, out, stride, |row, first| dot_scalar::<B>(row, &a, first));
    })
}

/// Whether this CPU multiplies `t` weights 16 rows at a time against 15-bit activations (Q4_0,
/// Q4_1 and Q8_0 on AVX512-VNNI): each activation row's sums the same however many there are.
pub(crate) fn lanes_reads(t: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    return lanes::available() && matches!(t, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Columns of out (m, stride), from out's column 0, for the n rows (each k long) of a matrix
/// `lanes_reads` takes, as `gemv` computes them at Fast: for prompts.
pub(crate) fn lanes_product(w: Rows, n: usize, k: usize, x: &[f32], out: Out, stride: usize) {
    let b = w.bytes();
    let fast = Precision::Fast;
    let work = match w {
        Rows::Q4_0(_) => block_job::<Q4_0>(b, k, x, out, stride, fast),
        Rows::Q4_1(_) => block_job::<Q4_1>(b, k, x, out, stride, fast),
        _ => block_job::<Q8_0>(b, k, x, out, stride, fast),
    };
    split(&[Job { rows: n, row_bytes: w.row_bytes(k) * (x.len() / k), work }]);
}

/// Whether `gemv` reads weights stored as `t` on this CPU.
pub fn reads(t: GgmlDType) -> bool {
    OWN_TYPES.contains(&t) || int8::decodes(t)
}

/// out (m, Σn) = x (m, k) · [w₁; w₂; ...]ᵀ for matrices of n rows of k stacked along the output,
/// the activations entering as `precision` says. k must be a multiple of 32 and every slice must
/// have its exact size; otherwise nothing is computed and the error says why.
pub fn gemv(parts: &[Part], k: usize, x: &[f32], out: &mut [f32], precision: Precision) -> Result<(), String> {
    split(&jobs(parts, k, x, out, precision)?);
    Ok(())
}

/// Several independent `gemv` products, each (parts, x, out), in one parallel loop: a mixture of
/// experts' selected experts, each with its own rows. Each product gets what `gemv` gives it.
pub fn gemv_each<'a>(
    products: &mut [(&[Part<'a>], &'a [f32], &mut [f32])],
    k: usize,
    precision: Precision,
) -> Result<(), String> {
    let mut all = Vec::new();
    for (parts, x, out) in products.iter_mut() {
        all.extend(jobs(parts, k, x, out, precision)?);
    }
    split(&all);
    Ok(())
}

/// The jobs of one product out (m, Σn) = x (m, k) · [w₁; w₂; ...]ᵀ, after checking its shapes.
fn jobs<'a>(
    parts: &[Part<'a>],
    k: usize,
    x: &'a [f32],
    out: &mut [f32],
    precision: Precision,
) -> Result<Vec<Job<'a>>, String> {
    let stride = checked(parts, k, x, out)?;
    if let Some((Rows::Other(t, _), _)) =
        parts.iter().find(|(w, _)| matches!(w, Rows::Other(t, _) if !int8::decodes(*t)))
    {
        return Err(format!("gemv does not read {t:?} blocks on this CPU"));
    }
    let mut out = Out(out.as_mut_ptr());
    Ok(parts
        .iter()
        .map(|&(w, rows)| {
            let b = w.bytes();
            let work: Box<dyn Fn(Range<usize>) + Sync> = match w {
                Rows::F32(_) => Box::new(dense_job::<F32>(b, k, x, out, stride)),
                Rows::F16(_) => Box::new(dense_job::<F16>(b, k, x, out, stride)),
                Rows::BF16(_) => Box::new(dense_job::<BF16>(b, k, x, out, stride)),
                Rows::Q4_0(_) => block_job::<Q4_0>(b, k, x, out, stride, precision),
                Rows::Q4_1(_) => block_job::<Q4_1>(b, k, x, out, stride, precision),
                Rows::Q8_0(_) => block_job::<Q8_0>(b, k, x, out, stride, precision),
                Rows::Other(..) => Box::new(int8::gemv_job(w, k, x, out, stride)),
            };
            // SAFETY: the parts' rows add up to `stride` columns.
            out = Out(unsafe { out.ptr().add(rows) });
            Job { rows, row_bytes: w.row_bytes(k), work }
        })
        .collect())
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
                let fast = loads::available().then(|| {
                    // SAFETY: checked just before.
                    unsafe { decode::dots::<B, 1, true>(row.as_ptr(), groups, &a, [0])[0] }
                });
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
