//! Fused decoder ops as candle ops: RMSNorm with the residual add, RoPE with the KV-cache write,
//! single-query attention over the cache, SwiGLU. Each runs on the CPU (f32, f16, bf16; computed
//! in f32, rows in parallel when there is enough work) and, with the `cuda` feature, as one of our
//! kernels (src/cuda/kernels.cu).
//!
//! Greedy sampling on the GPU needs no op of ours: candle's `argmax` runs on the device
//! (`logits.argmax(D::Minus1)?.to_vec1::<u32>()` copies one u32 per row to the host).

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Error, InplaceOp2, Layout, Result, Shape, Storage,
    Tensor, WithDType, D,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// new_residual = residual + scale * branch; normed = rmsnorm(new_residual) * weight.
/// residual and branch (..., hidden), contiguous; weight (hidden,). Both results have residual's
/// shape (views of one buffer); new_residual is rounded to the dtype before it is normalized.
pub fn add_rms_norm(
    residual: &Tensor,
    branch: &Tensor,
    scale: f64,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    if residual.shape() != branch.shape() {
        bail!("add_rms_norm: residual {:?} and branch {:?} differ", residual.shape(), branch.shape());
    }
    check_norm(residual, weight)?;
    let both = residual.apply_op3_no_bwd(branch, weight, &RmsNorm { eps: eps as f32, scale: Some(scale as f32) })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// rmsnorm(x) * weight over the last dim; x contiguous, weight (hidden,).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    check_norm(x, weight)?;
    x.apply_op2_no_bwd(weight, &RmsNorm { eps: eps as f32, scale: None })
}

/// Rotate-half RoPE on q and k (as `candle_nn::rotary_emb::rope`), the rotated k and v written into
/// the caches at positions pos..pos + t. Returns the rotated q, (b, n_heads, t, head_dim) contiguous.
///
/// q (b, n_heads, t, head_dim), k and v (b, n_kv, t, head_dim): any strides with the last one 1,
/// so views of the qkv projection need no copy. cos, sin: (t_cs, head_dim / 2) or per row
/// (b, t_cs, head_dim / 2), t_cs >= t (the first t rows are used), contiguous. Caches
/// (b, n_kv, capacity, head_dim), contiguous, pos + t <= capacity. All of one dtype and device.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: usize,
) -> Result<Tensor> {
    let (b, _, t, d) = q.dims4()?;
    let bad_q = q.stride()[3] != 1 || d % 2 != 0;
    if bad_q || k.dims4()? != v.dims4()? || k.dim(0)? != b || k.dim(2)? != t || k.dim(3)? != d {
        bail!("rope_write_kv: q {:?}, k {:?}, v {:?} do not match", q.shape(), k.shape(), v.shape());
    }
    check_tables(cos, sin, b, t, d)?;
    check_cache(k_cache, k, pos)?;
    check_cache(v_cache, v, pos)?;
    k_cache.inplace_op2(k, &CacheWrite { tables: Some((cos, sin)), pos })?;
    v_cache.inplace_op2(v, &CacheWrite { tables: None, pos })?;
    q.apply_op3_no_bwd(cos, sin, &Rope)
}

/// Attention of one query per (row, head) over the first `len` cached positions, GQA (n_heads a
/// multiple of n_kv), softmax(scale q k^T) v in f32 without a mask. q (b, n_heads, 1, head_dim),
/// caches (b, n_kv, capacity, head_dim), each with any strides but the last 1; head_dim <= 256.
/// Returns (b, n_heads, 1, head_dim) contiguous, so `.reshape((b, 1, n_heads * head_dim))` is free.
pub fn decode_attention(q: &Tensor, k_cache: &Tensor, v_cache: &Tensor, len: usize, scale: f64) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, cap, kd) = k_cache.dims4()?;
    if t != 1 || kb != b || kd != d || v_cache.dims4()? != (kb, nkv, cap, kd) || nkv == 0 || nh % nkv != 0 {
        bail!("decode_attention: q {:?}, caches {:?} {:?}", q.shape(), k_cache.shape(), v_cache.shape());
    }
    if len == 0 || len > cap || d > 256 {
        bail!("decode_attention: len {len} of capacity {cap}, head_dim {d} (at most 256)");
    }
    for (name, x) in [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)] {
        if x.stride()[3] != 1 {
            bail!("decode_attention: {name} needs a last stride of 1");
        }
    }
    q.apply_op3_no_bwd(k_cache, v_cache, &DecodeAttention { len, scale: scale as f32 })
}

/// Causal softmax over the last dim of `scores` (..., rows, start + t), contiguous, on the CPU, in
/// place: row r holds the scores of query r % t (query heads stacked along the rows), which sees
/// the first start + r % t + 1 keys; the keys after those get probability 0.
pub fn causal_softmax_(scores: &Tensor, start: usize, t: usize) -> Result<()> {
    let dims = scores.dims();
    let (rows, len) = match dims {
        [.., rows, len] => (*rows, *len),
        _ => bail!("causal_softmax_: scores {:?}", scores.shape()),
    };
    if t == 0 || len != start + t || rows % t != 0 || !scores.is_contiguous() || !scores.device().is_cpu() {
        bail!("causal_softmax_: scores {:?} for {t} queries after {start} keys", scores.layout());
    }
    scores.inplace_op1(&CausalSoftmax { start, t })
}

/// silu(gate) * up for gate_up (..., 2 * n), gate the first half; contiguous.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.dim(D::Minus1)? % 2 != 0 {
        bail!("swiglu: odd last dim in {:?}", gate_up.shape());
    }
    gate_up.apply_op1_no_bwd(&Swiglu)
}

fn check_norm(x: &Tensor, weight: &Tensor) -> Result<()> {
    if weight.dims() != [x.dim(D::Minus1)?] {
        bail!("rms_norm: weight {:?} for input {:?}", weight.shape(), x.shape());
    }
    Ok(())
}

fn check_tables(cos: &Tensor, sin: &Tensor, b: usize, t: usize, d: usize) -> Result<()> {
    let ok = match *cos.dims() {
        [t_cs, half] => t_cs >= t && half * 2 == d,
        [cb, t_cs, half] => cb == b && t_cs >= t && half * 2 == d,
        _ => false,
    };
    if !ok || cos.shape() != sin.shape() || !cos.is_contiguous() || !sin.is_contiguous() {
        bail!("rope: cos {:?} and sin {:?} for b {b}, t {t}, head_dim {d}", cos.shape(), sin.shape());
    }
    Ok(())
}

/// Whether x (b, h, t, d) can be written into `cache` (b, h, cap, d) at `pos`.
fn check_cache(cache: &Tensor, x: &Tensor, pos: usize) -> Result<()> {
    let (b, h, t, d) = x.dims4()?;
    let (cb, ch, cap, cd) = cache.dims4()?;
    if (cb, ch, cd) != (b, h, d) || pos + t > cap || !cache.is_contiguous() || x.stride()[3] != 1 || d % 2 != 0 {
        bail!("rope_write_kv: cannot write {:?} into cache {:?} at {pos}", x.layout(), cache.shape());
    }
    Ok(())
}

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
#[cfg(feature = "cuda")]
pub(crate) use by_dtype;

/// The elements of a contiguous layout.
fn contiguous<'a, T: Float>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| Error::Msg("expected a contiguous tensor".into()))?;
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

/// Defines a function whose body is compiled twice, for AVX2+FMA (called where the CPU has them)
/// and for the baseline. The loops of the ops below are written for the compiler to vectorize,
/// and x86-64's baseline gives it 4 lanes and no FMA; the helpers they call are `#[inline(always)]`.
macro_rules! vectorized {
    ($(#[$m:meta])* fn $name:ident<T: Float>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        fn $name<T: Float>($($arg: $ty),*) {
            #[inline(always)]
            fn body<T: Float>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            if crate::gemv::avx2() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast<T: Float>($($arg: $ty),*) {
                    body($($arg),*)
                }
                // SAFETY: the features are present.
                return unsafe { fast($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

/// Elements touched below which a CPU op stays on the calling thread.
const PARALLEL_WORK: usize = 1 << 15;

/// Calls `f(scratch, i, chunk)` on each `chunk`-long piece of `dst`, in parallel when `work` (elements
/// touched) is large enough; `init` makes one scratch per worker.
fn for_chunks<T: Send, S>(
    dst: &mut [T],
    chunk: usize,
    work: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if work >= PARALLEL_WORK && dst.len() > chunk {
        dst.par_chunks_mut(chunk).enumerate().for_each_init(init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        dst.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(&mut s, i, c));
    }
}

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
struct RmsNorm {
    eps: f32,
    scale: Option<f32>,
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
        let out = by_dtype!(x.dtype(), CustomOp2::name(self), |T| {
            T::to_cpu_storage_owned(self.cpu::<T>(contiguous(x, xl)?, None, contiguous(w, wl)?))
        });
        Ok((out, self.out_shape(xl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::rms_norm(x, xl, None, w, wl, self.eps)?;
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
        let out = by_dtype!(x.dtype(), CustomOp3::name(self), |T| {
            let (x, br, w) = (contiguous(x, xl)?, contiguous(br, bl)?, contiguous(w, wl)?);
            T::to_cpu_storage_owned(self.cpu::<T>(x, Some(br), w))
        });
        Ok((out, self.out_shape(xl)))
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
        let out = crate::cuda::rms_norm(x, xl, Some((br, bl, self.scale.unwrap_or(1.0))), w, wl, self.eps)?;
        Ok((out, self.out_shape(xl)))
    }
}

/// How a RoPE source and its destination are laid out: src (b, h, t, d) with `strides` from
/// `offset`, dst (b, h, cap, d) contiguous, written at positions pos..pos + t.
#[derive(Clone, Copy)]
pub(crate) struct RopeShape {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub d: usize,
    pub offset: usize,
    pub strides: [usize; 3],
    pub cap: usize,
    pub pos: usize,
    /// Rows of the cos/sin tables, and whether they have a batch dim.
    pub t_cs: usize,
    pub cs_batched: bool,
}

impl RopeShape {
    fn new(xl: &Layout, cap: usize, pos: usize, tables: Option<&Layout>) -> Result<Self> {
        let (b, h, t, d) = xl.shape().dims4()?;
        let s = xl.stride();
        let (t_cs, cs_batched) = match tables.map(|l| l.dims()) {
            Some(&[t_cs, _]) => (t_cs, false),
            Some(&[_, t_cs, _]) => (t_cs, true),
            _ => (0, false),
        };
        Ok(Self { b, h, t, d, offset: xl.start_offset(), strides: [s[0], s[1], s[2]], cap, pos, t_cs, cs_batched })
    }

    /// Writes the (b, h) block `bh` of dst (cap * d elements).
    fn write<T: Float>(&self, x: &[T], tables: Option<(&[T], &[T])>, bh: usize, dst: &mut [T]) {
        let (bi, hi, half) = (bh / self.h, bh % self.h, self.d / 2);
        for ti in 0..self.t {
            let at = self.offset + bi * self.strides[0] + hi * self.strides[1] + ti * self.strides[2];
            let (x1, x2) = x[at..at + self.d].split_at(half);
            let (y1, y2) = dst[(self.pos + ti) * self.d..(self.pos + ti + 1) * self.d].split_at_mut(half);
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

    fn cpu<T: Float>(&self, x: &[T], tables: Option<(&[T], &[T])>, dst: &mut [T]) {
        let work = 2 * self.b * self.h * self.t * self.d;
        for_chunks(dst, self.cap * self.d, work, || (), |_, bh, block| self.write(x, tables, bh, block));
    }
}

/// RoPE into a new contiguous tensor: (x, cos, sin).
struct Rope;

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
            shape.cpu(T::cpu_storage_as_slice(x)?, Some(tables), &mut dst);
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
        let out = crate::cuda::rope(x, &shape, Some((cos, cl, sin, sl)), None)?;
        Ok((out.ok_or_else(|| Error::Msg("rope: no output".into()))?, xl.shape().clone()))
    }
}

/// Writes its source into the destination cache at `pos`, rotated with `tables` when given.
struct CacheWrite<'a> {
    tables: Option<(&'a Tensor, &'a Tensor)>,
    pos: usize,
}

impl CacheWrite<'_> {
    fn shape(&self, cache: &Layout, xl: &Layout) -> Result<RopeShape> {
        RopeShape::new(xl, cache.dims()[2], self.pos, self.tables.map(|(c, _)| c.layout()))
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
            shape.cpu(T::cpu_storage_as_slice(x)?, tables, &mut T::slice_mut(cache)?[start..end]);
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
        let start = cl.start_offset();
        crate::cuda::rope(x, &shape, tables, Some((cache, start))).map(|_| ())
    }
}

/// a · b with eight independent sums, so that the compiler vectorizes it.
#[inline(always)]
fn dot<T: Float>(a: &[f32], b: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.f32()).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += xa[i] * xb[i].f32();
        }
    }
    sum8(acc) + tail
}

/// The sum of 8 lanes as a tree, which the compiler keeps in vector registers.
#[inline(always)]
fn sum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `attend` for a head size known when compiling: the sums stay in registers, four chains of
/// them for q · k so that consecutive multiply-adds do not wait on each other.
#[inline(always)]
fn attend_sized<T: Float, const D: usize>(
    q: &[f32],
    (k, k_step): (&[T], usize),
    (v, v_step): (&[T], usize),
    scores: &mut [f32],
    out: &mut [T],
) {
    let q: &[f32; D] = q.try_into().expect("head size");
    for (p, s) in scores.iter_mut().enumerate() {
        let row: &[T; D] = k[p * k_step..p * k_step + D].try_into().expect("head size");
        let mut acc = [[0f32; 8]; 4];
        for c in 0..D / 8 {
            for i in 0..8 {
                acc[c % 4][i] += q[8 * c + i] * row[8 * c + i].f32();
            }
        }
        *s = sum8(std::array::from_fn(|i| (acc[0][i] + acc[1][i]) + (acc[2][i] + acc[3][i])));
    }
    causal_softmax_row(scores, scores.len());
    let mut acc = [0f32; D];
    for (p, s) in scores.iter().enumerate() {
        let row: &[T; D] = v[p * v_step..p * v_step + D].try_into().expect("head size");
        for (a, x) in acc.iter_mut().zip(row) {
            *a += s * x.f32();
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::of(a);
    }
}

/// e^x for x ≤ 0 (a softmax's scores less their max) in f32 arithmetic the compiler vectorizes:
/// 2^n e^f with |f| ≤ ln 2 / 2 and e^f to degree 7 (relative error about 1e-7 near 0); 0 below
/// -87, where e^x leaves f32's normal range; NaN stays NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12582912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    let t = if x < -87.0 { -87.0 } else { x } * std::f32::consts::LOG2_E;
    let shifted = t + ROUND;
    let f = (t - (shifted - ROUND)) * std::f32::consts::LN_2;
    let n = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * f + c;
    }
    let e = p * f32::from_bits(((n + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        e
    }
}

/// scores -> probabilities in place; see `causal_softmax_`.
struct CausalSoftmax {
    start: usize,
    t: usize,
}

vectorized! {
    /// Softmax of the first `seen` values of `row`; the rest become 0.
    fn causal_softmax_row<T: Float>(row: &mut [T], seen: usize) {
        let (seen, unseen) = row.split_at_mut(seen);
        // Eight lanes each, so that the compiler vectorizes; `>` keeps a NaN out of the max, and
        // the NaN then reaches every probability through the sum.
        let mut max = [f32::NEG_INFINITY; 8];
        let mut chunks = seen.chunks_exact(8);
        for c in chunks.by_ref() {
            for (m, v) in max.iter_mut().zip(c) {
                *m = if v.f32() > *m { v.f32() } else { *m };
            }
        }
        let max = chunks.remainder().iter().map(|v| v.f32()).chain(max).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = [0f32; 8];
        let mut chunks = seen.chunks_exact_mut(8);
        for c in chunks.by_ref() {
            for (s, v) in sum.iter_mut().zip(c) {
                let e = exp_nonpositive(v.f32() - max);
                *s += e;
                *v = T::of(e);
            }
        }
        for v in chunks.into_remainder() {
            let e = exp_nonpositive(v.f32() - max);
            sum[0] += e;
            *v = T::of(e);
        }
        let inv = 1.0 / sum.iter().sum::<f32>();
        for v in seen {
            *v = T::of(v.f32() * inv);
        }
        unseen.fill(T::of(0.0));
    }
}

impl candle_core::InplaceOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "granite-causal-softmax"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let len = self.start + self.t;
        let (from, to) = l.contiguous_offsets().ok_or_else(|| Error::Msg("expected a contiguous tensor".into()))?;
        by_dtype!(s.dtype(), self.name(), |T| {
            let scores = &mut T::slice_mut(s)?[from..to];
            let work = scores.len();
            for_chunks(scores, len, work, || (), |_, r, row| causal_softmax_row(row, self.start + r % self.t + 1));
        });
        Ok(())
    }
}

vectorized! {
    /// One query over the keys and values at rows 0, step, 2 step, ... of `k` and `v` (one per
    /// score): out = softmax(q · k_p) · v_p.
    #[allow(clippy::too_many_arguments)]
    fn attend<T: Float>(
        q: &[f32],
        k: &[T],
        k_step: usize,
        v: &[T],
        v_step: usize,
        scores: &mut [f32],
        acc: &mut [f32],
        out: &mut [T],
    ) {
        let d = q.len();
        match d {
            64 => return attend_sized::<T, 64>(q, (k, k_step), (v, v_step), scores, out),
            128 => return attend_sized::<T, 128>(q, (k, k_step), (v, v_step), scores, out),
            _ => {}
        }
        for (p, s) in scores.iter_mut().enumerate() {
            *s = dot(q, &k[p * k_step..p * k_step + d]);
        }
        causal_softmax_row(scores, scores.len());
        acc.fill(0.0);
        for (p, s) in scores.iter().enumerate() {
            for (a, x) in acc.iter_mut().zip(&v[p * v_step..p * v_step + d]) {
                *a += s * x.f32();
            }
        }
        for (o, a) in out.iter_mut().zip(acc.iter()) {
            *o = T::of(*a);
        }
    }
}

/// (q, k_cache, v_cache) -> attention output; see `decode_attention`.
pub(crate) struct DecodeAttention {
    pub len: usize,
    pub scale: f32,
}

impl DecodeAttention {
    #[allow(clippy::too_many_arguments)]
    fn cpu<T: Float>(&self, q: &[T], ql: &Layout, k: &[T], kl: &Layout, v: &[T], vl: &Layout) -> Result<Vec<T>> {
        let (b, nh, _, d) = ql.shape().dims4()?;
        let (_, nkv, _, _) = kl.shape().dims4()?;
        let (qs, ks, vs) = (ql.stride(), kl.stride(), vl.stride());
        let (len, rep) = (self.len, nh / nkv);
        let mut out = vec![T::of(0.0); b * nh * d];
        let work = b * nh * len * d * 2;
        let init = || (vec![0f32; d], vec![0f32; len], vec![0f32; d]);
        for_chunks(&mut out, d, work, init, |(qf, scores, acc), bh, out| {
            let (bi, hi) = (bh / nh, bh % nh);
            let qo = ql.start_offset() + bi * qs[0] + hi * qs[1];
            for (f, x) in qf.iter_mut().zip(&q[qo..qo + d]) {
                *f = x.f32() * self.scale;
            }
            let ko = kl.start_offset() + bi * ks[0] + (hi / rep) * ks[1];
            let vo = vl.start_offset() + bi * vs[0] + (hi / rep) * vs[1];
            attend(qf, &k[ko..], ks[2], &v[vo..], vs[2], scores, acc, out);
        });
        Ok(out)
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "granite-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(q.dtype(), self.name(), |T| {
            let (q, k, v) = (T::cpu_storage_as_slice(q)?, T::cpu_storage_as_slice(k)?, T::cpu_storage_as_slice(v)?);
            T::to_cpu_storage_owned(self.cpu::<T>(q, ql, k, kl, v, vl)?)
        });
        Ok((out, ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::decode_attention(self, q, ql, k, kl, v, vl)?, ql.shape().clone()))
    }
}

/// gate_up (..., 2n) -> (..., n).
struct Swiglu;

vectorized! {
    /// out = silu(gate) * up, with silu(g) = g / (1 + e^-g) from e^-|g|, which cannot overflow.
    fn swiglu_row<T: Float>(gate: &[T], up: &[T], out: &mut [T]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            let g = g.f32();
            let e = exp_nonpositive(-g.abs());
            let sigmoid = if g >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            *o = T::of(g * sigmoid * u.f32());
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
        Ok((crate::cuda::swiglu(x, xl, *shape.dims().last().unwrap_or(&1))?, shape))
    }
}
