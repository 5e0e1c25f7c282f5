//! Prompt products: weights read as stored (mapped files stay untouched) and decoded job by job
//! into tiles of 4 rows side by side, the integers u of a group of 32 in one piece per row: the
//! form the kernel broadcasts 4 at a time against 16 tokens' 4 activations.

use std::cell::RefCell;

use super::{decode_block, round_group, Format, Rows, GROUP};
use crate::kernels::cpu::Out;

/// Tokens side by side: one 512-bit register of i32.
const TOKENS: usize = 16;
/// Rows side by side in a tile: the kernel's register rows.
const ROWS: usize = 4;
/// Groups of 32 decoded and multiplied at a time (kept in L2 with their activations).
const CHUNK: usize = 64;

/// Groups g0..g0 + groups of rows r0.. (up to ROWS of them, zero past the matrix) into the tile
/// at `panel`: u as [group][row][32], a and b as [group][half][row].
struct Tile {
    u: Vec<u8>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Tile {
    const fn new() -> Self {
        Self { u: Vec::new(), a: Vec::new(), b: Vec::new() }
    }

    /// Rows `rows` of w (row length k) at groups `groups`, as panels of ROWS rows.
    fn decode(&mut self, format: Format, bytes: &[u8], k: usize, rows: std::ops::Range<usize>, groups: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::cpu::avx2() {
            /// # Safety
            /// The CPU has AVX2.
            #[target_feature(enable = "avx2")]
            unsafe fn fast(t: &mut Tile, f: Format, bytes: &[u8], k: usize, rows: std::ops::Range<usize>, groups: std::ops::Range<usize>) {
                t.decode_with(f, bytes, k, rows, groups)
            }
            // SAFETY: the feature is present.
            return unsafe { fast(self, format, bytes, k, rows, groups) };
        }
        self.decode_with(format, bytes, k, rows, groups)
    }

    #[inline(always)]
    fn decode_with(&mut self, format: Format, bytes: &[u8], k: usize, rows: std::ops::Range<usize>, groups: std::ops::Range<usize>) {
        let (panels, count, halves) = (rows.len().div_ceil(ROWS), groups.len(), format.halves());
        self.u.clear();
        self.u.resize(panels * count * ROWS * GROUP, 0);
        self.a.clear();
        self.a.resize(panels * count * halves * ROWS, 0.0);
        self.b.clear();
        self.b.resize(panels * count * halves * ROWS, 0.0);
        let (size, block_bytes) = format.block();
        let per_block = size / GROUP;
        let row_bytes = k / size * block_bytes;
        let (mut u, mut a, mut b) = ([0u8; 256], [0f32; 16], [0f32; 16]);
        for (i, r) in rows.enumerate() {
            let (p, row) = (i / ROWS, i % ROWS);
            let first = groups.start / per_block;
            for blk in first..groups.end.div_ceil(per_block) {
                let at = r * row_bytes + blk * block_bytes;
                decode_block(format, &bytes[at..at + block_bytes], &mut u, &mut a, &mut b);
                for s in 0..per_block {
                    let g = blk * per_block + s;
                    if !groups.contains(&g) {
                        continue;
                    }
                    let c = p * count + g - groups.start;
                    self.u[(c * ROWS + row) * GROUP..][..GROUP].copy_from_slice(&u[s * GROUP..][..GROUP]);
                    for h in 0..halves {
                        self.a[(c * halves + h) * ROWS + row] = a[s * halves + h];
                        self.b[(c * halves + h) * ROWS + row] = b[s * halves + h];
                    }
                }
            }
        }
    }
}

/// x (m, k) as 8-bit integers, 16 tokens side by side: q as [block][group][quad][token] of u32
/// (4 activations of one token), d as [block][group][token], and d·Σq per group ([block][group]
/// [token]) and per half group ([block][group][half][token]). Tokens past m are zero.
pub(crate) struct Quantized {
    q: Vec<u32>,
    d: Vec<f32>,
    sum: Vec<f32>,
    halves: Vec<f32>,
    m: usize,
    groups: usize,
}

impl Quantized {
    pub(crate) fn new(x: &[f32], k: usize) -> Self {
        use rayon::prelude::*;
        let (m, groups) = (x.len() / k, k / GROUP);
        let blocks = m.div_ceil(TOKENS);
        let mut q = vec![0u32; blocks * groups * 8 * TOKENS];
        let mut d = vec![0f32; blocks * groups * TOKENS];
        let mut sum = vec![0f32; blocks * groups * TOKENS];
        let mut halves = vec![0f32; blocks * groups * 2 * TOKENS];
        q.par_chunks_mut(groups * 8 * TOKENS)
            .zip(d.par_chunks_mut(groups * TOKENS))
            .zip(sum.par_chunks_mut(groups * TOKENS).zip(halves.par_chunks_mut(groups * 2 * TOKENS)))
            .enumerate()
            .for_each(|(blk, ((q, d), (sum, halves)))| {
                for (t, row) in x.chunks_exact(k).skip(blk * TOKENS).take(TOKENS).enumerate() {
                    for (g, xs) in row.chunks_exact(GROUP).enumerate() {
                        let (ints, scale) = round_group(xs.try_into().expect("whole groups"));
                        for quad in 0..8 {
                            let bytes: [u8; 4] = std::array::from_fn(|j| ints[4 * quad + j] as u8);
                            q[(g * 8 + quad) * TOKENS + t] = u32::from_le_bytes(bytes);
                        }
                        let half = |h: usize| ints[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum::<i32>() as f32 * scale;
                        let (first, second) = (half(0), half(1));
                        d[g * TOKENS + t] = scale;
                        halves[(g * 2) * TOKENS + t] = first;
                        halves[(g * 2 + 1) * TOKENS + t] = second;
                        sum[g * TOKENS + t] = first + second;
                    }
                }
            });
        Self { q, d, sum, halves, m, groups }
    }

    fn blocks(&self) -> usize {
        self.m.div_ceil(TOKENS)
    }
}

/// Columns of out (m, stride), from out's column 0, for the n rows of `w` (each k long), in jobs
/// of whole tiles over rayon's threads. `w` must be a type `reads` takes, k a multiple of its
/// block, and the CPU `available()`.
pub(crate) fn gemm(w: Rows, n: usize, k: usize, x: &Quantized, out: Out, stride: usize) {
    use rayon::prelude::*;
    let format = Format::of(w.format()).expect("int8::gemm of a format it reads");
    let threads = rayon::current_num_threads();
    let jobs = n.div_ceil(128).div_ceil(threads) * threads;
    let rows = n.div_ceil(jobs).next_multiple_of(ROWS).min(n.next_multiple_of(ROWS));
    thread_local!(static BUFFERS: RefCell<(Tile, Vec<f32>)> = const { RefCell::new((Tile::new(), Vec::new())) });
    (0..n.div_ceil(rows)).into_par_iter().for_each(|j| {
        let range = j * rows..n.min((j + 1) * rows);
        BUFFERS.with_borrow_mut(|(tile, sums)| {
            let width = x.blocks() * TOKENS;
            sums.clear();
            sums.resize(range.len().next_multiple_of(ROWS) * width, 0.0);
            for g0 in (0..x.groups).step_by(CHUNK) {
                let groups = g0..x.groups.min(g0 + CHUNK);
                tile.decode(format, w.bytes(), k, range.clone(), groups.clone());
                let view = View { tile, halves: format.halves(), panels: range.len().div_ceil(ROWS), groups };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked `available()`; sums holds the view's rows × width.
                unsafe {
                    avx512::run(&view, x, sums)
                };
                #[cfg(not(target_arch = "x86_64"))]
                reference(&view, x, sums);
            }
            for t in 0..x.m {
                for (i, c) in range.clone().enumerate() {
                    // SAFETY: out has (m, stride) values; this job alone writes its columns `range`.
                    unsafe { *out.ptr().add(t * stride + c) = sums[i * width + t] };
                }
            }
        })
    });
}

/// One job's decoded tile at one chunk of groups.
struct View<'a> {
    tile: &'a Tile,
    /// Scales per group.
    halves: usize,
    panels: usize,
    groups: std::ops::Range<usize>,
}

#[cfg_attr(target_arch = "x86_64", allow(dead_code))] // the kernel's test reference there
/// The plain reference of the kernel: the same sums, one at a time, added to sums [tile row]
/// [token] (x.blocks() × 16 tokens wide).
fn reference(view: &View, x: &Quantized, sums: &mut [f32]) {
    let (tile, halves, count, width) = (view.tile, view.halves, view.groups.len(), x.blocks() * TOKENS);
    for i in 0..view.panels * ROWS {
        let (p, row) = (i / ROWS, i % ROWS);
        for t in 0..x.m {
            let (blk, lane) = (t / TOKENS, t % TOKENS);
            let mut acc = 0f32;
            for (c, g) in view.groups.clone().enumerate() {
                let at = (blk * x.groups + g) * TOKENS + lane;
                for h in 0..halves {
                    let width = GROUP / halves;
                    let mut ints = 0i32;
                    for j in h * width..(h + 1) * width {
                        let quad = x.q[((blk * x.groups + g) * 8 + j / 4) * TOKENS + lane].to_le_bytes();
                        ints += tile.u[((p * count + c) * ROWS + row) * GROUP + j] as i32 * quad[j % 4] as i8 as i32;
                    }
                    let s = ((p * count + c) * halves + h) * ROWS + row;
                    let sum = if halves == 1 { x.sum[at] } else { x.halves[(blk * x.groups + g) * 2 * TOKENS + h * TOKENS + lane] };
                    acc += tile.a[s] * x.d[at] * ints as f32 + tile.b[s] * sum;
                }
            }
            sums[i * width + t] += acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Quantized, View, GROUP, ROWS, TOKENS};

    /// Token blocks per register tile: 4 rows × 3 blocks of accumulators (f32) and of integer sums.
    const BLOCKS: usize = 3;

    /// `super::reference`, on registers of 16 tokens.
    /// # Safety
    /// The CPU has AVX512F and AVX512-VNNI; sums holds the view's panels × 4 rows of x.blocks() × 16.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn run(view: &View, x: &Quantized, sums: &mut [f32]) {
        let panels = view.panels;
        let mut b = 0;
        while b < x.blocks() {
            let blocks = (x.blocks() - b).min(BLOCKS);
            for p in 0..panels {
                match (blocks, view.halves) {
                    (3, 1) => tile::<3, 1>(view, x, p, b, sums),
                    (2, 1) => tile::<2, 1>(view, x, p, b, sums),
                    (_, 1) => tile::<1, 1>(view, x, p, b, sums),
                    (3, _) => tile::<3, 2>(view, x, p, b, sums),
                    (2, _) => tile::<2, 2>(view, x, p, b, sums),
                    _ => tile::<1, 2>(view, x, p, b, sums),
                }
            }
            b += blocks;
        }
    }

    /// Panel p's rows against token blocks b..b + B, over the view's groups; H scales per group.
    /// # Safety
    /// As `run`'s, and those blocks exist.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn tile<const B: usize, const H: usize>(view: &View, x: &Quantized, p: usize, b: usize, sums: &mut [f32]) {
        let (tile, count) = (view.tile, view.groups.len());
        let mut acc = [[_mm512_setzero_ps(); B]; ROWS];
        let quads = 8 / H;
        for (c, g) in view.groups.clone().enumerate() {
            let u = tile.u.as_ptr().add((p * count + c) * ROWS * GROUP) as *const u32;
            for h in 0..H {
                let mut ints = [[_mm512_setzero_si512(); B]; ROWS];
                for quad in h * quads..(h + 1) * quads {
                    let xs: [__m512i; B] = std::array::from_fn(|j| {
                        _mm512_loadu_si512(x.q.as_ptr().add(((b + j) * x.groups + g) * 8 * TOKENS + quad * TOKENS) as *const _)
                    });
                    for (r, ints) in ints.iter_mut().enumerate() {
                        let w = _mm512_set1_epi32(u.add(r * GROUP / 4 + quad).read() as i32);
                        for j in 0..B {
                            ints[j] = _mm512_dpbusd_epi32(ints[j], w, xs[j]);
                        }
                    }
                }
                let s = ((p * count + c) * H + h) * ROWS;
                for j in 0..B {
                    let at = ((b + j) * x.groups + g) * TOKENS;
                    let d = _mm512_loadu_ps(x.d.as_ptr().add(at));
                    let sum = if H == 1 { x.sum.as_ptr().add(at) } else { x.halves.as_ptr().add(2 * at + h * TOKENS) };
                    let sum = _mm512_loadu_ps(sum);
                    for r in 0..ROWS {
                        let scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(ints[r][j]), d);
                        acc[r][j] = _mm512_fmadd_ps(scaled, _mm512_set1_ps(*tile.a.get_unchecked(s + r)), acc[r][j]);
                        acc[r][j] = _mm512_fmadd_ps(sum, _mm512_set1_ps(*tile.b.get_unchecked(s + r)), acc[r][j]);
                    }
                }
            }
        }
        let width = x.blocks() * TOKENS;
        for (r, row) in acc.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                let at = sums.as_mut_ptr().add((p * ROWS + r) * width + (b + j) * TOKENS);
                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), *v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    use super::super::testing::{matrix, rows, FORMATS};
    use super::super::available;

    #[test]
    fn tiles_decode_to_candles_values() {
        for format in FORMATS {
            let (n, k) = (6, 512);
            let (bytes, expected) = matrix(format, n, k, 1);
            let f = Format::of(format).unwrap();
            let mut tile = Tile::new();
            tile.decode(f, &bytes, k, 0..n, 0..k / GROUP);
            let (count, halves) = (k / GROUP, f.halves());
            for r in 0..n {
                for i in 0..k {
                    let (p, row, g, j) = (r / ROWS, r % ROWS, i / GROUP, i % GROUP);
                    let s = ((p * count + g) * halves + j * halves / GROUP) * ROWS + row;
                    let u = tile.u[((p * count + g) * ROWS + row) * GROUP + j] as f32;
                    let got = tile.a[s] * u + tile.b[s];
                    let want = expected[r * k + i];
                    assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "{format:?} ({r}, {i}): {got} vs {want}");
                }
            }
        }
    }

    /// The quantized activations as f32 (q·d), for the f64 product.
    fn dequantized(x: &Quantized, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.m * k];
        for t in 0..x.m {
            let (blk, lane) = (t / TOKENS, t % TOKENS);
            for i in 0..k {
                let (g, j) = (i / GROUP, i % GROUP);
                let quad = x.q[((blk * x.groups + g) * 8 + j / 4) * TOKENS + lane].to_le_bytes();
                out[t * k + i] = quad[j % 4] as i8 as f32 * x.d[(blk * x.groups + g) * TOKENS + lane];
            }
        }
        out
    }

    #[test]
    fn activations_round_to_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let (m, k) = (21, 96);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
        let q = Quantized::new(&x, k);
        let back = dequantized(&q, k);
        for (t, (row, back)) in x.chunks(GROUP).zip(back.chunks(GROUP)).enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (v, b) in row.iter().zip(back) {
                assert!((v - b).abs() <= max / 254.0 * 1.0001, "group {t}: {v} vs {b}");
            }
        }
        // A NaN or an infinity makes its group's scale NaN, and only that group's.
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = x.clone();
            x[k + 40] = bad;
            let q = Quantized::new(&x, k);
            let scale = |t: usize, g: usize| q.d[((t / TOKENS) * q.groups + g) * TOKENS + t % TOKENS];
            assert!(scale(1, 1).is_nan() && scale(1, 0).is_finite() && scale(0, 1).is_finite(), "{bad}");
        }
    }

    /// out for every token and row, by the kernel (or the reference), from column 0 of a wider out.
    fn product(w: Rows, n: usize, k: usize, x: &Quantized, kernel: bool) -> Vec<f32> {
        let stride = n + 3;
        let mut out = vec![f32::NAN; x.m * stride];
        if kernel {
            gemm(w, n, k, x, Out(out.as_mut_ptr()), stride);
        } else {
            let format = Format::of(w.format()).unwrap();
            let (mut tile, width) = (Tile::new(), x.blocks() * TOKENS);
            let mut sums = vec![0f32; n.next_multiple_of(ROWS) * width];
            for g0 in (0..x.groups).step_by(CHUNK) {
                let groups = g0..x.groups.min(g0 + CHUNK);
                tile.decode(format, w.bytes(), k, 0..n, groups.clone());
                let view = View { tile: &tile, halves: format.halves(), panels: n.div_ceil(ROWS), groups };
                reference(&view, x, &mut sums);
            }
            for t in 0..x.m {
                for r in 0..n {
                    out[t * stride + r] = sums[r * width + t];
                }
            }
        }
        out.chunks_exact(stride).flat_map(|row| row[..n].to_vec()).collect()
    }

    #[test]
    fn kernel_and_reference_are_the_product_of_the_decoded_values() {
        // Rows: whole panels and a partial one; tokens: a partial block and several triples;
        // k: one chunk of groups and several (2560 = 80 groups).
        for (n, m, k, seed) in [(8, 5, 256, 3), (13, 37, 512, 4), (20, 50, 2560, 5)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let q = Quantized::new(&x, k);
            let xs = dequantized(&q, k);
            for format in FORMATS {
                let (bytes, w) = matrix(format, n, k, seed + 10);
                let w_rows = rows(format, &bytes);
                let mut runs = vec![("reference", product(w_rows, n, k, &q, false))];
                if available() {
                    runs.push(("kernel", product(w_rows, n, k, &q, true)));
                }
                for (name, got) in runs {
                    for t in 0..m {
                        for r in 0..n {
                            let exact: f64 = (0..k).map(|i| w[r * k + i] as f64 * xs[t * k + i] as f64).sum();
                            let g = got[t * n + r] as f64;
                            assert!((g - exact).abs() < 1e-4 * (k as f64).sqrt(), "{name} {format:?} {n}x{m}x{k} ({t}, {r}): {g} vs {exact}");
                        }
                    }
                }
            }
        }
    }
}

