//! Projections `x · wᵀ + b` over dense, GGUF-quantized or memory-mapped weights. Decode (a few
//! rows) goes through `gemv`, which streams the weights once; longer inputs through `gemm`
//! (stored formats), candle's matmul (dense weights) or candle's quantized matmul (the k-quants
//! where our kernels do not read them).

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor, D};

use crate::error::{Error, Result};
use crate::kernels::cpu::{self, Part, Precision};
use crate::loading::safetensors::Weights;
use crate::loading::weight::Weight;

/// A span of up to this many rows runs as decode (`gemv`); a longer one as a prompt (a matmul).
pub(crate) const GEMV_MAX_ROWS: usize = 8;

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
    /// How a prompt's activations enter the CPU products.
    precision: Precision,
}

impl Linear {
    pub fn new(weight: Weight, bias: Option<Tensor>, precision: Precision) -> Self {
        Self { parts: vec![weight], bias, precision }
    }

    /// The layer `{prefix}.weight` (out, in) and, when `bias`, `{prefix}.bias` (out,).
    pub fn load(w: &Weights, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.matrix(&format!("{prefix}.weight"), [out_dim, in_dim])?;
        let bias = bias.then(|| w.get(&format!("{prefix}.bias"), &[out_dim])).transpose()?;
        Ok(Self::new(weight, bias, w.precision()))
    }

    /// Several HF projections that read the same input, (prefix, out_dim) each, stacked into one.
    pub fn load_stacked(w: &Weights, prefixes: &[(&str, usize)], in_dim: usize, bias: bool) -> Result<Self> {
        let parts = prefixes.iter().map(|(p, out)| Self::load(w, p, *out, in_dim, bias)).collect::<Result<Vec<_>>>()?;
        Self::stack(parts)
    }

    /// One projection whose output is the concatenation of several: neighbours that can share
    /// one storage are merged into one matrix.
    pub fn stack(parts: Vec<Linear>) -> Result<Self> {
        let biases: Option<Vec<Tensor>> = parts.iter().map(|l| l.bias.clone()).collect();
        let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
        let precision = parts.first().map_or(Precision::default(), |l| l.precision);
        let mut merged: Vec<Weight> = Vec::new();
        for w in parts.into_iter().flat_map(|l| l.parts) {
            match merged.last().map(|last| last.join(&w)).transpose()?.flatten() {
                Some(joined) => *merged.last_mut().expect("joined to it") = joined,
                None => merged.push(w),
            }
        }
        Ok(Self { parts: merged, bias, precision })
    }

    pub fn weights(&self) -> &[Weight] {
        &self.parts
    }

    /// Elements of the matrices and the bias.
    pub fn parameter_count(&self) -> usize {
        let matrices: usize = self.parts.iter().filter_map(|w| w.dims2().ok()).map(|(n, k)| n * k).sum();
        matrices + self.bias_len()
    }

    /// Whether a prompt's rows get the same bits however many rows are multiplied at once (on
    /// the CPU): every part is read by `gemm`'s int8 or bf16 kernels.
    pub fn prompt_rows_independent(&self) -> bool {
        let independent = |w: &Weight| w.stored_type().is_some_and(|t| cpu::gemm_rows_independent(t, self.precision));
        self.parts.iter().all(independent)
    }

    /// Elements of the bias, if any.
    pub fn bias_len(&self) -> usize {
        self.bias.as_ref().map_or(0, Tensor::elem_count)
    }

    /// x: (..., in) -> (..., out), in x's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let m = x.elem_count() / x.dim(D::Minus1)?.max(1);
        self.with_bias(project(&self.parts, x, self.precision, m <= GEMV_MAX_ROWS, &[m])?)
    }

    /// `forward` over the rows of several spans packed together, each row computed as it would
    /// be were its span alone: rows of short spans as decode, the others as a prompt.
    pub fn forward_packed(&self, x: &Tensor, rows: &PackedRows) -> Result<Tensor> {
        let y = match (&rows.few[..], &rows.many[..]) {
            (_, []) => project(&self.parts, x, self.precision, true, &rows.few_spans)?,
            ([], _) => project(&self.parts, x, self.precision, false, &rows.many_spans)?,
            (few, many) => {
                let k = x.dim(D::Minus1)?;
                let x2 = x.reshape((few.len() + many.len(), k))?;
                let group = |rows: &[u32], few: bool, spans: &[usize]| -> Result<Tensor> {
                    let idx = Tensor::new(rows, x.device())?;
                    project(&self.parts, &x2.index_select(&idx, 0)?, self.precision, few, spans)
                };
                let both =
                    Tensor::cat(&[group(few, true, &rows.few_spans)?, group(many, false, &rows.many_spans)?], 0)?;
                let mut dims = x.dims().to_vec();
                *dims.last_mut().expect("x has a last dimension") = both.dim(1)?;
                both.index_select(&Tensor::new(&rows.back[..], x.device())?, 0)?.reshape(dims)?
            }
        };
        self.with_bias(y)
    }

    /// Each projection (without bias) on its own f32 rows, as decode, all in one parallel loop:
    /// for each, what `forward` gives f32 rows of a span of at most `GEMV_MAX_ROWS`. None where
    /// `gemv` does not read every weight.
    pub fn forward_each(linears: &[&Linear], xs: &[&[f32]]) -> Result<Option<Vec<Vec<f32>>>> {
        let weights: Vec<Weight> = linears.iter().flat_map(|l| l.parts.iter().cloned()).collect();
        let Some(k) = weights.first().map(Weight::dims2).transpose()?.map(|(_, k)| k) else { return Ok(Some(vec![])) };
        let readable = weights.iter().all(|w| w.stored_type().is_none_or(cpu::gemv_reads));
        if !readable || !k.is_multiple_of(cpu::GROUP) || linears.iter().any(|l| l.bias.is_some()) {
            return Ok(None);
        }
        let widths = linears
            .iter()
            .map(|l| l.parts.iter().map(|w| Ok(w.dims2()?.0)).sum::<Result<usize>>())
            .collect::<Result<Vec<_>>>()?;
        with_all_rows(&weights, Vec::new(), |parts| {
            let mut outs: Vec<Vec<f32>> = xs.iter().zip(&widths).map(|(x, n)| vec![0f32; x.len() / k * n]).collect();
            let mut products = Vec::with_capacity(linears.len());
            let mut first = 0;
            for ((l, x), out) in linears.iter().zip(xs).zip(&mut outs) {
                products.push((&parts[first..first + l.parts.len()], *x, out.as_mut_slice()));
                first += l.parts.len();
            }
            // One model's projections share its precision.
            cpu::gemv_each(&mut products, k, linears[0].precision).map_err(Error::invalid)?;
            Ok(outs)
        })
        .transpose()
    }

    fn with_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Which rows of a packed input are computed as decode (`gemv`: rows of spans of at most
/// `GEMV_MAX_ROWS` rows, as each would be alone) and which as a prompt.
pub struct PackedRows {
    few: Vec<u32>,
    many: Vec<u32>,
    /// The row counts of the spans in `few`, and in `many`.
    few_spans: Vec<usize>,
    many_spans: Vec<usize>,
    /// Where each row lands in `few` then `many` concatenated.
    back: Vec<u32>,
    /// Every span's row count, in order.
    lens: Vec<usize>,
    decode_rows: usize,
}

impl PackedRows {
    /// The rows of spans of these lengths, one after another.
    pub fn new(lens: impl IntoIterator<Item = usize>) -> Self {
        Self::with_decode_rows(lens, GEMV_MAX_ROWS)
    }

    /// As `new`, for spans given as (rows, whether to compute them as a prompt however few).
    pub fn of_spans(spans: impl IntoIterator<Item = (usize, bool)>) -> Self {
        Self::grouped(spans, GEMV_MAX_ROWS)
    }

    /// As `new`, with spans of up to `decode_rows` rows computed as decode.
    pub fn with_decode_rows(lens: impl IntoIterator<Item = usize>, decode_rows: usize) -> Self {
        Self::grouped(lens.into_iter().map(|len| (len, false)), decode_rows)
    }

    /// Whether a span of `len` rows (`as_prompt`: marked so) runs as a prompt.
    pub fn runs_as_prompt(&self, len: usize, as_prompt: bool) -> bool {
        as_prompt || len > self.decode_rows
    }

    fn grouped(spans: impl IntoIterator<Item = (usize, bool)>, decode_rows: usize) -> Self {
        let (mut few, mut many, mut few_spans, mut many_spans) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut lens = Vec::new();
        let mut row = 0u32;
        for (len, as_prompt) in spans {
            lens.push(len);
            let (group, spans) =
                if as_prompt || len > decode_rows { (&mut many, &mut many_spans) } else { (&mut few, &mut few_spans) };
            group.extend(row..row + len as u32);
            spans.push(len);
            row += len as u32;
        }
        let mut back = vec![0u32; row as usize];
        for (i, r) in few.iter().chain(&many).enumerate() {
            back[*r as usize] = i as u32;
        }
        Self { few, many, few_spans, many_spans, back, lens, decode_rows }
    }

    /// Whether every span runs as decode.
    pub fn all_decode(&self) -> bool {
        self.many.is_empty()
    }

    /// Every span's row count, in order.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

/// x (..., k) times the weights stacked along the output, each (n_i, k): (..., Σn_i); as decode
/// (`few` rows) or as a prompt. x's rows are those of `spans` (row counts), each of which gets
/// what it would alone (on the CPU; a GPU's matmul may differ in the last bits).
fn project(parts: &[Weight], x: &Tensor, precision: Precision, few: bool, spans: &[usize]) -> Result<Tensor> {
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
    // Ours where the CPU kernels read every part: `gemv` for a few rows, `gemm` for a prompt
    // (which chooses how); otherwise candle's products.
    let ours = parts.iter().all(|w| match (few, w.stored_type()) {
        (true, t) => t.is_none_or(cpu::gemv_reads),
        (false, Some(t)) => cpu::gemm_reads(t, precision),
        (false, None) => false,
    });
    if x.device().is_cpu() && k.is_multiple_of(cpu::GROUP) && ours {
        let y = with_all_rows(parts, Vec::new(), |rows| -> Result<Tensor> {
            let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut out = vec![0f32; m * n];
            if few {
                cpu::gemv(rows, k, &xs, &mut out, precision)
            } else {
                cpu::gemm(rows, k, &xs, &mut out, precision, spans)
            }
            .map_err(Error::invalid)?;
            Ok(Tensor::from_vec(out, out_dims.clone(), x.device())?.to_dtype(x.dtype())?)
        });
        if let Some(y) = y {
            return y;
        }
    }
    let x2 = x.contiguous()?.reshape((m, k))?;
    let y = match spans {
        // candle's matmul may sum in another order for another row count: span by span on the CPU.
        [_, _, ..] if x.device().is_cpu() => {
            let mut first = 0;
            let ys = spans
                .iter()
                .map(|&len| {
                    first += len;
                    candle_product(parts, &x2.narrow(0, first - len, len)?, x.dtype())
                })
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&ys, 0)?
        }
        _ => candle_product(parts, &x2, x.dtype())?,
    };
    Ok(y.reshape(out_dims)?)
}

/// x2 (m, k) times the weights stacked along the output, on candle's products.
fn candle_product(parts: &[Weight], x2: &Tensor, dtype: DType) -> Result<Tensor> {
    let ys = parts
        .iter()
        .map(|w| -> Result<Tensor> {
            Ok(match w {
                Weight::Dense(t) => x2.matmul(&t.t()?)?,
                // candle's quantized matmul, for the k-quants (it quantizes x).
                Weight::Quantized(q) if !cpu::formats::OWN_TYPES.contains(&q.dtype()) => {
                    QMatMul::QTensor(q.clone()).forward(&x2.to_dtype(DType::F32)?)?.to_dtype(dtype)?
                }
                // The weights as their f32 values.
                _ => x2.matmul(&w.dequantize(dtype)?.t()?)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(match &ys[..] {
        [y] => y.clone(),
        ys => Tensor::cat(ys, D::Minus1)?,
    })
}
