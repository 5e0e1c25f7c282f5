//! RMSNorm rows, after the residual add when asked.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, WithDType};

use super::for_chunks;
use crate::kernels::dtype::{by_dtype, contiguous, Float};

/// One row: out = x / rms(x) * w.
fn norm_row<T: Float>(x: &[T], w: &[T], eps: f32, out: &mut [T]) {
    let sum2: f32 = x.iter().map(|v| v.f32() * v.f32()).sum();
    let inv = 1.0 / (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = T::of(v.f32() * inv * w.f32());
    }
}

/// RMSNorm, after the residual add when `scale` is set (then the output is (2, ...): the new
/// residual, then the normed one).
pub(crate) struct RmsNorm {
    pub(crate) eps: f32,
    pub(crate) scale: Option<f32>,
}

impl RmsNorm {
    fn cpu<T: Float>(&self, x: &[T], branch: Option<&[T]>, w: &[T]) -> Vec<T> {
        let n = w.len();
        let work = 2 * x.len();
        let mut dst = vec![T::of(0.0); if branch.is_some() { 2 * x.len() } else { x.len() }];
        let (res, out) = dst.split_at_mut(if branch.is_some() { x.len() } else { 0 });
        let src = match branch {
            Some(branch) => {
                let scale = self.scale.unwrap_or(1.0);
                for_chunks(
                    res,
                    n,
                    work,
                    || (),
                    |_, r, row| {
                        let (x, br) = (&x[r * n..(r + 1) * n], &branch[r * n..(r + 1) * n]);
                        for ((o, x), b) in row.iter_mut().zip(x).zip(br) {
                            *o = T::of(x.f32() + scale * b.f32());
                        }
                    },
                );
                &*res
            }
            None => x,
        };
        for_chunks(out, n, work, || (), |_, r, row| norm_row(&src[r * n..(r + 1) * n], w, self.eps, row));
        dst
    }

    /// Both ops on CPU storages: the residual add only with a branch.
    fn cpu_storage(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        branch: Option<(&CpuStorage, &Layout)>,
        (w, wl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x.dtype(), "rms_norm", |T| {
            let branch = branch.map(|(b, bl)| contiguous::<T>(b, bl)).transpose()?;
            T::to_cpu_storage_owned(self.cpu::<T>(contiguous(x, xl)?, branch, contiguous(w, wl)?))
        });
        Ok((out, self.out_shape(xl)))
    }

    fn out_shape(&self, l: &Layout) -> Shape {
        match self.scale {
            Some(_) => [&[2][..], l.dims()].concat().into(),
            None => l.shape().clone(),
        }
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "granite-rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout, w: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_storage((x, xl), None, (w, wl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::kernels::cuda::rms_norm((x, xl), None, (w, wl), self.eps)?;
        Ok((out, self.out_shape(xl)))
    }
}

impl CustomOp3 for RmsNorm {
    fn name(&self) -> &'static str {
        "granite-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        br: &CpuStorage,
        bl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_storage((x, xl), Some((br, bl)), (w, wl))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        br: &candle_core::CudaStorage,
        bl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out =
            crate::kernels::cuda::rms_norm((x, xl), Some(((br, bl), self.scale.unwrap_or(1.0))), (w, wl), self.eps)?;
        Ok((out, self.out_shape(xl)))
    }
}
