//! Rotary position embeddings with transformers' default, linear and dynamic (NTK) frequencies,
//! or none (NoPE attention: Granite 4.0 hybrids), which is the rotation by angle 0.

use candle_core::{DType, Device, Tensor};

use crate::config::{Rope, RopeScaling};
use crate::error::Result;

pub struct RotaryEmbedding {
    /// None: no positions (every angle 0, so cos 1 and sin 0: q and k stay as they are).
    rope: Option<Rope>,
    head_dim: usize,
    max_positions: usize,
    dtype: DType,
    device: Device,
}

impl RotaryEmbedding {
    pub fn new(rope: Option<Rope>, head_dim: usize, max_positions: usize, dtype: DType, device: &Device) -> Self {
        Self { rope, head_dim, max_positions, dtype, device: device.clone() }
    }

    /// (head_dim / 2,) inverse frequencies for a forward whose last position is `seq_len - 1`.
    fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let Some(rope) = &self.rope else { return vec![0.0; self.head_dim / 2] };
        let dim = self.head_dim as f64;
        let base = match rope.scaling {
            RopeScaling::Dynamic { factor } => {
                // transformers rescales the base once the sequence outgrows max_position_embeddings.
                let seq_len = seq_len.max(self.max_positions) as f64;
                let ratio = factor * seq_len / self.max_positions as f64 - (factor - 1.0);
                rope.theta * ratio.powf(dim / (dim - 2.0))
            }
            _ => rope.theta,
        };
        let divide = match rope.scaling {
            RopeScaling::Linear { factor } => factor,
            _ => 1.0,
        };
        (0..self.head_dim / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / dim) / divide) as f32).collect()
    }

    /// cos and sin for positions start..start + len, each (len, head_dim / 2).
    pub fn cos_sin(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let inv_freq = self.inv_freq(start + len);
        let half = inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(len * half), Vec::with_capacity(len * half));
        for pos in start..start + len {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = |v: Vec<f32>| Tensor::from_vec(v, (len, half), &self.device)?.to_dtype(self.dtype);
        Ok((table(cos)?, table(sin)?))
    }
}
