//! Compute dtypes by name: the one list of the names `dtype=` takes.

use candle_core::DType;

/// Each name with its dtype; the first name of each dtype is its canonical one.
const NAMES: [(&str, DType); 10] = [
    ("float32", DType::F32),
    ("f32", DType::F32),
    ("fp32", DType::F32),
    ("float", DType::F32),
    ("bfloat16", DType::BF16),
    ("bf16", DType::BF16),
    ("float16", DType::F16),
    ("f16", DType::F16),
    ("fp16", DType::F16),
    ("half", DType::F16),
];

/// A dtype by its torch or short name; an unknown name is an error that lists the canonical ones.
pub fn parse_dtype(name: &str) -> crate::error::Result<DType> {
    NAMES.iter().find(|(n, _)| *n == name).map(|(_, d)| *d).ok_or_else(|| {
        crate::error::Error::invalid(format!("dtype must be float32, bfloat16 or float16, got {name:?}"))
    })
}

/// The canonical (torch) name of a dtype we compute in.
pub fn dtype_name(dtype: DType) -> &'static str {
    NAMES.iter().find(|(_, d)| *d == dtype).map_or("float32", |(n, _)| n)
}

/// Every accepted name with the canonical name of its dtype.
pub fn dtype_names() -> impl Iterator<Item = (&'static str, &'static str)> {
    NAMES.iter().map(|(n, d)| (*n, dtype_name(*d)))
}
