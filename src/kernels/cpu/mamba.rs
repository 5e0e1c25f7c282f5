//! Mamba2's recurrences over one sequence's f32 rows: the causal depthwise convolution (then
//! SiLU) continuing a window of past inputs, the selective state-space scan continuing an SSM
//! state, and the gated RMSNorm of its output. Prompt and decode run the same token-by-token
//! arithmetic, each head in a fixed order, so a sequence's result does not depend on how its
//! tokens are split between forwards or on what else runs beside it.

use rayon::prelude::*;

use super::attention::dot;
use super::swiglu::silu;
use super::vectorized;

/// The convolution: `weight` (channels, kernel), `bias` (channels,).
pub struct Conv<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub kernel: usize,
}

impl Conv<'_> {
    pub fn channels(&self) -> usize {
        self.bias.len()
    }

    /// Values in a window: the kernel - 1 inputs before the next one.
    pub fn window_len(&self) -> usize {
        (self.kernel - 1) * self.channels()
    }

    /// In t rows of `stride` values, the `channels()` values from `at` on of row i become
    /// silu(bias + Σ_j weight[j] · input[i + j - (kernel - 1)]), where the inputs before the
    /// rows come from `window` ((kernel - 1, channels), oldest first), which then holds the last
    /// kernel - 1 inputs; `before_last`, if given, gets the window before the last row.
    pub fn forward(
        &self,
        rows: &mut [f32],
        stride: usize,
        at: usize,
        window: &mut [f32],
        before_last: Option<&mut [f32]>,
    ) {
        let (c, k) = (self.channels(), self.kernel);
        let t = rows.len() / stride;
        // The window, then the rows' inputs, `c` values each.
        let mut inputs = window.to_vec();
        inputs.extend(rows.chunks_exact(stride).flat_map(|row| &row[at..at + c]));
        for (i, row) in rows.chunks_exact_mut(stride).enumerate() {
            let taps_in = &inputs[i * c..(i + k) * c];
            for (ch, out) in row[at..at + c].iter_mut().enumerate() {
                let taps = &self.weight[ch * k..(ch + 1) * k];
                let sum = taps.iter().enumerate().fold(self.bias[ch], |s, (j, w)| s + w * taps_in[j * c + ch]);
                *out = silu(sum);
            }
        }
        if let Some(dst) = before_last {
            dst.copy_from_slice(&inputs[(t - 1) * c..(t - 2 + k) * c]);
        }
        window.copy_from_slice(&inputs[t * c..]);
    }
}

/// The state-space model: per head `a` (= -exp(A_log)), `d` and `dt_bias`.
pub struct Ssm<'a> {
    pub a: &'a [f32],
    pub d: &'a [f32],
    pub dt_bias: &'a [f32],
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    /// Δ is clamped to this range (transformers clamps a prompt's Δ, not a decode step's).
    pub dt_limit: Option<(f32, f32)>,
}

/// torch's softplus: log(1 + e^x), x itself above 20.
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

impl Ssm<'_> {
    pub fn heads(&self) -> usize {
        self.a.len()
    }

    /// Values in one sequence's state: (heads, head_dim, state).
    pub fn state_len(&self) -> usize {
        self.heads() * self.head_dim * self.state
    }

    /// One sequence's t tokens. Per token, head h (of group g), with Δ = softplus(dt + dt_bias):
    /// s = exp(Δ·a)·s + (Δ·B_g)·x_h, y_h = s·C_g + d·x_h. `xbc` rows (`stride` apart) hold x
    /// (heads · head_dim), B and C (groups · state each); `dt` rows (`dt_stride` apart) one value
    /// per head. `state` is updated, or with `from`, written from the state `from` (each head
    /// copied where it is used, rather than the whole state first); `y` (t, heads · head_dim)
    /// written; `before_last`, if given, gets the state after t - 1 tokens.
    #[allow(clippy::too_many_arguments)]
    pub fn scan(
        &self,
        xbc: &[f32],
        stride: usize,
        dt: &[f32],
        dt_stride: usize,
        from: Option<&[f32]>,
        state: &mut [f32],
        y: &mut [f32],
        mut before_last: Option<&mut [f32]>,
    ) {
        let (heads, hd, n) = (self.heads(), self.head_dim, self.state);
        let inner = heads * hd;
        let t = y.len() / inner;
        let per_group = heads / self.groups;
        let head_state = hd * n;
        // Per head: its outputs (t, head_dim) and, if asked, its state before the last token.
        let outputs: Vec<(Vec<f32>, Option<Vec<f32>>)> = state
            .par_chunks_mut(head_state)
            .enumerate()
            .map(|(h, s)| {
                if let Some(from) = from {
                    s.copy_from_slice(&from[h * head_state..][..head_state]);
                }
                let g = h / per_group;
                let mut out = vec![0f32; t * hd];
                let mut db = vec![0f32; n];
                let mut kept = None;
                for i in 0..t {
                    if i + 1 == t && before_last.is_some() {
                        kept = Some(s.to_vec());
                    }
                    let row = &xbc[i * stride..];
                    let (x, b, c) = (
                        &row[h * hd..(h + 1) * hd],
                        &row[inner + g * n..][..n],
                        &row[inner + (self.groups + g) * n..][..n],
                    );
                    let mut delta = softplus(dt[i * dt_stride + h] + self.dt_bias[h]);
                    if let Some((lo, hi)) = self.dt_limit {
                        delta = delta.clamp(lo, hi);
                    }
                    let decay = (delta * self.a[h]).exp();
                    step(s, x, b, c, [delta, decay, self.d[h]], &mut db, &mut out[i * hd..(i + 1) * hd]);
                }
                (out, kept)
            })
            .collect();
        for (h, (out, kept)) in outputs.into_iter().enumerate() {
            for (row, o) in y.chunks_exact_mut(inner).zip(out.chunks_exact(hd)) {
                row[h * hd..(h + 1) * hd].copy_from_slice(o);
            }
            if let (Some(dst), Some(kept)) = (before_last.as_deref_mut(), kept) {
                dst[h * head_state..(h + 1) * head_state].copy_from_slice(&kept);
            }
        }
    }
}

vectorized! {
    /// One token of one head, coef = [Δ, decay, d]: each row s_p of the state (one per x_p)
    /// becomes s_p·decay + (Δ·B)·x_p, and out_p = s_p·C + d·x_p.
    fn step(s: &mut [f32], x: &[f32], b: &[f32], c: &[f32], coef: [f32; 3], db: &mut [f32], out: &mut [f32]) {
        let [delta, decay, d] = coef;
        for (v, bv) in db.iter_mut().zip(b) {
            *v = delta * bv;
        }
        for ((sp, &xp), o) in s.chunks_exact_mut(b.len()).zip(x).zip(out) {
            for (sv, &dbv) in sp.iter_mut().zip(&*db) {
                *sv = *sv * decay + dbv * xp;
            }
            *o = dot(sp, c) + d * xp;
        }
    }
}

/// Each row of y (rows of `weight.len()`) becomes weight · rmsnorm(y · silu(z)), the norm over
/// each of `groups` equal parts of the row; z rows are `z_stride` apart.
pub fn gated_rms_norm(y: &mut [f32], z: &[f32], z_stride: usize, weight: &[f32], groups: usize, eps: f32) {
    let width = weight.len();
    let part = width / groups;
    for (row, z) in y.chunks_exact_mut(width).zip(z.chunks(z_stride)) {
        for (v, &g) in row.iter_mut().zip(z) {
            *v *= silu(g);
        }
        for (vs, ws) in row.chunks_exact_mut(part).zip(weight.chunks_exact(part)) {
            let mean = vs.iter().map(|v| v * v).sum::<f32>() / part as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for (v, w) in vs.iter_mut().zip(ws) {
                *v = w * (*v * scale);
            }
        }
    }
}
