//! The Mamba2 mixer of Granite 4.0's hybrid layers (transformers' GraniteMoeHybridMambaLayer):
//! in_proj -> [z | xBC | dt]; a causal depthwise convolution and SiLU over xBC; x, B and C split
//! from it; the selective scan s = exp(Δ·A)·s + Δ·B·x, y = C·s + D·x with Δ = softplus(dt +
//! dt_bias); the gated RMSNorm norm(y · silu(z)) per group; out_proj. The projections see every
//! span's rows at once; the recurrences run per span, continuing that sequence's state.

use candle_core::{DType, Tensor};

use crate::config::{GraniteConfig, MambaShape};
use crate::error::Result;
use crate::kernels::cpu::mamba::{gated_rms_norm, Conv, Ssm};
use crate::loading::safetensors::Weights;
use crate::model::linear::{Linear, PackedRows};
use crate::model::span::SpanRows;
use crate::model::ssm_state::{LayerState, StateShape};

pub(crate) struct Mamba {
    pub(crate) in_proj: Linear,
    pub(crate) out_proj: Linear,
    /// (channels, kernel).
    conv_weight: Vec<f32>,
    /// (channels,); zeros without a bias.
    conv_bias: Vec<f32>,
    /// Per head: -exp(A_log), D and dt_bias.
    a: Vec<f32>,
    d: Vec<f32>,
    dt_bias: Vec<f32>,
    /// The gated RMSNorm's weight (inner,).
    norm: Vec<f32>,
    shape: MambaShape,
    eps: f32,
    /// This layer's state among a sequence's Mamba states.
    index: usize,
}

impl Mamba {
    /// Layer `{prefix}`, the `index`-th Mamba layer of the model.
    pub(crate) fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig, index: usize) -> Result<Self> {
        let s = cfg.mamba()?;
        let (channels, heads) = (s.conv_channels(), s.heads);
        let values = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            Ok(w.get(&format!("{prefix}.{name}"), shape)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let conv_bias = match s.conv_bias {
            true => values("conv1d.bias", &[channels])?,
            false => vec![0.0; channels],
        };
        let projection = s.inner + channels + heads;
        Ok(Self {
            in_proj: Linear::load(w, &format!("{prefix}.in_proj"), projection, cfg.hidden_size, s.proj_bias)?,
            out_proj: Linear::load(w, &format!("{prefix}.out_proj"), cfg.hidden_size, s.inner, s.proj_bias)?,
            conv_weight: values("conv1d.weight", &[channels, 1, s.conv_kernel])?,
            conv_bias,
            a: values("A_log", &[heads])?.into_iter().map(|v| -v.exp()).collect(),
            d: values("D", &[heads])?,
            dt_bias: values("dt_bias", &[heads])?,
            norm: values("norm.weight", &[s.inner])?,
            shape: s,
            eps: cfg.rms_norm_eps as f32,
            index,
        })
    }

    /// The sizes of one sequence's state of the `layers` Mamba layers of `cfg`.
    pub(crate) fn state_shape(cfg: &GraniteConfig, layers: usize) -> Result<StateShape> {
        let s = cfg.mamba()?;
        Ok(StateShape { layers, window: (s.conv_kernel - 1) * s.conv_channels(), ssm: s.heads * s.head_dim * s.state })
    }

    /// Parameters besides the projections: the convolution, the per-head vectors and the norm.
    pub(crate) fn other_parameters(&self) -> usize {
        let bias = if self.shape.conv_bias { self.conv_bias.len() } else { 0 };
        bias + self.conv_weight.len() + 3 * self.a.len() + self.norm.len()
    }

    fn conv(&self) -> Conv<'_> {
        Conv { weight: &self.conv_weight, bias: &self.conv_bias, kernel: self.shape.conv_kernel }
    }

    /// One forward's scan: a decode step's Δ is not clamped (as in transformers' recurrent form).
    fn ssm(&self, t: usize) -> Ssm<'_> {
        let (lo, hi) = self.shape.dt_limit;
        let clamp = t > 1 && (lo > 0.0 || hi < f64::INFINITY);
        Ssm {
            a: &self.a,
            d: &self.d,
            dt_bias: &self.dt_bias,
            head_dim: self.shape.head_dim,
            groups: self.shape.groups,
            state: self.shape.state,
            dt_limit: clamp.then_some((lo as f32, hi as f32)),
        }
    }

    /// x: (1, T, hidden), the rows of `spans` one after another -> (1, T, hidden). Each span
    /// continues its cache's state of this layer (a fresh one without a cache) and leaves the
    /// new one pending there.
    pub(crate) fn forward(&self, x: &Tensor, spans: &mut [SpanRows], packed: &PackedRows) -> Result<Tensor> {
        let s = &self.shape;
        let (inner, channels) = (s.inner, s.conv_channels());
        let width = inner + channels + s.heads;
        let total = x.dim(1)?;
        let mut projected: Vec<f32> =
            self.in_proj.forward_packed(x, packed)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut y = vec![0f32; total * inner];
        let shape = StateShape { layers: 1, window: self.conv().window_len(), ssm: self.ssm(1).state_len() };
        for span in spans.iter_mut() {
            let rows = &mut projected[span.offset * width..(span.offset + span.len) * width];
            let ys = &mut y[span.offset * inner..(span.offset + span.len) * inner];
            let mut states = span.cache.as_deref_mut().and_then(|c| c.ssm_mut());
            // A prompt continuing a kept state also leaves the state before its last token.
            let mut before = (states.is_some() && span.len > 1).then(|| LayerState::zeros(shape));
            // The state continued (None: zeros, already in `state`) and where the next one goes.
            let (from, mut state) = match &mut states {
                Some(states) => {
                    let (from, mut buffer) = states.with_buffer(self.index);
                    buffer.window.copy_from_slice(&from.window);
                    (Some(from), buffer)
                }
                None => (None, LayerState::zeros(shape)),
            };
            // [z | xBC | dt]: the convolution runs on xBC in place.
            let window_before = before.as_mut().map(|b| &mut b.window[..]);
            self.conv().forward(rows, width, inner, &mut state.window, window_before);
            let (xbc, dt) = (&rows[inner..], &rows[inner + channels..]);
            let ssm_before = before.as_mut().map(|b| &mut b.ssm[..]);
            let from = from.map(|f| &f.ssm[..]);
            self.ssm(span.len).scan(xbc, width, dt, width, from, &mut state.ssm, ys, ssm_before);
            gated_rms_norm(ys, rows, width, &self.norm, s.groups, self.eps);
            if let Some(states) = states {
                states.set_pending(self.index, state, before);
            }
        }
        let y = Tensor::from_vec(y, (1, total, inner), x.device())?.to_dtype(x.dtype())?;
        self.out_proj.forward_packed(&y, packed)
    }
}
