//! Prompt products of bf16 weights with the activations rounded to bf16, on AMX tiles or AVX512-BF16
//! dot products where the CPU has them. Each product of two bf16 values is exact in f32, and the
//! sums are f32: the result differs from f32 activations only by the activations' rounding.
//!
//! Both kernels compute outᵀ = W · xᵀ: W's rows enter as they are stored (mapped files stay
//! untouched), and x, the small operand, is packed once per call in pairs along k, 16 tokens
//! side by side, the layout both AMX's second operand and a broadcast of W's pairs want.

use std::cell::RefCell;

use half::bf16;
use half::slice::HalfFloatSliceExt;

pub(crate) mod packed;

pub(crate) use packed::{Packed, TOKENS};

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::formats::{decode_rows, Rows};
use super::Out;

/// Which hardware runs the bf16 products on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Intel's AMX tiles (Sapphire Rapids on), with AVX512-BF16 for rows that are not whole tiles.
    Amx,
    /// AVX512-BF16 dot products (Zen 4 on, Cooper Lake on).
    Avx512,
    /// Neither: the caller multiplies in f32.
    None,
}

/// The fastest bf16 kernel this CPU (and OS, for AMX) runs, found once.
pub fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
            // GRANITE_RS_NO_AMX=1 runs the AVX512-BF16 kernel on an AMX CPU (to compare the two).
            return if std::env::var_os("GRANITE_RS_NO_AMX").is_none() && x86::amx::enable() {
                Kernel::Amx
            } else {
                Kernel::Avx512
            };
        }
        Kernel::None
    })
}

/// x (m, k) packed: rounded to bf16 in pairs along k, 16 tokens side by side.
pub(crate) fn pack(x: &[f32], k: usize) -> Packed {
    use rayon::prelude::*;
    let (m, pairs) = (x.len() / k, k / 2);
    let mut data = vec![0u32; m.div_ceil(TOKENS) * pairs * TOKENS];
    let fast = kernel() != Kernel::None;
    data.par_chunks_mut(pairs * TOKENS).enumerate().for_each(|(b, block)| {
        for (i, row) in x.chunks_exact(k).skip(b * TOKENS).take(TOKENS).enumerate() {
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has AVX512F and AVX512-BF16 (a kernel was found); the block
                // holds pairs × 16 values and i < 16.
                unsafe { x86::bf16::pack_row(row, block, i) };
                continue;
            }
            for (p, pair) in row.chunks_exact(2).enumerate() {
                block[p * TOKENS + i] = pack_pair(pair[0], pair[1]);
            }
        }
    });
    Packed { data, m, pairs }
}

/// Two values rounded to bf16 (to nearest, ties to even) in one u32, `lo` in the low half.
#[inline]
fn pack_pair(lo: f32, hi: f32) -> u32 {
    bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
}

/// out[t][col + r] for the weight rows `w` (n, k) against the packed x: the plain reference.
fn reference(w: &[bf16], k: usize, x: &Packed, out: &mut [f32], stride: usize) {
    let half = |v: u32| bf16::from_bits(v as u16).to_f32();
    for (r, row) in w.chunks_exact(k).enumerate() {
        for t in 0..x.m {
            let block = x.block(t / TOKENS);
            let mut sum = 0f32;
            for (p, pair) in row.chunks_exact(2).enumerate() {
                let v = block[p * TOKENS + t % TOKENS];
                sum += pair[0].to_f32() * half(v) + pair[1].to_f32() * half(v >> 16);
            }
            out[t * stride + r] = sum;
        }
    }
}

/// Columns of out (m, stride), from out's column 0, for the n rows of `w` (each k long): in jobs
/// of whole 32-row groups over rayon's threads, each on `kernel` (AMX for whole 16-row tiles
/// only). bf16 rows are read where they are; other formats are decoded job by job and rounded to
/// bf16 (f16 and the block formats: a relative error of at most 2⁻⁹ per weight).
pub(crate) fn gemm(kernel: Kernel, w: Rows, n: usize, k: usize, x: &Packed, out: Out, stride: usize) {
    use rayon::prelude::*;
    // Jobs of whole 32-row groups, a multiple of the threads in number, at most 256 rows each.
    let threads = rayon::current_num_threads();
    let jobs = n.div_ceil(256).div_ceil(threads) * threads;
    let rows = n.div_ceil(jobs).next_multiple_of(32).min(n);
    thread_local!(static TILE: RefCell<(Vec<f32>, Vec<bf16>)> = const { RefCell::new((Vec::new(), Vec::new())) });
    (0..n.div_ceil(rows)).into_par_iter().for_each(|j| {
        let range = j * rows..n.min((j + 1) * rows);
        // SAFETY: each job writes columns `range` of out only; out has (x.m, stride) values.
        let out = Out(unsafe { out.ptr().add(range.start) });
        TILE.with_borrow_mut(|(wide, narrow)| {
            let w = match w {
                Rows::BF16(values) => &values[range.start * k..range.end * k],
                _ => {
                    wide.resize(range.len() * k, 0.0);
                    decode_rows(w, k, range.clone(), wide);
                    narrow.resize(wide.len(), bf16::ZERO);
                    narrow.convert_from_f32_slice(wide);
                    &narrow[..]
                }
            };
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel()` returned Amx only where the CPU and OS run AMX tiles.
                Kernel::Amx if range.len().is_multiple_of(16) => unsafe { x86::amx::gemm(w, k, x, out, stride) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel()` returned Amx or Avx512 only where the CPU has AVX512F and AVX512-BF16.
                Kernel::Amx | Kernel::Avx512 => unsafe { x86::bf16::gemm(w, k, x, out, stride) },
                // SAFETY: as above, out has the rows and columns this job writes.
                _ => reference(w, k, x, unsafe { std::slice::from_raw_parts_mut(out.ptr(), x.m * stride) }, stride),
            }
        })
    });
}


#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// (w, x) of random values; n rows of w, m of x, k wide.
    fn case(n: usize, m: usize, k: usize, seed: u64) -> (Vec<bf16>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let w = (0..n * k).map(|_| bf16::from_f32(rng.random_range(-1.0..1.0))).collect();
        let x = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        (w, x)
    }

    fn run(kernel: Kernel, w: &[bf16], k: usize, x: &[f32]) -> Vec<f32> {
        let packed = pack(x, k);
        let n = w.len() / k;
        let mut out = vec![f32::NAN; packed.m * (n + 3)];
        gemm(kernel, Rows::BF16(w), n, k, &packed, Out(out.as_mut_ptr()), n + 3);
        out.chunks_exact(n + 3).flat_map(|row| row[..n].to_vec()).collect()
    }

    #[test]
    fn reference_is_the_product_of_the_rounded_values() {
        let (n, m, k) = (5, 19, 64);
        let (w, x) = case(n, m, k, 1);
        let got = run(Kernel::None, &w, k, &x);
        for t in 0..m {
            for r in 0..n {
                let exact: f64 = (0..k)
                    .map(|i| w[r * k + i].to_f64() * bf16::from_f32(x[t * k + i]).to_f64())
                    .sum();
                assert!((got[t * n + r] as f64 - exact).abs() < 1e-4, "({t}, {r}): {} vs {exact}", got[t * n + r]);
            }
        }
    }

    #[test]
    fn other_formats_enter_rounded_to_bf16() {
        let (n, m, k) = (40, 21, 64);
        let (w, x) = case(n, m, k, 6);
        let wide: Vec<f32> = w.iter().map(|v| v.to_f32() * 1.001).collect();
        let f16s: Vec<half::f16> = wide.iter().map(|&v| half::f16::from_f32(v)).collect();
        let rounded: Vec<bf16> = f16s.iter().map(|v| bf16::from_f32(v.to_f32())).collect();
        let expected = run(Kernel::None, &rounded, k, &x);
        let packed = pack(&x, k);
        let mut got = vec![f32::NAN; m * n];
        gemm(kernel(), Rows::F16(&f16s), n, k, &packed, Out(got.as_mut_ptr()), n);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()) * 8.0, "at {i}: {g} vs {e}");
        }
    }

    #[test]
    fn this_cpus_kernel_matches_the_reference() {
        // Rows: whole 32-row AMX blocks, a 16-row one, and rows that are not whole tiles; tokens:
        // several blocks, the last one partial; k: several 32-value steps.
        for (n, m, k, seed) in [(48, 37, 96, 2), (64, 16, 2048, 3), (57, 5, 32, 4), (8, 50, 128, 5)] {
            let (w, x) = case(n, m, k, seed);
            let expected = run(Kernel::None, &w, k, &x);
            let mut kernels = vec![kernel()];
            if kernel() == Kernel::Amx {
                kernels.push(Kernel::Avx512);
            }
            for kernel in kernels {
                let got = run(kernel, &w, k, &x);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f32).sqrt(), "{kernel:?} {n}x{m}x{k} at {i}: {g} vs {e}");
                }
            }
        }
    }
}
