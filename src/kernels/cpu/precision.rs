//! How finely the activations enter the matrix products: the one setting that chooses, named
//! for users.

/// How the activations enter the matrix products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Precision {
    /// Prompts, where the CPU multiplies bf16 (AMX, AVX512-BF16): rounded to bf16, against the
    /// weights as bf16 (exact for bf16 weights, rounded for f16 and the GGUF block types), as
    /// transformers computes bf16 models; f32 weights, and CPUs without those units, as Exact.
    /// Q4_0, Q4_1 and Q8_0 on AVX512-VNNI without AMX: rounded to 15-bit integers per 32, as
    /// decode is. Decode (see `gemv`): dense weights in f32, Q4_0, Q4_1 and Q8_0 against 15-bit
    /// integers (16-bit without AVX512-VNNI), the k-quants against 8-bit ones.
    #[default]
    Fast,
    /// For Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K weights where the CPU has AVX512-VNNI: rounded
    /// to 8-bit integers per 32 (as llama.cpp computes them), faster than Fast and coarser, in
    /// prompts and decode; the other weights as Fast.
    Int8,
    /// Always f32 in prompts: the products of the weights' exact values and the activations as
    /// they are; decode as Fast.
    Exact,
}

impl Precision {
    /// The names `parse` takes, with what each means: the one list of them.
    pub const NAMES: [(&'static str, Precision); 3] =
        [("fast", Precision::Fast), ("int8", Precision::Int8), ("exact", Precision::Exact)];

    /// A name of `NAMES`; an unknown one is an error that lists them.
    pub fn parse(name: &str) -> Result<Self, String> {
        let found = Self::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
        found.map(|(_, p)| *p).ok_or_else(|| {
            let names: Vec<String> = Self::NAMES.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("matmul_precision must be one of {}, got {name:?}", names.join(", "))
        })
    }
}
