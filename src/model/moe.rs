//! A mixture of experts as Granite's MoE models have it (transformers' GraniteMoeMoE): a linear
//! router, the top k of its logits per token, softmax over those k as the weights, each expert a
//! gated MLP, their outputs weighted and summed in expert order. A token reads only its k
//! experts' matrices; the tokens routed to one expert go through it together, each span's as its
//! own span, so that a span gets what it gets alone.

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};

use crate::config::{Activation, Experts, GraniteConfig};
use crate::error::Result;
use crate::kernels::cpu::swiglu::swiglu_row;
use crate::kernels::cpu::Precision;
use crate::loading::safetensors::Weights;
use crate::model::linear::{Linear, PackedRows, GEMV_MAX_ROWS};
use crate::model::mlp::Mlp;

/// With weights in these formats, an expert's share of a span of up to `EXPERT_DECODE_ROWS` rows
/// runs as decode (`gemv`: integer products, each weight read once for all the rows), not as a
/// prompt, whose product first converts the expert's small matrices for as few as 9 rows.
/// Measured on an h-tiny-shaped model, 2 Zen 4 threads: Q8_0 prefill of 512 tokens 34 -> 52
/// tok/s, of 2048 even; with Q4_K_M (VNNI) 52 -> 47, so the k-quants keep the usual threshold.
const INTEGER_BLOCKS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
const EXPERT_DECODE_ROWS: usize = 128;

pub(crate) struct Moe {
    /// (experts, hidden): one logit per expert.
    router: Linear,
    experts: Vec<Mlp>,
    per_token: usize,
    /// A span's rows routed to one expert run as decode up to this many.
    decode_rows: usize,
}

impl Moe {
    /// `{prefix}.router.layer`, and the experts stacked in `{prefix}.input_linear` (E, 2I, H; or
    /// split, as `gate_linear` and `up_linear`, (E, I, H) each) and `{prefix}.output_linear` (E, H, I).
    pub(crate) fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig, e: Experts) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, e.intermediate);
        let linear = |m| Linear::new(m, None, w.precision());
        let stack = |name: &str, shape| w.stacked_matrices(&format!("{prefix}.{name}.weight"), e.count, shape);
        let gate_up = if w.contains(&format!("{prefix}.gate_linear.weight")) {
            let (gate, up) = (stack("gate_linear", [inter, hidden])?, stack("up_linear", [inter, hidden])?);
            gate.into_iter()
                .zip(up)
                .map(|(g, u)| Linear::stack(vec![linear(g), linear(u)]))
                .collect::<Result<Vec<_>>>()?
        } else {
            stack("input_linear", [2 * inter, hidden])?.into_iter().map(linear).collect()
        };
        let down = stack("output_linear", [hidden, inter])?;
        let act = cfg.activation()?;
        let experts: Vec<Mlp> =
            gate_up.into_iter().zip(down).map(|(gu, d)| Mlp::from_parts(gu, linear(d), act)).collect();
        let integer = experts
            .iter()
            .flat_map(Mlp::projections)
            .flat_map(Linear::weights)
            .all(|w| w.stored_type().is_some_and(|t| INTEGER_BLOCKS.contains(&t)));
        // matmul_precision="int8" asks for its own prompt products.
        let decode_rows = if integer && w.precision() != Precision::Int8 { EXPERT_DECODE_ROWS } else { GEMV_MAX_ROWS };
        Ok(Self {
            router: Linear::load(w, &format!("{prefix}.router.layer"), e.count, hidden, false)?,
            experts,
            per_token: e.per_token,
            decode_rows,
        })
    }

    /// The router and every expert's projections.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.router).chain(self.experts.iter().flat_map(Mlp::projections))
    }

    /// Parameters of the experts one token does not use: all but `per_token` of them.
    pub(crate) fn idle_parameters(&self) -> usize {
        let expert = |m: &Mlp| m.projections().iter().map(|l| l.parameter_count()).sum::<usize>();
        self.experts.first().map_or(0, expert) * (self.experts.len() - self.per_token)
    }

    /// x: (1, T, hidden), the rows of the spans in `packed` -> (1, T, hidden).
    pub(crate) fn forward(&self, x: &Tensor, packed: &PackedRows) -> Result<Tensor> {
        let xs = x.squeeze(0)?;
        let logits = self.router.forward_packed(x, packed)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        // Per expert: the rows routed to it, their weights, and how many of each span's.
        let mut routed = vec![Routed::default(); self.experts.len()];
        let mut row = 0;
        for (span, &len) in packed.lens().iter().enumerate() {
            for logits in &logits[row..row + len] {
                for (expert, weight) in top_k_softmax(logits, self.per_token) {
                    routed[expert].add(row as u32, weight, span);
                }
                row += 1;
            }
        }
        if packed.all_decode() && x.device().is_cpu() && x.dtype() == DType::F32 {
            if let Some(y) = self.decode(&xs, &routed)? {
                return Ok(y.unsqueeze(0)?);
            }
        }
        let (mut rows, mut ys) = (Vec::new(), Vec::new());
        for (expert, r) in self.experts.iter().zip(&routed) {
            if r.rows.is_empty() {
                continue;
            }
            let index = Tensor::new(r.rows.as_slice(), x.device())?;
            // The weights in the activations' dtype, as transformers rounds them (`type_as`).
            let weights = Tensor::new(r.weights.as_slice(), x.device())?.to_dtype(x.dtype())?.unsqueeze(1)?;
            let spans = PackedRows::with_decode_rows(r.spans.iter().map(|s| s.1), self.decode_rows);
            let y = expert.forward(&xs.index_select(&index, 0)?.unsqueeze(0)?, &spans)?.squeeze(0)?;
            ys.push(y.broadcast_mul(&weights)?);
            rows.extend_from_slice(&r.rows);
        }
        // One sum for every expert, in expert order.
        let index = Tensor::new(rows.as_slice(), x.device())?;
        Ok(xs.zeros_like()?.index_add(&index, &Tensor::cat(&ys, 0)?, 0)?.unsqueeze(0)?)
    }

    /// Decode rows on the CPU (xs: (T, hidden) f32): the selected experts' gate/up products in one
    /// parallel loop, then their down products in another, instead of one product at a time. The
    /// same arithmetic as the expert by expert path, so a row gets the same bits either way. None
    /// where `gemv` does not read the weights.
    fn decode(&self, xs: &Tensor, routed: &[Routed]) -> Result<Option<Tensor>> {
        let (t, hidden) = xs.dims2()?;
        let x = xs.flatten_all()?.to_vec1::<f32>()?;
        let used: Vec<(&Mlp, &Routed)> = self.experts.iter().zip(routed).filter(|(_, r)| !r.rows.is_empty()).collect();
        if used.iter().any(|(e, _)| e.activation() != Activation::Silu) {
            return Ok(None);
        }
        let inputs: Vec<Vec<f32>> = used
            .iter()
            .map(|(_, r)| r.rows.iter().flat_map(|&row| &x[row as usize * hidden..][..hidden]).copied().collect())
            .collect();
        let gate_up: Vec<&Linear> = used.iter().map(|(e, _)| &e.gate_up_proj).collect();
        let Some(gate_up) = Linear::forward_each(&gate_up, &slices(&inputs))? else { return Ok(None) };
        // silu(gate) * up per row, as `kernels::swiglu` computes it.
        let acts: Vec<Vec<f32>> = gate_up
            .iter()
            .zip(&used)
            .map(|(gu, (_, r))| {
                let width = gu.len() / r.rows.len() / 2;
                let mut act = vec![0f32; r.rows.len() * width];
                for (row, out) in gu.chunks_exact(2 * width).zip(act.chunks_exact_mut(width)) {
                    let (gate, up) = row.split_at(width);
                    swiglu_row(gate, up, out);
                }
                act
            })
            .collect();
        let down: Vec<&Linear> = used.iter().map(|(e, _)| &e.down_proj).collect();
        let Some(ys) = Linear::forward_each(&down, &slices(&acts))? else { return Ok(None) };
        // Weighted and summed in expert order, as the index_add of the other path.
        let mut out = vec![0f32; t * hidden];
        for ((_, r), y) in used.iter().zip(&ys) {
            for ((&row, &weight), y) in r.rows.iter().zip(&r.weights).zip(y.chunks_exact(hidden)) {
                for (o, y) in out[row as usize * hidden..][..hidden].iter_mut().zip(y) {
                    *o += y * weight;
                }
            }
        }
        Ok(Some(Tensor::from_vec(out, (t, hidden), xs.device())?))
    }
}

fn slices(v: &[Vec<f32>]) -> Vec<&[f32]> {
    v.iter().map(Vec::as_slice).collect()
}

/// The rows an expert gets, in order.
#[derive(Clone, Default)]
struct Routed {
    rows: Vec<u32>,
    weights: Vec<f32>,
    /// (span, how many of its rows), for the spans with any.
    spans: Vec<(usize, usize)>,
}

impl Routed {
    fn add(&mut self, row: u32, weight: f32, span: usize) {
        self.rows.push(row);
        self.weights.push(weight);
        match self.spans.last_mut() {
            Some((s, n)) if *s == span => *n += 1,
            _ => self.spans.push((span, 1)),
        }
    }
}

/// The `k` largest logits' experts (the first of equal logits first) with the softmax over them.
fn top_k_softmax(logits: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
    order.truncate(k);
    let max = logits[order[0]];
    let exps: Vec<f32> = order.iter().map(|e| (logits[*e] - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    order.into_iter().zip(exps).map(|(e, x)| (e, x / sum)).collect()
}

#[cfg(test)]
mod tests {
    use super::top_k_softmax;

    #[test]
    fn top_k_takes_the_largest_and_normalizes_over_them() {
        let picked = top_k_softmax(&[0.5, 2.0, -1.0, 2.0, 1.0], 3);
        let experts: Vec<usize> = picked.iter().map(|p| p.0).collect();
        assert_eq!(experts, [1, 3, 4]);
        let (a, c) = (1.0f32, (-1.0f32).exp());
        let expected = [a / (2.0 * a + c), a / (2.0 * a + c), c / (2.0 * a + c)];
        for ((_, w), e) in picked.iter().zip(expected) {
            assert!((w - e).abs() < 1e-6, "{w} vs {e}");
        }
    }
}
