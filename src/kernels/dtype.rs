//! The element types our ops run in, and dispatch on a tensor's dtype.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, Error, Layout, Result, Shape, WithDType};
use half::{bf16, f16};

/// The dtypes our ops run in: f32 math on every element.
pub(crate) trait Float: WithDType + Send + Sync {
    fn f32(self) -> f32;
    fn of(v: f32) -> Self;
    fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]>;
}

macro_rules! float {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Float for $t {
            #[inline(always)]
            fn f32(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn of(v: f32) -> Self {
                $from(v)
            }
            fn slice_mut(s: &mut CpuStorage) -> Result<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Ok(v),
                    _ => bail!("expected {:?} storage", <$t>::DTYPE),
                }
            }
        }
    };
}
float!(f32, F32, std::convert::identity, std::convert::identity);
float!(f16, F16, f16::to_f32, f16::from_f32);
float!(bf16, BF16, bf16::to_f32, bf16::from_f32);

/// Runs `$body` with the type alias `$T` set to the Rust type of `$dtype` (f32, f16, bf16).
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, |$T:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = half::f16;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            dt => bail!("{}: unsupported dtype {dt:?}", $op),
        }
    };
}
pub(crate) use by_dtype;

/// A `CustomOp3`'s `cpu_fwd` for a `QkvOp`: `QkvOp::cpu_storages` under the op's name.
macro_rules! qkv_cpu_fwd {
    () => {
        fn cpu_fwd(
            &self,
            q: &candle_core::CpuStorage,
            ql: &candle_core::Layout,
            k: &candle_core::CpuStorage,
            kl: &candle_core::Layout,
            v: &candle_core::CpuStorage,
            vl: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.cpu_storages(self.name(), (q, ql), (k, kl), (v, vl))
        }
    };
}
pub(crate) use qkv_cpu_fwd;

/// The elements of a contiguous layout.
pub(crate) fn contiguous<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// An op on (q, k, v), each a storage of one dtype with its layout: its CPU work, in f32 math.
pub(crate) trait QkvOp {
    fn cpu<T: Float>(&self, q: (&[T], &Layout), k: (&[T], &Layout), v: (&[T], &Layout)) -> Result<Vec<T>>;

    /// `cpu` on candle's storages; the result has q's shape.
    fn cpu_storages(
        &self,
        name: &str,
        (q, ql): (&CpuStorage, &Layout),
        (k, kl): (&CpuStorage, &Layout),
        (v, vl): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(q.dtype(), name, |T| {
            let (q, k, v) = (T::cpu_storage_as_slice(q)?, T::cpu_storage_as_slice(k)?, T::cpu_storage_as_slice(v)?);
            T::to_cpu_storage_owned(self.cpu::<T>((q, ql), (k, kl), (v, vl))?)
        });
        Ok((out, ql.shape().clone()))
    }
}
