//! Projections `x · wᵀ + b` over dense or GGUF-quantized weights. Decode (a few rows) goes
//! through `gemv`, which streams the weights once; longer inputs through `gemv::gemm` (stored
//! formats), candle's matmul (dense weights) or candle's quantized matmul (the k-quants).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor, D};

use crate::error::{Error, Result};
use crate::gemv::{self, Rows};

/// Quantized types whose weights enter at their exact values: in `gemv` (which rounds the
/// activations to 16 bits for the block types), or dequantized for a matmul.
const EXACT: [GgmlDType; 6] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::BF16, GgmlDType::F32];

/// Up to this many activation rows use `gemv`; more use a matmul.
const GEMV_MAX_ROWS: usize = 8;

/// One weight matrix (out, in).
#[derive(Clone)]
pub enum Weight {
    /// In the compute dtype.
    Dense(Tensor),
    /// GGUF blocks (or f16/bf16 values) kept as stored or quantized at load; computed in f32.
    Quantized(Arc<QTensor>),
}

impl Weight {
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(t) => t.dims2()?,
            Self::Quantized(q) => q.shape().dims2()?,
        })
    }

    /// The ggml type name of a quantized weight, or the dtype of a dense one.
    pub fn type_name(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }

    /// The whole matrix in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.to_dtype(dtype)?,
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
        })
    }

    /// Rows `ids` (any shape of u32) in `dtype`: an embedding lookup.
    pub fn rows(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => {
                let mut dims = ids.dims().to_vec();
                dims.push(t.dim(1)?);
                t.index_select(&ids.flatten_all()?, 0)?.reshape(dims)?.to_dtype(dtype)?
            }
            Self::Quantized(q) => q.embedding(ids)?.to_dtype(dtype)?,
        })
    }

    /// Quantizes a dense weight to `to`. Rows whose length is not a multiple of `to`'s block
    /// (256 for the k-quants) fall back to Q8_0, as llama.cpp's quantizer does.
    pub fn quantize(&self, to: GgmlDType) -> Result<Self> {
        let Self::Dense(t) = self else { return Ok(self.clone()) };
        let (_, k) = t.dims2()?;
        let to = if k.is_multiple_of(to.block_size()) { to } else { GgmlDType::Q8_0 };
        if !k.is_multiple_of(to.block_size()) {
            return Ok(self.clone());
        }
        Ok(Self::Quantized(Arc::new(QTensor::quantize(&t.to_dtype(DType::F32)?, to)?)))
    }

    /// Runs `f` on the weight's rows when `gemv` reads their format (CPU only).
    fn with_rows<R>(&self, f: impl FnOnce(Rows) -> R) -> Option<R> {
        match self {
            Self::Dense(t) => {
                if !t.device().is_cpu() || !t.is_contiguous() {
                    return None;
                }
                let (guard, layout) = t.storage_and_layout();
                let span = layout.start_offset()..layout.start_offset() + t.elem_count();
                let rows = match &*guard {
                    Storage::Cpu(CpuStorage::F32(v)) => Rows::F32(&v[span]),
                    Storage::Cpu(CpuStorage::F16(v)) => Rows::F16(&v[span]),
                    Storage::Cpu(CpuStorage::BF16(v)) => Rows::BF16(&v[span]),
                    _ => return None,
                };
                Some(f(rows))
            }
            Self::Quantized(q) => {
                if !q.device().is_cpu() {
                    return None;
                }
                let data = q.data().ok()?;
                let rows = match q.dtype() {
                    GgmlDType::Q4_0 => Rows::Q4_0(&data),
                    GgmlDType::Q4_1 => Rows::Q4_1(&data),
                    GgmlDType::Q8_0 => Rows::Q8_0(&data),
                    GgmlDType::F16 => Rows::F16(cast(&data)?),
                    GgmlDType::BF16 => Rows::BF16(cast(&data)?),
                    _ => return None,
                };
                Some(f(rows))
            }
        }
    }
}

/// The bytes of a half-precision QTensor as its values (candle stores them as such, aligned).
fn cast<T>(bytes: &[u8]) -> Option<&[T]> {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    if !(bytes.as_ptr() as usize).is_multiple_of(align) || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: aligned, whole values, and every bit pattern is a valid f16/bf16.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

/// `x · wᵀ + b` for one or more weights stacked along the output (fused q/k/v or gate/up).
#[derive(Clone)]
pub struct Linear {
    /// Stacked along the output dimension; several only when their storage types differ.
    parts: Vec<Weight>,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { parts: vec![weight], bias }
    }

    /// One projection whose output is the concatenation of several: dense weights and quantized
    /// weights of one type are merged into one matrix.
    pub fn stack(parts: Vec<Linear>) -> Result<Self> {
        let biases: Option<Vec<Tensor>> = parts.iter().map(|l| l.bias.clone()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        let weights: Vec<Weight> = parts.into_iter().flat_map(|l| l.parts).collect();
        let dense: Option<Vec<Tensor>> = weights
            .iter()
            .map(|w| match w {
                Weight::Dense(t) => Some(t.clone()),
                Weight::Quantized(_) => None,
            })
            .collect();
        let merged = match dense {
            Some(ts) => vec![Weight::Dense(Tensor::cat(&ts, 0)?)],
            None => match concat_quantized(&weights)? {
                Some(q) => vec![Weight::Quantized(Arc::new(q))],
                None => weights,
            },
        };
        Ok(Self { parts: merged, bias })
    }

    pub fn weights(&self) -> &[Weight] {
        &self.parts
    }

    /// x: (..., in) -> (..., out), in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.parts[..] {
            [w] => project(w, x)?,
            parts => Tensor::cat(&parts.iter().map(|w| project(w, x)).collect::<Result<Vec<_>>>()?, D::Minus1)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Quantized weights of one ggml type, stacked by rows into one tensor; None if the types differ.
fn concat_quantized(weights: &[Weight]) -> Result<Option<QTensor>> {
    let Some(Weight::Quantized(first)) = weights.first() else { return Ok(None) };
    let dtype = first.dtype();
    let mut data = Vec::new();
    let (mut rows, mut cols) = (0, None);
    for w in weights {
        let Weight::Quantized(q) = w else { return Ok(None) };
        let (n, k) = q.shape().dims2()?;
        if q.dtype() != dtype || cols.is_some_and(|c| c != k) || !q.device().is_cpu() {
            return Ok(None);
        }
        data.extend_from_slice(&q.data()?);
        rows += n;
        cols = Some(k);
    }
    let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, dtype)?;
    Ok(Some(QTensor::new(storage, (rows, cols.unwrap_or(0)))?))
}

fn project(w: &Weight, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let mut out_dims = x.dims().to_vec();
    let last = out_dims.pop().ok_or_else(|| Error::invalid("a projection needs at least one dimension"))?;
    if last != k {
        return Err(Error::invalid(format!("projection input has {last} features, the weight takes {k}")));
    }
    out_dims.push(n);
    let m = x.elem_count() / k.max(1);
    // Ours: gemv for a few rows; for more, gemm on decoded tiles of a stored format (dense
    // weights go straight to candle's matmul).
    let few = m <= GEMV_MAX_ROWS;
    if x.device().is_cpu() && k.is_multiple_of(gemv::GROUP) && (few || matches!(w, Weight::Quantized(_))) {
        let y = w.with_rows(|rows| -> Result<Tensor> {
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            let product = if few { gemv::gemv } else { gemv::gemm };
            product(rows, n, k, &xs, &mut out).map_err(Error::invalid)?;
            Ok(Tensor::from_vec(out, out_dims.clone(), x.device())?.to_dtype(x.dtype())?)
        });
        if let Some(y) = y {
            return y;
        }
    }
    let x2 = x.contiguous()?.reshape((m, k))?;
    let y = match w {
        Weight::Dense(t) => x2.matmul(&t.t()?)?,
        // candle's quantized matmul, for the k-quants (it quantizes x).
        Weight::Quantized(q) if !EXACT.contains(&q.dtype()) => {
            QMatMul::QTensor(q.clone()).forward(&x2.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
        }
        // The weights as their f32 values.
        Weight::Quantized(_) => x2.matmul(&w.dequantize(x.dtype())?.t()?)?,
    };
    Ok(y.reshape(out_dims)?)
}
