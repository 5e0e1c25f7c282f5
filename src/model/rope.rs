//! Rotary position embeddings with transformers' default, linear and dynamic (NTK) frequencies.

use candle_core::{DType, Device, Tensor};

use crate::config::{Rope, RopeScaling};
use crate::error::Result;

pub struct RotaryEmbedding {
    rope: Rope,
    head_dim: usize,
    max_positions: usize,
    dtype: DType,
    device: Device,
}

impl RotaryEmbedding {
    pub fn new(rope: Rope, head_dim: usize, max_positions: usize, dtype: DType, device: &Device) -> Self {
        Self { rope, head_dim, max_positions, dtype, device: device.clone() }
    }

    /// (head_dim / 2,) inverse frequencies for a forward whose last position is `seq_len - 1`.
    fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.head_dim as f64;
        let base = match self.rope.scaling {
            RopeScaling::Dynamic { factor } => {
                // transformers rescales the base once the sequence outgrows max_position_embeddings.
                let seq_len = seq_len.max(self.max_positions) as f64;
                let ratio = factor * seq_len / self.max_positions as f64 - (factor - 1.0);
                self.rope.theta * ratio.powf(dim / (dim - 2.0))
            }
            _ => self.rope.theta,
        };
        let divide = match self.rope.scaling {
            RopeScaling::Linear { factor } => factor,
            _ => 1.0,
        };
        (0..self.head_dim / 2).map(|i| (1.0 / base.powf((2 * i) as f64 / dim) / divide) as f32).collect()
    }

    /// cos and sin for positions start..start + len, each (len, head_dim / 2). With left padding
    /// (`left_pad[r]` pad tokens before row r's text) each is (batch, len, head_dim / 2) and row r's
    /// positions are shifted back by its padding (clamped at 0 on the pad tokens themselves).
    pub fn cos_sin(&self, start: usize, len: usize, left_pad: &[usize]) -> Result<(Tensor, Tensor)> {
        let padded = left_pad.iter().any(|p| *p > 0);
        let shifts: &[usize] = if padded { left_pad } else { &[0] };
        let min_pad = shifts.iter().copied().min().unwrap_or(0);
        let inv_freq = self.inv_freq(start + len - min_pad.min(start + len));
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(shifts.len() * len * half);
        let mut sin = Vec::with_capacity(shifts.len() * len * half);
        for shift in shifts {
            for pos in start..start + len {
                for f in &inv_freq {
                    let angle = pos.saturating_sub(*shift) as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let table = |v: Vec<f32>| {
            let t = Tensor::from_vec(v, (shifts.len(), len, half), &self.device)?;
            let t = if padded { t } else { t.squeeze(0)? };
            t.to_dtype(self.dtype)
        };
        Ok((table(cos)?, table(sin)?))
    }
}
