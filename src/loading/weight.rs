//! One weight matrix as loaded: dense in the compute dtype, GGUF blocks (kept as stored or
//! quantized at load), or read in place from the mapped checkpoint file.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::kernels::cpu::{self, Rows};
use crate::loading::mapped::Mapped;

/// One weight matrix (out, in).
#[derive(Clone)]
pub enum Weight {
    /// In the compute dtype.
    Dense(Tensor),
    /// GGUF blocks (or f16/bf16 values) kept as stored or quantized at load; computed in f32.
    Quantized(Arc<QTensor>),
    /// Read in place from the checkpoint file, in a format `gemv` reads (CPU only); computed in f32.
    Mapped(Arc<Mapped>),
}

impl Weight {
    pub fn dims2(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Dense(t) => t.dims2()?,
            Self::Quantized(q) => q.shape().dims2()?,
            Self::Mapped(m) => m.shape(),
        })
    }

    /// The ggml type name of a quantized weight, or the dtype of a dense one.
    pub fn type_name(&self) -> String {
        match self {
            Self::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Self::Quantized(q) => format!("{:?}", q.dtype()).to_lowercase(),
            Self::Mapped(m) => format!("{:?}", m.format()).to_lowercase(),
        }
    }

    /// The GGUF type a quantized or mapped weight is stored in.
    pub fn stored_type(&self) -> Option<GgmlDType> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized(q) => Some(q.dtype()),
            Self::Mapped(m) => Some(m.format()),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Mapped(m) => m.bytes().len(),
        }
    }

    /// Whether the matrix is read in place from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self, Self::Mapped(_))
    }

    /// The whole matrix in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.to_dtype(dtype)?,
            Self::Quantized(q) => q.dequantize(&q.device())?.to_dtype(dtype)?,
            Self::Mapped(m) => {
                let mut values = vec![0f32; m.shape().0 * m.shape().1];
                cpu::decode_rows(m.rows(), m.shape().1, 0..m.shape().0, &mut values);
                Tensor::from_vec(values, m.shape(), &Device::Cpu)?.to_dtype(dtype)?
            }
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
            Self::Mapped(m) => {
                let (n, k) = m.shape();
                let ids_flat = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut values = vec![0f32; ids_flat.len() * k];
                for (&id, out) in ids_flat.iter().zip(values.chunks_exact_mut(k)) {
                    let id = id as usize;
                    if id >= n {
                        return Err(Error::invalid(format!("token id {id} is out of range for {n} embeddings")));
                    }
                    cpu::decode_rows(m.rows(), k, id..id + 1, out);
                }
                let mut dims = ids.dims().to_vec();
                dims.push(k);
                Tensor::from_vec(values, dims, ids.device())?.to_dtype(dtype)?
            }
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
    pub(crate) fn with_rows<R>(&self, f: impl FnOnce(Rows) -> R) -> Option<R> {
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
                Some(f(Rows::of(q.dtype(), &data).or_else(|| Rows::other(q.dtype(), &data))?))
            }
            Self::Mapped(m) => Some(f(m.rows())),
        }
    }

    /// This weight and `next` as one matrix, `next`'s rows after this one's, where they share a
    /// storage type; None where they do not.
    pub(crate) fn join(&self, next: &Weight) -> Result<Option<Weight>> {
        Ok(match (self, next) {
            (Self::Dense(a), Self::Dense(b)) => Some(Self::Dense(Tensor::cat(&[a, b], 0)?)),
            (Self::Quantized(a), Self::Quantized(b)) => concat_quantized(a, b)?.map(|q| Self::Quantized(Arc::new(q))),
            (Self::Mapped(a), Self::Mapped(b)) => a.join(b).map(|m| Self::Mapped(Arc::new(m))),
            _ => None,
        })
    }
}

/// Two quantized matrices of one ggml type and width as one, b's rows after a's; None otherwise.
fn concat_quantized(a: &QTensor, b: &QTensor) -> Result<Option<QTensor>> {
    let ((n_a, k), (n_b, k_b)) = (a.shape().dims2()?, b.shape().dims2()?);
    if a.dtype() != b.dtype() || k != k_b || !a.device().is_cpu() || !b.device().is_cpu() {
        return Ok(None);
    }
    let data = [a.data()?, b.data()?].concat();
    let storage = QStorage::from_data(Cow::Owned(data), &Device::Cpu, a.dtype())?;
    Ok(Some(QTensor::new(storage, (n_a + n_b, k))?))
}
