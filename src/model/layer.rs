//! One decoder layer: a mixer (what lets tokens see each other) and a feed-forward (what each
//! token goes through alone), each after an RMSNorm and scaled into the residual stream.

use candle_core::Tensor;

use crate::config::{Family, GraniteConfig, LayerKind};
use crate::error::{Error, Result};
use crate::loading::safetensors::Weights;
use crate::model::attention::Attention;
use crate::model::linear::{Linear, PackedRows};
use crate::model::mamba::Mamba;
use crate::model::mlp::Mlp;
use crate::model::moe::Moe;
use crate::model::span::SpanRows;

/// What mixes the tokens of one layer, from `GraniteConfig::layer_kind`.
pub(crate) enum Mixer {
    Attention(Attention),
    Mamba(Mamba),
}

impl Mixer {
    /// The mixer of a layer of `kind`, the `index`-th of its kind in the model (its place in a
    /// sequence's cache).
    fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig, kind: LayerKind, index: usize) -> Result<Self> {
        Ok(match kind {
            LayerKind::Attention => Self::Attention(Attention::load(w, &format!("{prefix}.self_attn"), cfg, index)?),
            LayerKind::Mamba => Self::Mamba(Mamba::load(w, &format!("{prefix}.mamba"), cfg, index)?),
        })
    }

    /// x: (1, T, hidden), the rows of `spans` one after another -> (1, T, hidden).
    pub(crate) fn forward(&self, x: &Tensor, spans: &mut [SpanRows], packed: &PackedRows) -> Result<Tensor> {
        match self {
            Self::Attention(a) => a.forward(x, spans, packed),
            Self::Mamba(m) => m.forward(x, spans, packed),
        }
    }

    fn projections(&self) -> [&Linear; 2] {
        match self {
            Self::Attention(a) => [&a.qkv_proj, &a.o_proj],
            Self::Mamba(m) => [&m.in_proj, &m.out_proj],
        }
    }

    /// Parameters outside the projections.
    fn other_parameters(&self) -> usize {
        match self {
            Self::Attention(_) => 0,
            Self::Mamba(m) => m.other_parameters(),
        }
    }
}

/// What each token goes through after the mixer, from `GraniteConfig::family`.
pub(crate) enum FeedForward {
    Mlp(Mlp),
    /// Experts, plus the shared MLP every token also goes through where there is one.
    Moe {
        experts: Moe,
        shared: Option<Mlp>,
    },
}

impl FeedForward {
    fn load(w: &Weights, prefix: &str, cfg: &GraniteConfig) -> Result<Self> {
        if cfg.family()? == Family::Dense {
            return Ok(Self::Mlp(Mlp::load(w, &format!("{prefix}.mlp"), cfg)?));
        }
        let shared = cfg.shared_mlp_size()?;
        let shared = shared.map(|size| Mlp::load_fused(w, &format!("{prefix}.shared_mlp"), cfg, size)).transpose()?;
        Ok(match (cfg.experts()?, shared) {
            (Some(e), shared) => {
                Self::Moe { experts: Moe::load(w, &format!("{prefix}.block_sparse_moe"), cfg, e)?, shared }
            }
            (None, Some(mlp)) => Self::Mlp(mlp),
            (None, None) => return Err(Error::config("num_local_experts", "a layer needs experts or a shared MLP")),
        })
    }

    /// x: (1, T, hidden), every span's rows, each token alone -> (1, T, hidden).
    pub(crate) fn forward(&self, x: &Tensor, packed: &PackedRows) -> Result<Tensor> {
        match self {
            Self::Mlp(m) => m.forward(x, packed),
            Self::Moe { experts, shared: None } => experts.forward(x, packed),
            Self::Moe { experts, shared: Some(m) } => Ok((experts.forward(x, packed)? + m.forward(x, packed)?)?),
        }
    }

    /// Parameters one token does not use: the experts its router does not select.
    fn idle_parameters(&self) -> usize {
        match self {
            Self::Mlp(_) => 0,
            Self::Moe { experts, .. } => experts.idle_parameters(),
        }
    }

    fn projections(&self) -> Box<dyn Iterator<Item = &Linear> + '_> {
        match self {
            Self::Mlp(m) => Box::new(m.projections().into_iter()),
            Self::Moe { experts, shared } => {
                Box::new(experts.projections().chain(shared.iter().flat_map(Mlp::projections)))
            }
        }
    }
}

pub(crate) struct DecoderLayer {
    pub(crate) input_layernorm: Tensor,
    pub(crate) mixer: Mixer,
    pub(crate) post_attention_layernorm: Tensor,
    pub(crate) feed_forward: FeedForward,
}

impl DecoderLayer {
    /// Layer `layer`, whose mixer is of `kind`, the `index`-th of its kind.
    pub(crate) fn load(w: &Weights, cfg: &GraniteConfig, layer: usize, kind: LayerKind, index: usize) -> Result<Self> {
        let prefix = format!("model.layers.{layer}");
        let norm = |name: &str| w.get(&format!("{prefix}.{name}.weight"), &[cfg.hidden_size]);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            mixer: Mixer::load(w, &prefix, cfg, kind, index)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feed_forward: FeedForward::load(w, &prefix, cfg)?,
        })
    }

    /// Every projection of the layer.
    pub(crate) fn projections(&self) -> impl Iterator<Item = &Linear> {
        self.mixer.projections().into_iter().chain(self.feed_forward.projections())
    }

    /// Parameters one token does not use (unselected experts).
    pub(crate) fn idle_parameters(&self) -> usize {
        self.feed_forward.idle_parameters()
    }

    /// Parameters outside the projections' matrices: biases and norms.
    pub(crate) fn other_parameters(&self) -> usize {
        let biases: usize = self.projections().map(Linear::bias_len).sum();
        let norms = self.input_layernorm.elem_count() + self.post_attention_layernorm.elem_count();
        biases + norms + self.mixer.other_parameters()
    }
}
