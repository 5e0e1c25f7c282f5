//! `gemm`, for prompts: tiles of each weight matrix decoded to f32, then candle's gemm.

use super::formats::{checked, decode_rows, Part, Rows};
use super::Out;

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
        })
    });
}
