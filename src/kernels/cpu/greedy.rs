//! Greedy decoding's pick: the first index of the largest logit, with a finiteness check.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape};

/// f32 logits (n,) -> u32 (2,): the first index of the largest value, and 1 if every value is
/// finite (else 0).
pub(crate) struct Greedy;

/// The first index of the largest value (NaN never wins; 0 when nothing compares).
pub fn first_max(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in xs.iter().enumerate() {
        if *x > xs[best] || (xs[best].is_nan() && !x.is_nan()) {
            best = i;
        }
    }
    best as u32
}

impl CustomOp1 for Greedy {
    fn name(&self) -> &'static str {
        "granite-greedy"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = x else { bail!("greedy: f32 logits expected, got {:?}", x.dtype()) };
        let Some((start, end)) = l.contiguous_offsets() else { bail!("greedy: contiguous logits expected") };
        let x = &x[start..end];
        let finite = x.iter().all(|v| v.is_finite());
        Ok((CpuStorage::U32(vec![first_max(x), finite as u32]), Shape::from(2)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        if x.dtype() != candle_core::DType::F32 {
            bail!("greedy: f32 logits expected, got {:?}", x.dtype());
        }
        Ok((crate::kernels::cuda::greedy(x, l)?, Shape::from(2)))
    }
}
