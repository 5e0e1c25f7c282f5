//! Rotate-half RoPE, into a new tensor or written into a KV cache.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Error, InplaceOp2, Layout, Result, Shape, Storage, Tensor, WithDType,
};

use super::for_chunks;
use crate::kernels::dtype::{by_dtype, contiguous, Float};
use crate::kernels::shapes::RopeShape;

impl RopeShape {
    /// Writes the (b, h) block `bh` of dst (cap * d elements): source row i at dst row
    /// `slots[i]`, or at pos + i without slots.
    fn write<T: Float>(&self, x: &[T], tables: Option<(&[T], &[T])>, slots: Option<&[u32]>, bh: usize, dst: &mut [T]) {
        let (bi, hi, half) = (bh / self.h, bh % self.h, self.d / 2);
        for ti in 0..self.t {
            let at = self.offset + bi * self.strides[0] + hi * self.strides[1] + ti * self.strides[2];
            let (x1, x2) = x[at..at + self.d].split_at(half);
            let row = slots.map_or(self.pos + ti, |s| s[ti] as usize);
            let (y1, y2) = dst[row * self.d..(row + 1) * self.d].split_at_mut(half);
            match tables {
                Some((cos, sin)) => {
                    let c = (if self.cs_batched { bi * self.t_cs } else { 0 } + ti) * half;
                    let (cos, sin) = (&cos[c..c + half], &sin[c..c + half]);
                    for i in 0..half {
                        let (a, b, co, si) = (x1[i].f32(), x2[i].f32(), cos[i].f32(), sin[i].f32());
                        y1[i] = T::of(a * co - b * si);
                        y2[i] = T::of(b * co + a * si);
                    }
                }
                None => {
                    y1.copy_from_slice(x1);
                    y2.copy_from_slice(x2);
                }
            }
        }
    }

    fn cpu<T: Float>(&self, x: &[T], tables: Option<(&[T], &[T])>, slots: Option<&[u32]>, dst: &mut [T]) {
        let work = 2 * self.b * self.h * self.t * self.d;
        for_chunks(dst, self.cap * self.d, work, || (), |_, bh, block| self.write(x, tables, slots, bh, block));
    }
}

/// RoPE into a new contiguous tensor: (x, cos, sin).
pub(crate) struct Rope;

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "granite-rope"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        cos: &CpuStorage,
        cl: &Layout,
        sin: &CpuStorage,
        sl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = RopeShape::new(xl, xl.dims()[2], 0, Some(cl))?;
        let out = by_dtype!(x.dtype(), self.name(), |T| {
            let mut dst = vec![T::of(0.0); xl.shape().elem_count()];
            let tables = (contiguous::<T>(cos, cl)?, contiguous::<T>(sin, sl)?);
            shape.cpu(T::cpu_storage_as_slice(x)?, Some(tables), None, &mut dst);
            T::to_cpu_storage_owned(dst)
        });
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        cos: &candle_core::CudaStorage,
        cl: &Layout,
        sin: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let shape = RopeShape::new(xl, xl.dims()[2], 0, Some(cl))?;
        let out = crate::kernels::cuda::rope(x, &shape, Some((cos, cl, sin, sl)), None)?;
        Ok((out.ok_or_else(|| Error::Msg("rope: no output".into()))?, xl.shape().clone()))
    }
}

/// Writes its source's position i into the destination cache at slot `slots[i]`, rotated with
/// `tables` when given.
pub(crate) struct CacheWrite<'a> {
    pub(crate) tables: Option<(&'a Tensor, &'a Tensor)>,
    pub(crate) slots: &'a [u32],
}

impl CacheWrite<'_> {
    fn shape(&self, cache: &Layout, xl: &Layout) -> Result<RopeShape> {
        RopeShape::new(xl, cache.dims()[2], 0, self.tables.map(|(c, _)| c.layout()))
    }
}

impl InplaceOp2 for CacheWrite<'_> {
    fn name(&self) -> &'static str {
        "granite-cache-write"
    }

    fn cpu_fwd(&self, cache: &mut CpuStorage, cl: &Layout, x: &CpuStorage, xl: &Layout) -> Result<()> {
        let shape = self.shape(cl, xl)?;
        let tables = self.tables.map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        by_dtype!(x.dtype(), self.name(), |T| {
            let tables = match &tables {
                Some(((c, c_l), (s, s_l))) => match (&**c, &**s) {
                    (Storage::Cpu(c), Storage::Cpu(s)) => Some((contiguous::<T>(c, c_l)?, contiguous::<T>(s, s_l)?)),
                    _ => bail!("rope_write_kv: cos/sin not on the cache's device"),
                },
                None => None,
            };
            let (start, end) = cl.contiguous_offsets().ok_or_else(|| Error::Msg("cache not contiguous".into()))?;
            shape.cpu(T::cpu_storage_as_slice(x)?, tables, Some(self.slots), &mut T::slice_mut(cache)?[start..end]);
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<()> {
        let shape = self.shape(cl, xl)?;
        let tables = self.tables.map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
        let tables = match &tables {
            Some(((c, c_l), (s, s_l))) => match (&**c, &**s) {
                (Storage::Cuda(c), Storage::Cuda(s)) => Some((c, *c_l, s, *s_l)),
                _ => bail!("rope_write_kv: cos/sin not on the cache's device"),
            },
            None => None,
        };
        // Our kernel writes consecutive slots: one launch per run of them, with its table rows.
        let mut i = 0;
        while i < self.slots.len() {
            let first = self.slots[i] as usize;
            let n = self.slots[i..].iter().enumerate().take_while(|&(j, &s)| s as usize == first + j).count();
            let run = RopeShape { t: n, offset: shape.offset + i * shape.strides[2], pos: first, ..shape };
            let rows = |l: &Layout| match (shape.cs_batched, i, n) {
                (false, ..) => l.narrow(0, i, n),
                (true, 0, n) if n == shape.t => Ok(l.clone()),
                _ => bail!("rope_write_kv: per-row tables need consecutive slots on CUDA"),
            };
            let run_tables = match tables {
                Some((c, c_l, s, s_l)) => Some((c, rows(c_l)?, s, rows(s_l)?)),
                None => None,
            };
            let run_tables = run_tables.as_ref().map(|(c, c_l, s, s_l)| (*c, c_l, *s, s_l));
            crate::kernels::cuda::rope(x, &run, run_tables, Some((&mut *cache, cl.start_offset())))?;
            i += n;
        }
        Ok(())
    }
}
