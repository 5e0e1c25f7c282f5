//! Causal attention of a prompt, tile by tile (as FlashAttention does): a tile of queries meets
//! the keys a tile at a time, two small gemms per pair of tiles, with the softmax carried along
//! (running max and sum per query), so no (t, start + t) score matrix is ever formed.

use candle_core::{CustomOp3, Layout, Result};
use rayon::prelude::*;

use super::softmax::{exp_nonpositive, exp_row};
use super::vectorized;
use crate::kernels::dtype::{qkv_cpu_fwd, Float, QkvOp};

/// Queries per tile and keys per tile: the scores of a pair, 32 x 128 f32, stay in L1.
const QUERIES: usize = 32;
const KEYS: usize = 128;
/// The fewest queries a tile's products run with (see `attend_tile`).
const MIN_QUERIES: usize = 8;

/// (q, k, v) -> causal attention output; see `kernels::prefill_attention`.
pub(crate) struct PrefillAttention<'a> {
    /// The slot of each key position in k and v; the queries are the last positions.
    pub(crate) slots: &'a [u32],
    pub(crate) scale: f32,
}

/// One tile's running state, per query: the largest score so far, the sum of e^(score - max),
/// and the output accumulated with the same weights.
struct Tile {
    q: Vec<f32>,
    scores: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Tile {
    fn new(d: usize) -> Self {
        Self {
            q: vec![0.0; QUERIES * d],
            scores: vec![0.0; QUERIES * KEYS],
            k: vec![0.0; KEYS * d],
            v: vec![0.0; KEYS * d],
            out: vec![0.0; QUERIES * d],
            max: vec![0.0; QUERIES],
            sum: vec![0.0; QUERIES],
        }
    }
}

/// dst (m, n) = [dst +] a (m, k) · b, with a and dst row-major and b given by its strides
/// (`b_col`: from one column to the next, `b_row`: from one row to the next).
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    (b_col, b_row): (usize, usize),
    dst: &mut [f32],
    add: bool,
) {
    debug_assert!(a.len() >= m * k && dst.len() >= m * n && b.len() > (n - 1) * b_col + (k - 1) * b_row);
    // SAFETY: a holds m rows of k, dst m rows of n, and b every (row < k, column < n) at the
    // strides given (checked above in debug builds, by construction in `attend_tile`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            add,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_col as isize,
            b_row as isize,
            if add { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

vectorized! {
    /// One query's scores against a key tile, of which the first `seen` are visible: they become
    /// e^(score - max) with the query's new max, the rest 0. Returns (new max, their sum).
    fn softmax_step(row: &mut [f32], seen: usize, max: f32) -> (f32, f32) {
        exp_row(row, seen, max)
    }
}

impl PrefillAttention<'_> {
    /// Queries q0..q0 + out.len() / d of head (bi, hi) into `out`.
    #[allow(clippy::too_many_arguments)]
    fn attend_tile<T: Float>(
        &self,
        (q, ql): (&[T], &Layout),
        (k, kl): (&[T], &Layout),
        (v, vl): (&[T], &Layout),
        (bi, hi, q0): (usize, usize, usize),
        s: &mut Tile,
        out: &mut [T],
    ) -> Result<()> {
        let (_, nh, _, d) = ql.shape().dims4()?;
        let rep = nh / kl.dims()[1];
        let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
        let n = out.len() / d;
        // gemm sums the rows of a product of a few rows in another order than those of a larger
        // one: a tile of fewer queries runs as `MIN_QUERIES` (copies of its last, their results
        // dropped), so that each query gets the same bits in a tile of any size.
        let rows = n.max(MIN_QUERIES);
        // Keys before the first query (cached positions).
        let start = self.slots.len() - ql.dims()[2];
        for i in 0..rows {
            let at = ql.start_offset() + bi * qs[0] + hi * qs[1] + (q0 + i.min(n - 1)) * qs[2];
            for (f, x) in s.q[i * d..(i + 1) * d].iter_mut().zip(&q[at..at + d]) {
                *f = x.f32() * self.scale;
            }
        }
        s.max[..rows].fill(f32::NEG_INFINITY);
        s.sum[..rows].fill(0.0);
        s.out[..rows * d].fill(0.0);
        let k_at = kl.start_offset() + bi * ks[0] + (hi / rep) * ks[1];
        let v_at = vl.start_offset() + bi * vs[0] + (hi / rep) * vs[1];
        // The last query of the tile sees keys 0..=start + q0 + n - 1.
        let keys = start + q0 + n;
        for k0 in (0..keys).step_by(KEYS) {
            let m = KEYS.min(keys - k0);
            for (j, &slot) in self.slots[k0..k0 + m].iter().enumerate() {
                let (kr, vr) = (k_at + slot as usize * ks[2], v_at + slot as usize * vs[2]);
                for c in 0..d {
                    s.k[j * d + c] = k[kr + c].f32();
                    s.v[j * d + c] = v[vr + c].f32();
                }
            }
            matmul(rows, m, d, &s.q, &s.k, (d, 1), &mut s.scores, false);
            for i in 0..rows {
                // Query q0 + i sees keys up to start + q0 + i.
                let seen = (start + q0 + i.min(n - 1) + 1).saturating_sub(k0).min(m);
                let (new_max, sum) = softmax_step(&mut s.scores[i * m..(i + 1) * m], seen, s.max[i]);
                let keep = if s.max[i] == f32::NEG_INFINITY { 0.0 } else { exp_nonpositive(s.max[i] - new_max) };
                s.sum[i] = s.sum[i] * keep + sum;
                s.max[i] = new_max;
                s.out[i * d..(i + 1) * d].iter_mut().for_each(|o| *o *= keep);
            }
            matmul(rows, d, m, &s.scores, &s.v, (1, d), &mut s.out, true);
        }
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let inv = 1.0 / s.sum[i];
            for (o, a) in row.iter_mut().zip(&s.out[i * d..(i + 1) * d]) {
                *o = T::of(a * inv);
            }
        }
        Ok(())
    }
}

impl QkvOp for PrefillAttention<'_> {
    fn cpu<T: Float>(&self, q: (&[T], &Layout), k: (&[T], &Layout), v: (&[T], &Layout)) -> Result<Vec<T>> {
        let (b, nh, t, d) = q.1.shape().dims4()?;
        let mut out = vec![T::of(0.0); b * nh * t * d];
        // Heads, and tiles of queries within them, in parallel: later tiles see more keys.
        out.par_chunks_mut(t * d).enumerate().try_for_each(|(bh, head)| {
            head.par_chunks_mut(QUERIES * d).enumerate().try_for_each_init(
                || Tile::new(d),
                |s, (tile, o)| self.attend_tile(q, k, v, (bh / nh, bh % nh, tile * QUERIES), s, o),
            )
        })?;
        Ok(out)
    }
}

impl CustomOp3 for PrefillAttention<'_> {
    fn name(&self) -> &'static str {
        "granite-prefill-attention"
    }

    qkv_cpu_fwd!();
}
