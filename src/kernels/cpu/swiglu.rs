//! silu(gate) * up.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, WithDType};

use super::softmax::exp_nonpositive;
use super::{for_chunks, vectorized};
use crate::kernels::dtype::{by_dtype, contiguous, Float};

/// gate_up (..., 2n) -> (..., n).
pub(crate) struct Swiglu;

/// silu(g) = g / (1 + e^-g), from e^-|g|, which cannot overflow.
#[inline(always)]
pub(crate) fn silu(g: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let sigmoid = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
    g * sigmoid
}

vectorized! {
    /// out = silu(gate) * up.
    pub(crate) fn swiglu_row<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            *o = T::of(silu(g.f32()) * u.f32());
        }
    }
}

impl Swiglu {
    fn out_shape(l: &Layout) -> Shape {
        let mut dims = l.dims().to_vec();
        *dims.last_mut().unwrap() /= 2;
        dims.into()
    }
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "granite-swiglu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let shape = Swiglu::out_shape(xl);
        let n = shape.dims().last().copied().unwrap_or(1);
        let out = by_dtype!(x.dtype(), self.name(), |T| {
            let x = contiguous::<T>(x, xl)?;
            let mut out = vec![T::of(0.0); x.len() / 2];
            for_chunks(
                &mut out,
                n,
                x.len(),
                || (),
                |_, r, row| {
                    let (gate, up) = x[2 * r * n..2 * (r + 1) * n].split_at(n);
                    swiglu_row(gate, up, row);
                },
            );
            T::to_cpu_storage_owned(out)
        });
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &candle_core::CudaStorage, xl: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = Swiglu::out_shape(xl);
        Ok((crate::kernels::cuda::swiglu(x, xl, *shape.dims().last().unwrap_or(&1))?, shape))
    }
}
