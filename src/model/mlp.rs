//! The gated MLP: act(gate) * up, then down (dense layers, shared MLPs, and each expert).

use candle_core::{Tensor, D};

use crate::config::{Activation, GraniteConfig};
use crate::error::Result;
use crate::kernels;
use crate::loading::safetensors::Weights;
use crate::model::linear::{Linear, PackedRows};

pub(crate) struct Mlp {
    /// gate_proj and up_proj stacked: 2 * intermediate_size rows.
    pub(crate) gate_up_proj: Linear,
    pub(crate) down_proj: Linear,
    act: Activation,
}

impl Mlp {
    pub(crate) fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        let (gate, up) = (format!("{prefix}.gate_proj"), format!("{prefix}.up_proj"));
        let parts = [(gate.as_str(), cfg.intermediate_size), (up.as_str(), cfg.intermediate_size)];
        Ok(Self {
            gate_up_proj: Linear::load_stacked(w, &parts, cfg.hidden_size, cfg.mlp_bias)?,
            down_proj: Linear::load(
                w,
                &format!("{prefix}.down_proj"),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.mlp_bias,
            )?,
            act: cfg.activation()?,
        })
    }

    /// The MoE families' shared MLP: `{prefix}.input_linear` (gate and up stacked, 2 * size rows;
    /// or split, as `gate_linear` and `up_linear`) and `{prefix}.output_linear`, without biases.
    pub(crate) fn load_fused(w: &Weights, prefix: &str, cfg: &GraniteConfig, size: usize) -> Result<Self> {
        let (gate, up) = (format!("{prefix}.gate_linear"), format!("{prefix}.up_linear"));
        let gate_up_proj = if w.contains(&format!("{gate}.weight")) {
            Linear::load_stacked(w, &[(&gate, size), (&up, size)], cfg.hidden_size, false)?
        } else {
            Linear::load(w, &format!("{prefix}.input_linear"), 2 * size, cfg.hidden_size, false)?
        };
        Ok(Self {
            gate_up_proj,
            down_proj: Linear::load(w, &format!("{prefix}.output_linear"), cfg.hidden_size, size, false)?,
            act: cfg.activation()?,
        })
    }

    /// An MLP over matrices already loaded: one expert of a mixture.
    pub(crate) fn from_parts(gate_up_proj: Linear, down_proj: Linear, act: Activation) -> Self {
        Self { gate_up_proj, down_proj, act }
    }

    pub(crate) fn activation(&self) -> Activation {
        self.act
    }

    pub(crate) fn projections(&self) -> [&Linear; 2] {
        [&self.gate_up_proj, &self.down_proj]
    }

    /// x: (1, T, hidden), every span's rows -> (1, T, hidden).
    pub(crate) fn forward(&self, x: &Tensor, packed: &PackedRows) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward_packed(x, packed)?; // (1, T, 2 intermediate)
        let hidden = match self.act {
            Activation::Silu => kernels::swiglu(&gate_up)?,
            act => {
                let halves = gate_up.chunk(2, D::Minus1)?;
                let gate = match act {
                    Activation::Gelu => halves[0].gelu_erf()?,
                    Activation::GeluTanh => halves[0].gelu()?,
                    _ => halves[0].relu()?,
                };
                (gate * &halves[1])?
            }
        };
        self.down_proj.forward_packed(&hidden, packed)
    }
}
