//! `gemm`, for prompts: every format but f32 on the bf16 kernels where the CPU has them (Fast),
//! GGUF block types on the int8 kernel if asked (Int8); otherwise tiles of each weight matrix decoded to
//! f32, then candle's gemm.

use candle_core::quantized::GgmlDType;

use super::bf16::{self, Kernel};
use super::formats::{checked, decode_rows, Part, Rows, OWN_TYPES};
use super::gemv::{lanes_product, lanes_reads};
use super::int8::{self, Quantized};
use super::precision::Precision;
use super::Out;

/// Block types whose prompts run here even without a bf16 kernel, as decoded tiles, beside
/// `OWN_TYPES`: candle's quantized matmul has no fast path for these (Granite-shaped Q5_K_M,
/// 512-token prompt: 112 -> 198 tokens/s), where for Q4_K and Q6_K it beats the tiles (371
/// against 214).
const TILED: [GgmlDType; 3] = [GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q5K];

/// Whether a prompt's product with weights stored as `t` runs here at `precision`, on this CPU;
/// the others go to candle's matmul (dense weights) or quantized matmul (the other k-quants).
/// The one place that chooses a prompt's product.
pub fn reads(t: GgmlDType, precision: Precision) -> bool {
    let bf16 = precision != Precision::Exact && bf16::kernel() != Kernel::None;
    bf16 || OWN_TYPES.contains(&t) || TILED.contains(&t) || precision == Precision::Int8 && int8::reads(t)
}

/// Whether `gemm` gives each row of a prompt multiplied by a `t` matrix the same bits however
/// many rows it multiplies at once: the int8 and bf16 kernels do; gemm's f32 tiles (f32 rows,
/// or `Precision::Exact`), whose blocking depends on the row count, do not.
pub fn rows_independent(t: GgmlDType, precision: Precision) -> bool {
    let integers = precision == Precision::Int8 && int8::reads(t) || lanes(t, precision);
    let bf16 = precision != Precision::Exact && bf16::kernel() != Kernel::None;
    t != GgmlDType::F32 && (integers || bf16)
}

/// Whether a Fast prompt's product with `t` weights runs on decode's lane-wise kernel: Q4_0, Q4_1
/// and Q8_0 on AVX512-VNNI without AMX, where it is faster than the bf16 kernel (Zen 5, 2
/// threads, 8 rows: 260 G multiply-adds/s against 151 G) and its 15-bit activations finer.
fn lanes(t: GgmlDType, precision: Precision) -> bool {
    precision == Precision::Fast && bf16::kernel() != Kernel::Amx && lanes_reads(t)
}

/// `gemv` for many activation rows (a prompt). When `precision` is Int8 and the CPU has the int8
/// kernel, block matrices it reads are multiplied against x rounded to 8 bits (`int8::gemm`);
/// when Fast or Int8 and the CPU has a bf16 kernel, the other matrices but f32 ones at bf16
/// against x rounded to bf16 (`bf16::gemm`); the others in tiles of rows, each small enough to stay in cache, decoded to f32 and
/// multiplied by gemm, the tiles split over rayon's threads.
///
/// x's rows are those of `spans` (row counts, one span after another): each row's result is
/// what its span gives alone. The int8 and bf16 kernels sum every row in one order whatever
/// the others; gemm's order can depend on the row count, so it runs span by span.
pub fn gemm(
    parts: &[Part],
    k: usize,
    x: &[f32],
    out: &mut [f32],
    precision: Precision,
    spans: &[usize],
) -> Result<(), String> {
    let stride = checked(parts, k, x, out)?;
    if spans.iter().sum::<usize>() * k != x.len() {
        return Err(format!("gemm: spans of {spans:?} rows for {} rows", x.len() / k.max(1)));
    }
    let kernel = if precision == Precision::Exact { Kernel::None } else { bf16::kernel() };
    let integers = precision == Precision::Int8 && int8::available();
    let (mut packed, mut quantized) = (None, None);
    let mut out = Out(out.as_mut_ptr());
    for &(w, n) in parts {
        match w {
            Rows::F32(_) => gemm_part(w, n, k, x, out, stride, spans),
            _ if lanes(w.format(), precision) => lanes_product(w, n, k, x, out, stride),
            _ if integers && int8::reads(w.format()) => {
                int8::gemm(w, n, k, quantized.get_or_insert_with(|| Quantized::new(x, k)), out, stride)
            }
            _ if kernel == Kernel::None => gemm_part(w, n, k, x, out, stride, spans),
            _ => bf16::gemm(kernel, w, n, k, packed.get_or_insert_with(|| bf16::pack(x, k)), out, stride),
        }
        // SAFETY: the parts' rows add up to `stride` columns.
        out = Out(unsafe { out.ptr().add(n) });
    }
    Ok(())
}

/// Columns of out (m, stride) from one checked matrix of n rows, span by span.
fn gemm_part(w: Rows, n: usize, k: usize, x: &[f32], out: Out, stride: usize, spans: &[usize]) {
    use rayon::prelude::*;
    // Tiles of at most 256 KiB of f32, as many as a multiple of the threads, of a multiple of 48
    // rows (whole blocks of gemm's 16 x 6 kernel either way round).
    let threads = rayon::current_num_threads();
    let tiles = n.div_ceil((64 * 1024 / k).max(48)).div_ceil(threads) * threads;
    let tile = n.div_ceil(tiles).next_multiple_of(48).min(n);
    thread_local!(static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) });
    (0..n.div_ceil(tile)).into_par_iter().for_each(|t| {
        TILE.with_borrow_mut(|buf| {
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
            let mut first = 0;
            for &m in spans {
                // SAFETY: x is (Σspans, k) and the tile (rows, k), row-major; out (Σspans, stride)
                // row-major, of which this tile writes columns `rows` only, this span rows
                // first..first + m only.
                unsafe {
                    gemm::gemm(
                        m,
                        rows.len(),
                        k,
                        out.ptr().add(first * stride + rows.start),
                        1,
                        stride as isize,
                        false,
                        x.as_ptr().add(first * k),
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
                first += m;
            }
        })
    });
}
