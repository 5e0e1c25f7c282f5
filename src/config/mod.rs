//! `config.json`, read as HF transformers 4.x and 5.x write it, and compute dtypes by name.

mod dtype;

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;

use crate::error::{Error, Result};

pub use dtype::{dtype_name, dtype_names, parse_dtype};

/// HF `GraniteConfig`, field for field (defaults as in transformers), with the fields of the rest
/// of the family (`GraniteMoe`, `GraniteMoeShared`, `GraniteMoeHybrid`) and the 4.x/5.x spellings
/// of the RoPE, dtype and layer-type fields. Resolve the variants through the methods (`family`,
/// `layer_kind`, `experts`, `mamba`, ...), not the raw fields.
#[derive(Debug, Clone, Deserialize)]
pub struct GraniteConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// 4.x: top-level theta and `rope_scaling`; 5.x: both inside `rope_parameters`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    #[serde(default)]
    pub residual_multiplier: Option<f64>,
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    #[serde(default)]
    pub logits_scaling: Option<f64>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// 4.x `torch_dtype`, 5.x `dtype`.
    #[serde(default)]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    /// Mixtures of experts (`granitemoe`, `granitemoeshared`, `granitemoehybrid`).
    #[serde(default)]
    pub num_local_experts: Option<usize>,
    #[serde(default)]
    pub num_experts_per_tok: Option<usize>,
    #[serde(default)]
    pub shared_intermediate_size: Option<usize>,
    /// `granitemoehybrid`: `"rope"`, or none for attention without positions.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// `granitemoehybrid`: per layer, 4.x `mamba`/`attention`, 5.x `linear_attention`/`full_attention`.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub mamba_n_heads: Option<usize>,
    #[serde(default)]
    pub mamba_n_groups: Option<usize>,
    #[serde(default)]
    pub mamba_d_state: Option<usize>,
    /// A number or `"auto"`.
    #[serde(default)]
    pub mamba_d_head: Option<serde_json::Value>,
    #[serde(default)]
    pub mamba_d_conv: Option<usize>,
    #[serde(default)]
    pub mamba_expand: Option<usize>,
    #[serde(default)]
    pub mamba_conv_bias: Option<bool>,
    #[serde(default)]
    pub mamba_proj_bias: Option<bool>,
    /// (min, max); transformers 5.x writes infinity as `{"__float__": "Infinity"}`.
    #[serde(default)]
    pub time_step_limit: Option<Vec<serde_json::Value>>,
}

/// Which of transformers' Granite classes a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `granite` and `llama`: attention and a dense MLP in every layer.
    Dense,
    /// `granitemoe`: the MLP is a mixture of experts.
    Moe,
    /// `granitemoeshared`: experts plus a shared MLP.
    MoeShared,
    /// `granitemoehybrid`: attention or Mamba2 per layer, a shared MLP, experts when there are any.
    Hybrid,
}

/// The model types we load and their families: the one list.
pub const MODEL_TYPES: [(&str, Family); 5] = [
    ("granite", Family::Dense),
    ("llama", Family::Dense),
    ("granitemoe", Family::Moe),
    ("granitemoeshared", Family::MoeShared),
    ("granitemoehybrid", Family::Hybrid),
];

/// What mixes the tokens in one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Attention,
    Mamba,
}

/// A mixture of experts: `count` experts of `intermediate` each, `per_token` chosen per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    pub count: usize,
    pub per_token: usize,
    pub intermediate: usize,
}

/// A Mamba2 mixer's sizes (transformers' defaults filled in).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MambaShape {
    pub heads: usize,
    pub head_dim: usize,
    pub groups: usize,
    pub state: usize,
    pub conv_kernel: usize,
    /// heads * head_dim = mamba_expand * hidden_size.
    pub inner: usize,
    pub conv_bias: bool,
    pub proj_bias: bool,
    /// The (min, max) clamp of the time step.
    pub dt_limit: (f64, f64),
}

impl MambaShape {
    /// The channels of the convolution: x, B and C.
    pub fn conv_channels(&self) -> usize {
        self.inner + 2 * self.groups * self.state
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    /// The 4.x key for `rope_type`.
    #[serde(default, rename = "type")]
    pub legacy_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware base rescaled from the sequence length, as transformers' "dynamic".
    Dynamic {
        factor: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    Relu,
}

fn default_act() -> String {
    "silu".into()
}
fn default_max_positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}

/// A number, or transformers 5.x's `{"__float__": "Infinity" | "-Infinity"}`; never NaN.
fn json_float(v: &serde_json::Value) -> Option<f64> {
    let x = match v.get("__float__").and_then(|f| f.as_str()) {
        Some("Infinity") => f64::INFINITY,
        Some("-Infinity") => f64::NEG_INFINITY,
        Some(_) => return None,
        None => v.as_f64()?,
    };
    (!x.is_nan()).then_some(x)
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound { what: "file", path: path.into() },
        _ => Error::Io { path: path.into(), source },
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Json { path: path.into(), source })
}

impl GraniteConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a config given as JSON (as a GGUF file's metadata maps to it).
    pub fn from_json(value: serde_json::Value, origin: &Path) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value).map_err(|source| Error::Json { path: origin.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    fn is_llama(&self) -> bool {
        self.model_type.as_deref() == Some("llama")
    }

    /// The family of `model_type` (a config without one is Granite's).
    pub fn family(&self) -> Result<Family> {
        let Some(t) = self.model_type.as_deref() else { return Ok(Family::Dense) };
        MODEL_TYPES.iter().find(|(name, _)| *name == t).map(|(_, f)| *f).ok_or_else(|| {
            let names: Vec<&str> = MODEL_TYPES.iter().map(|(name, _)| *name).collect();
            Error::config("model_type", format!("`{t}` is not supported ({})", names.join(", ")))
        })
    }

    /// Layer `i`'s mixer: the hybrid's `layer_types` (all Mamba when unset, as in transformers),
    /// attention everywhere else.
    pub fn layer_kind(&self, i: usize) -> Result<LayerKind> {
        if self.family()? != Family::Hybrid {
            return Ok(LayerKind::Attention);
        }
        let Some(types) = &self.layer_types else { return Ok(LayerKind::Mamba) };
        if types.len() != self.num_hidden_layers {
            return Err(Error::config(
                "layer_types",
                format!("has {} entries for {} layers", types.len(), self.num_hidden_layers),
            ));
        }
        match types.get(i).map(String::as_str) {
            Some("attention" | "full_attention") => Ok(LayerKind::Attention),
            Some("mamba" | "linear_attention") => Ok(LayerKind::Mamba),
            other => Err(Error::config(
                "layer_types",
                format!(
                    "`{}` is not a layer type (attention, mamba, full_attention, linear_attention)",
                    other.unwrap_or("")
                ),
            )),
        }
    }

    /// Whether some layer is a Mamba2 mixer (every `layer_types` entry checked).
    pub fn has_mamba(&self) -> Result<bool> {
        if self.family()? != Family::Hybrid {
            return Ok(false);
        }
        let listed = self.layer_types.as_ref().map_or(1, Vec::len);
        let mut any = false;
        for i in 0..listed {
            any |= self.layer_kind(i)? == LayerKind::Mamba;
        }
        Ok(any)
    }

    /// The mixture of experts in each layer's MLP, if any (transformers' defaults: 8 experts, 2 per token).
    pub fn experts(&self) -> Result<Option<Experts>> {
        if self.family()? == Family::Dense {
            return Ok(None);
        }
        let count = self.num_local_experts.unwrap_or(8);
        let per_token = self.num_experts_per_tok.unwrap_or(2);
        if count == 0 {
            return match self.family()? {
                Family::Hybrid => Ok(None),
                _ => Err(Error::config("num_local_experts", "must be positive")),
            };
        }
        if per_token == 0 || per_token > count {
            return Err(Error::config(
                "num_experts_per_tok",
                format!("must be between 1 and num_local_experts ({count}), got {per_token}"),
            ));
        }
        Ok(Some(Experts { count, per_token, intermediate: self.intermediate_size }))
    }

    /// The intermediate size of the MLP every token goes through beside (or instead of) the
    /// experts: `shared_intermediate_size` (hybrid default 1024, shared default none).
    pub fn shared_mlp_size(&self) -> Result<Option<usize>> {
        Ok(match self.family()? {
            Family::Dense => Some(self.intermediate_size),
            Family::Moe => None,
            Family::MoeShared => self.shared_intermediate_size.filter(|s| *s > 0),
            Family::Hybrid => match self.shared_intermediate_size.unwrap_or(1024) {
                0 => return Err(Error::config("shared_intermediate_size", "must be positive")),
                s => Some(s),
            },
        })
    }

    /// Whether attention rotates q and k: always but in a hybrid whose `position_embedding_type`
    /// is not `rope`.
    pub fn uses_rope(&self) -> Result<bool> {
        if self.family()? != Family::Hybrid {
            return Ok(true);
        }
        match self.position_embedding_type.as_deref() {
            Some("rope") => Ok(true),
            None | Some("nope") => Ok(false),
            Some(other) => Err(Error::config(
                "position_embedding_type",
                format!("`{other}` is not supported (rope, nope, or unset)"),
            )),
        }
    }

    /// The Mamba2 mixer's sizes, transformers' defaults filled in and checked.
    pub fn mamba(&self) -> Result<MambaShape> {
        let heads = self.mamba_n_heads.unwrap_or(128);
        let groups = self.mamba_n_groups.unwrap_or(1);
        let inner = self.mamba_expand.unwrap_or(2) * self.hidden_size;
        let positive = [("mamba_n_heads", heads), ("mamba_n_groups", groups), ("mamba_expand", inner)];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(Error::config(field, "must be positive"));
        }
        if !inner.is_multiple_of(heads) {
            return Err(Error::config(
                "mamba_n_heads",
                format!("{heads} does not divide mamba_expand * hidden_size {inner}"),
            ));
        }
        let head_dim = match &self.mamba_d_head {
            None => inner / heads,
            Some(serde_json::Value::String(s)) if s == "auto" => inner / heads,
            Some(v) => v.as_u64().map(|d| d as usize).ok_or_else(|| {
                Error::config("mamba_d_head", format!("must be a positive integer or \"auto\", got {v}"))
            })?,
        };
        if head_dim * heads != inner {
            return Err(Error::config(
                "mamba_d_head",
                format!("{head_dim} x mamba_n_heads {heads} is not mamba_expand * hidden_size {inner}"),
            ));
        }
        if !heads.is_multiple_of(groups) {
            return Err(Error::config("mamba_n_groups", format!("{groups} does not divide mamba_n_heads {heads}")));
        }
        let (state, conv_kernel) = (self.mamba_d_state.unwrap_or(256), self.mamba_d_conv.unwrap_or(4));
        if state == 0 {
            return Err(Error::config("mamba_d_state", "must be positive"));
        }
        if conv_kernel < 2 {
            return Err(Error::config("mamba_d_conv", format!("must be at least 2, got {conv_kernel}")));
        }
        let dt_limit = match self.time_step_limit.as_deref() {
            None => (0.0, f64::INFINITY),
            Some([lo, hi]) => match (json_float(lo), json_float(hi)) {
                (Some(lo), Some(hi)) if lo <= hi => (lo, hi),
                _ => {
                    return Err(Error::config(
                        "time_step_limit",
                        format!("must be [min, max] with min <= max, got [{lo}, {hi}]"),
                    ))
                }
            },
            Some(other) => {
                return Err(Error::config("time_step_limit", format!("must be [min, max], got {} values", other.len())))
            }
        };
        Ok(MambaShape {
            heads,
            head_dim,
            groups,
            state,
            conv_kernel,
            inner,
            conv_bias: self.mamba_conv_bias.unwrap_or(true),
            proj_bias: self.mamba_proj_bias.unwrap_or(false),
            dt_limit,
        })
    }

    pub fn embedding_multiplier(&self) -> f64 {
        self.embedding_multiplier.unwrap_or(1.0)
    }

    pub fn residual_multiplier(&self) -> f64 {
        self.residual_multiplier.unwrap_or(1.0)
    }

    /// The softmax scale. Granite's default is 1.0; a Llama config has none and means 1/sqrt(head_dim).
    pub fn attention_multiplier(&self) -> f64 {
        match self.attention_multiplier {
            Some(m) => m,
            None if self.is_llama() => 1.0 / (self.head_dim() as f64).sqrt(),
            None => 1.0,
        }
    }

    pub fn logits_scaling(&self) -> f64 {
        self.logits_scaling.unwrap_or(1.0)
    }

    /// HF reads `rope_scaling` (4.x) before `rope_parameters` (5.x), and the theta inside the
    /// dict before the top-level `rope_theta`.
    fn rope_dict(&self) -> (&'static str, Option<&RopeParameters>) {
        match (&self.rope_scaling, &self.rope_parameters) {
            (Some(p), _) => ("rope_scaling", Some(p)),
            (None, Some(p)) => ("rope_parameters", Some(p)),
            (None, None) => ("rope_parameters", None),
        }
    }

    pub fn rope(&self) -> Result<Rope> {
        let (field, params) = self.rope_dict();
        let theta = params.and_then(|p| p.rope_theta).or(self.rope_theta).unwrap_or(10_000.0);
        let kind = params
            .and_then(|p| p.rope_type.clone().or_else(|| p.legacy_type.clone()))
            .unwrap_or_else(|| "default".into());
        let factor = || -> Result<f64> {
            match params.and_then(|p| p.factor) {
                Some(f) if f.is_finite() && f >= 1.0 => Ok(f),
                Some(f) => Err(Error::config(&format!("{field}.factor"), format!("must be a number >= 1, got {f}"))),
                None => Err(Error::config(&format!("{field}.factor"), format!("required for rope_type `{kind}`"))),
            }
        };
        let scaling = match kind.as_str() {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "dynamic" => RopeScaling::Dynamic { factor: factor()? },
            other => {
                return Err(Error::config(
                    &format!("{field}.rope_type"),
                    format!("`{other}` is not supported (supported: default, linear, dynamic)"),
                ))
            }
        };
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::config("rope_theta", format!("must be a positive number, got {theta}")));
        }
        Ok(Rope { theta, scaling })
    }

    /// Whether RoPE frequencies are rescaled to any sequence length (dynamic scaling), so that,
    /// as in transformers, only memory bounds a sequence.
    pub fn positions_unbounded(&self) -> bool {
        matches!(self.rope().map(|r| r.scaling), Ok(RopeScaling::Dynamic { .. }))
    }

    /// The length the positions were made for: `max_position_embeddings`, stretched by dynamic
    /// scaling (what the default KV cache budget holds).
    pub fn context_length(&self) -> usize {
        match self.rope().map(|r| r.scaling) {
            Ok(RopeScaling::Dynamic { factor }) => (self.max_position_embeddings as f64 * factor) as usize,
            _ => self.max_position_embeddings,
        }
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "silu" | "swish" => Ok(Activation::Silu),
            "gelu" => Ok(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "relu" => Ok(Activation::Relu),
            other => Err(Error::config(
                "hidden_act",
                format!("`{other}` is not supported (supported: silu, gelu, gelu_pytorch_tanh, relu)"),
            )),
        }
    }

    /// The checkpoint's dtype (`torch_dtype` or `dtype`), f32 when unset.
    pub fn checkpoint_dtype(&self) -> Result<DType> {
        let (field, name) = match (&self.dtype, &self.torch_dtype) {
            (Some(d), _) => ("dtype", d.as_str()),
            (None, Some(d)) => ("torch_dtype", d.as_str()),
            (None, None) => return Ok(DType::F32),
        };
        parse_dtype(name)
            .map_err(|_| Error::config(field, format!("`{name}` is not supported (float32, bfloat16, float16)")))
    }

    /// End-of-sequence ids from config.json.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default()
    }

    fn validate(&self) -> Result<()> {
        self.family()?;
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::config(field, "must be positive"));
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_kv_heads()) {
            return Err(Error::config(
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", self.num_kv_heads(), self.num_attention_heads),
            ));
        }
        if !self.head_dim().is_multiple_of(2) || self.head_dim() == 0 {
            return Err(Error::config("head_dim", format!("RoPE needs an even head size, got {}", self.head_dim())));
        }
        let rotary = self.rope_dict().1.and_then(|p| p.partial_rotary_factor).or(self.partial_rotary_factor);
        if rotary.is_some_and(|f| f != 1.0) {
            return Err(Error::config("partial_rotary_factor", "only 1.0 (full rotary) is supported"));
        }
        let scalars = [
            ("rms_norm_eps", Some(self.rms_norm_eps)),
            ("embedding_multiplier", self.embedding_multiplier),
            ("residual_multiplier", self.residual_multiplier),
            ("attention_multiplier", self.attention_multiplier),
            ("logits_scaling", self.logits_scaling),
        ];
        for (field, value) in scalars {
            if let Some(v) = value.filter(|v| !v.is_finite()) {
                return Err(Error::config(field, format!("must be finite, got {v}")));
            }
        }
        if self.logits_scaling() == 0.0 {
            return Err(Error::config("logits_scaling", "must not be 0"));
        }
        if self.rms_norm_eps < 0.0 {
            return Err(Error::config("rms_norm_eps", "must not be negative"));
        }
        self.rope()?;
        self.uses_rope()?;
        self.experts()?;
        self.shared_mlp_size()?;
        if self.has_mamba()? {
            self.mamba()?;
        }
        self.activation()?;
        self.checkpoint_dtype()?;
        Ok(())
    }
}
