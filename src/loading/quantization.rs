//! What loading does to the weight matrices, and the names a user gives for it.

use candle_core::quantized::GgmlDType;

/// How the projections take a prompt's activations (`matmul_precision=`).
pub use crate::kernels::cpu::Precision;

/// What loading does to the weight matrices of the projections and embeddings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Quantization {
    /// Dense matrices in the compute dtype; GGUF matrices stay in their quantized type.
    #[default]
    AsStored,
    /// Every matrix dense in the compute dtype.
    Dequantize,
    /// Every matrix in this GGUF type (rows that its blocks do not divide fall back to Q8_0).
    To(GgmlDType),
}

/// Every name `quantize=` takes, with what it means: the one list of them.
const NAMES: [(&str, Quantization); 9] = [
    ("none", Quantization::Dequantize),
    ("f16", Quantization::To(GgmlDType::F16)),
    ("bf16", Quantization::To(GgmlDType::BF16)),
    ("q8_0", Quantization::To(GgmlDType::Q8_0)),
    ("q4_0", Quantization::To(GgmlDType::Q4_0)),
    ("q4_1", Quantization::To(GgmlDType::Q4_1)),
    ("q4_k", Quantization::To(GgmlDType::Q4K)),
    ("q5_k", Quantization::To(GgmlDType::Q5K)),
    ("q6_k", Quantization::To(GgmlDType::Q6K)),
];

impl Quantization {
    /// The names `parse` takes, in order.
    pub fn names() -> impl Iterator<Item = &'static str> {
        NAMES.iter().map(|(name, _)| *name)
    }

    /// A name of `names()`, in any case; an unknown name is an error that lists them.
    pub fn parse(name: &str) -> crate::error::Result<Self> {
        let lower = name.to_ascii_lowercase();
        NAMES.iter().find(|(n, _)| *n == lower).map(|(_, q)| *q).ok_or_else(|| {
            let names: Vec<String> = Self::names().map(|n| format!("{n:?}")).collect();
            crate::error::Error::invalid(format!("quantize must be one of {}, got {name:?}", names.join(", ")))
        })
    }
}
