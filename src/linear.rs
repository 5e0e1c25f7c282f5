//! Projections `x · wᵀ + b` over dense, GGUF-quantized or memory-mapped weights. Decode (a few
//! rows) goes through `gemv`, which streams the weights once; longer inputs through `gemv::gemm`
//! (stored formats), candle's matmul (dense weights) or candle's quantized matmul (the k-quants).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor, D};

use crate::error::{Error, Result};
use crate::gemv::{self, Part, Rows};
use crate::mapped::Mapped;

/// Quantized types whose weights enter at their exact values: in `gemv` (which rounds the
/// activations to 16 bits for the block types), or dequantized for a matmul.
const EXACT: [GgmlDType; 6] =
    [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::BF16, GgmlDType::F32];

/// Other quantized types whose prompts also run as gemm on decoded tiles: candle's quantized
/// matmul has no fast path for these (Granite-shaped Q5_K_M, 512-token prompt: 112 -> 198
/// tokens/s), where for Q4_K and Q6_K it beats the tiles (371 against 214).
const TILED: [GgmlDType; 3] = [GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q5K];

/// Up to this many activation rows use `gemv`; more use a matmul.
const GEMV_MAX_ROWS: usize = 8;

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
                gemv::decode_rows(m.rows(), m.shape().1, 0..m.shape().0, &mut values);
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
                    gemv::decode_rows(m.rows(), k, id..id + 1, out);
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
                Some(f(Rows::of(q.dtype(), &data).or_else(|| Rows::other(q.dtype(), &data))?))
            }
            Self::Mapped(m) => Some(f(m.rows())),
        }
    }

    /// This weight and `next` as one matrix, `next`'s rows after this one's, where they share a
    /// storage type; None where they do not.
    fn join(&self, next: &Weight) -> Result<Option<Weight>> {
        Ok(match (self, next) {
            (Self::Dense(a), Self::Dense(b)) => Some(Self::Dense(Tensor::cat(&[a, b], 0)?)),
            (Self::Quantized(a), Self::Quantized(b)) => concat_quantized(a, b)?.map(|q| Self::Quantized(Arc::new(q))),
            (Self::Mapped(a), Self::Mapped(b)) => a.join(b).map(|m| Self::Mapped(Arc::new(m))),
            _ => None,
        })
    }
}

/// Runs `f` on the rows of every weight, with the rows of `held` first, when `gemv` reads them all.
fn with_all_rows<R>(weights: &[Weight], held: Vec<Part<'_>>, f: impl FnOnce(&[Part]) -> R) -> Option<R> {
    let Some((w, rest)) = weights.split_first() else { return Some(f(&held)) };
    let n = w.dims2().ok()?.0;
    w.with_rows(move |rows| {
        let mut held: Vec<Part> = held;
        held.push((rows, n));
        with_all_rows(rest, held, f)
    })
    .flatten()
}

/// `x · wᵀ + b` for one or more weights stacked along the output (fused q/k/v or gate/up).
#[derive(Clone)]
pub struct Linear {
    /// Stacked along the output dimension; several only where they cannot share one storage
    /// (different types, or mapped matrices that are apart in their file).
    parts: Vec<Weight>,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>) -> Self {
        Self { parts: vec![weight], bias }
    }

    /// One projection whose output is the concatenation of several: neighbours that can share
    /// one storage are merged into one matrix.
    pub fn stack(parts: Vec<Linear>) -> Result<Self> {
        let biases: Option<Vec<Tensor>> = parts.iter().map(|l| l.bias.clone()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        let mut merged: Vec<Weight> = Vec::new();
        for w in parts.into_iter().flat_map(|l| l.parts) {
            match merged.last().map(|last| last.join(&w)).transpose()?.flatten() {
                Some(joined) => *merged.last_mut().expect("joined to it") = joined,
                None => merged.push(w),
            }
        }
        Ok(Self { parts: merged, bias })
    }

    pub fn weights(&self) -> &[Weight] {
        &self.parts
    }

    /// x: (..., in) -> (..., out), in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = project(&self.parts, x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
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

/// x (..., k) times the weights stacked along the output, each (n_i, k): (..., Σn_i).
fn project(parts: &[Weight], x: &Tensor) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    let last = out_dims.pop().ok_or_else(|| Error::invalid("a projection needs at least one dimension"))?;
    let mut n = 0;
    for w in parts {
        let (rows, k) = w.dims2()?;
        if last != k {
            return Err(Error::invalid(format!("projection input has {last} features, the weight takes {k}")));
        }
        n += rows;
    }
    let k = last;
    out_dims.push(n);
    let m = x.elem_count() / k.max(1);
    // Ours: gemv for a few rows (not the k-quants); for more, gemm on decoded tiles of stored
    // formats (dense weights go straight to candle's matmul, most k-quants to candle's).
    let few = m <= GEMV_MAX_ROWS;
    let gemv_reads = parts.iter().all(|w| w.stored_type().is_none_or(|t| EXACT.contains(&t)));
    let tiled = parts.iter().all(|w| w.stored_type().is_some_and(|t| EXACT.contains(&t) || TILED.contains(&t)));
    if x.device().is_cpu() && k.is_multiple_of(gemv::GROUP) && if few { gemv_reads } else { tiled } {
        let y = with_all_rows(parts, Vec::new(), |rows| -> Result<Tensor> {
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            let product = if few { gemv::gemv } else { gemv::gemm };
            product(rows, k, &xs, &mut out).map_err(Error::invalid)?;
            Ok(Tensor::from_vec(out, out_dims.clone(), x.device())?.to_dtype(x.dtype())?)
        });
        if let Some(y) = y {
            return y;
        }
    }
    let x2 = x.contiguous()?.reshape((m, k))?;
    let ys = parts
        .iter()
        .map(|w| -> Result<Tensor> {
            Ok(match w {
                Weight::Dense(t) => x2.matmul(&t.t()?)?,
                // candle's quantized matmul, for the k-quants (it quantizes x).
                Weight::Quantized(q) if !EXACT.contains(&q.dtype()) => {
                    QMatMul::QTensor(q.clone()).forward(&x2.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
                }
                // The weights as their f32 values.
                _ => x2.matmul(&w.dequantize(x.dtype())?.t()?)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let y = match &ys[..] {
        [y] => y.clone(),
        ys => Tensor::cat(ys, D::Minus1)?,
    };
    Ok(y.reshape(out_dims)?)
}
