//! Launching our kernels (kernels.cu, compiled to PTX by build.rs) for the ops of `kernels`.

use candle_core::backend::BackendStorage;
use candle_core::builder_arg;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaStorage, DType, Error, Layout, Result, WithDType};

use super::dtype::by_dtype;
use super::shapes::{DecodeAttention, RopeShape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels.ptx"));
const MODULE: &str = "granite_kernels";

/// The element types of our kernels.
trait Elem: CudaDType + DeviceRepr + WithDType {}
impl<T: CudaDType + DeviceRepr + WithDType> Elem for T {}

/// The entry point of `kernel` for T, e.g. `swiglu_bf16`.
fn name<T: WithDType>(kernel: &str) -> String {
    format!("{kernel}_{}", T::DTYPE.as_str())
}

/// The elements of a contiguous layout.
fn contiguous<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| Error::Msg("expected a contiguous tensor".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// From the layout's first element on (for kernels that take strides).
fn strided<'a, T: Elem>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// A 1-D launch of `threads` threads in blocks of `block`.
fn linear(threads: usize, block: u32) -> LaunchConfig {
    let blocks = threads.div_ceil(block as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// A storage with its layout.
pub type View<'a> = (&'a CudaStorage, &'a Layout);

/// RMSNorm rows of x; with `branch` (its view and scale) the result is (2, ...): the new
/// residual x + scale * branch, then the normed rows.
pub fn rms_norm(x: View, branch: Option<(View, f32)>, w: View, eps: f32) -> Result<CudaStorage> {
    fn run<T: Elem>((x, xl): View, branch: Option<(View, f32)>, (w, wl): View, eps: f32) -> Result<CudaStorage> {
        let dev = x.device();
        let (xs, ws) = (contiguous::<T>(x, xl)?, contiguous::<T>(w, wl)?);
        let n = ws.len();
        let rows = xs.len() / n;
        let br = branch.map(|((b, bl), _)| contiguous::<T>(b, bl)).transpose()?;
        // SAFETY: uninitialized device memory, every element of which the kernel writes.
        let mut out = unsafe { dev.alloc::<T>(if br.is_some() { 2 * xs.len() } else { xs.len() }) }?;
        let block = (n.div_ceil(8) as u32).next_multiple_of(32).clamp(32, 1024);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let func = dev.get_or_load_custom_func(&name::<T>("add_rms_norm"), MODULE, PTX)?;
        let mut b = func.builder();
        let null = 0usize;
        b.arg(&xs);
        match &br {
            Some(br) => b.arg(br),
            None => b.arg(&null),
        };
        b.arg(&ws).arg(&mut out);
        builder_arg!(b, n as u32, branch.map_or(1.0, |(_, s)| s), eps);
        // SAFETY: the arguments match the kernel's signature and the buffers their sizes.
        unsafe { b.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(x.0.dtype(), "rms_norm", |T| run::<T>(x, branch, w, eps))
}

/// silu(gate) * up, rows of n out of rows of 2n.
pub fn swiglu(x: &CudaStorage, xl: &Layout, n: usize) -> Result<CudaStorage> {
    fn run<T: Elem>(x: &CudaStorage, xl: &Layout, n: usize) -> Result<CudaStorage> {
        let dev = x.device();
        let xs = contiguous::<T>(x, xl)?;
        let rows = xs.len() / (2 * n);
        // SAFETY: as in rms_norm: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * n) }?;
        let func = dev.get_or_load_custom_func(&name::<T>("swiglu"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xs).arg(&mut out);
        builder_arg!(b, rows, n as u32);
        // SAFETY: as in rms_norm.
        unsafe { b.launch(linear(rows * n, 256)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(x.dtype(), "swiglu", |T| run::<T>(x, xl, n))
}

/// cos and sin storages with their layouts.
pub type Tables<'a> = (&'a CudaStorage, &'a Layout, &'a CudaStorage, &'a Layout);

/// Writes x, rotated when `tables` is given, into `dst` (from element `dst_offset` on), laid out
/// as `shape` says; with no `dst`, into a new (b, h, t, d) buffer, which it returns.
pub fn rope(
    x: &CudaStorage,
    shape: &RopeShape,
    tables: Option<Tables>,
    dst: Option<(&mut CudaStorage, usize)>,
) -> Result<Option<CudaStorage>> {
    fn run<T: Elem>(
        x: &CudaStorage,
        s: &RopeShape,
        tables: Option<Tables>,
        dst: Option<(&mut CudaStorage, usize)>,
    ) -> Result<Option<CudaStorage>> {
        let dev = x.device().clone();
        let xs = x.as_cuda_slice::<T>()?.slice(s.offset..);
        let cs = tables.map(|(c, cl, sn, snl)| Ok::<_, Error>((contiguous::<T>(c, cl)?, contiguous::<T>(sn, snl)?)));
        let cs = cs.transpose()?;
        let mut owned = None;
        let mut dst_view = match dst {
            Some((d, offset)) => d.as_cuda_slice_mut::<T>()?.slice_mut(offset..),
            // SAFETY: as in rms_norm: the kernel writes every element of the (b, h, t, d) buffer.
            None => owned.insert(unsafe { dev.alloc::<T>(s.b * s.h * s.t * s.d) }?).slice_mut(..),
        };
        let func = dev.get_or_load_custom_func(&name::<T>("rope_write"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&xs).arg(&mut dst_view);
        match &cs {
            Some((c, sn)) => b.arg(c).arg(sn),
            None => b.arg(&xs).arg(&xs), // not read without rotation
        };
        builder_arg!(b, s.b as u32, s.h as u32, s.t as u32, s.d as u32);
        builder_arg!(b, s.strides[0], s.strides[1], s.strides[2], s.cap as u32, s.pos as u32);
        builder_arg!(b, s.t_cs as u32, s.cs_batched as i32, cs.is_some() as i32);
        // SAFETY: as in rms_norm.
        unsafe { b.launch(linear(s.b * s.h * s.t * s.d / 2, 256)) }.w()?;
        // The launch borrows the destination view, which borrows `owned`.
        drop(b);
        drop(dst_view);
        Ok(owned.map(|o| CudaStorage::wrap_cuda_slice(o, dev)))
    }
    by_dtype!(x.dtype(), "rope", |T| run::<T>(x, shape, tables, dst))
}

/// Flash-decoding attention (see `kernels::decode_attention`): a block per kv head and up to
/// `GROUP` of its query heads; the context is split so that there are about two blocks per SM,
/// each split at least 64 keys; a second kernel merges the splits.
pub fn decode_attention(op: &DecodeAttention, q: View, k: View, v: View) -> Result<CudaStorage> {
    const BLOCKS: usize = 264;
    const MIN_CHUNK: usize = 64;
    const GROUP: usize = 8; // ATTN_GROUP
    fn run<T: Elem>(op: &DecodeAttention, (q, ql): View, (k, kl): View, (v, vl): View) -> Result<CudaStorage> {
        let dev = q.device();
        let (b, nh, _, d) = ql.shape().dims4()?;
        let nkv = kl.dims()[1];
        if kl.stride() != vl.stride() {
            bail!("decode_attention: the k and v caches must have the same strides");
        }
        let (qs, cs) = (ql.stride(), kl.stride());
        let len = op.slots.len();
        if op.slots.iter().enumerate().any(|(p, &slot)| slot as usize != p) {
            bail!("decode_attention: the CUDA kernel reads positions in order; gather the slots first");
        }
        let blocks = b * nkv * (nh / nkv).div_ceil(GROUP);
        let splits = len.div_ceil(MIN_CHUNK).min(BLOCKS.div_ceil(blocks)).max(1);
        let chunk = len.div_ceil(splits);
        let splits = len.div_ceil(chunk);
        // SAFETY: as in rms_norm: the kernels write every element of both buffers before reading
        // one (`partial` only where there are splits).
        let mut out = unsafe { dev.alloc::<T>(b * nh * d) }?;
        // SAFETY: as for `out`.
        let mut partial = unsafe { dev.alloc::<f32>(if splits > 1 { b * nh * splits * (d + 2) } else { 1 }) }?;
        let (qv, kv, vv) = (strided::<T>(q, ql)?, strided::<T>(k, kl)?, strided::<T>(v, vl)?);
        let func = dev.get_or_load_custom_func(&name::<T>("decode_attention"), MODULE, PTX)?;
        let mut a = func.builder();
        a.arg(&qv).arg(&kv).arg(&vv).arg(&mut out).arg(&mut partial);
        builder_arg!(a, nh as u32, nkv as u32, d as u32, qs[0], qs[1], cs[0], cs[1], cs[2]);
        builder_arg!(a, len as u32, chunk as u32, op.scale);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, splits as u32, 1),
            block_dim: (32 * 4, 1, 1), // ATTN_WARPS warps
            shared_mem_bytes: 0,
        };
        // SAFETY: as in rms_norm.
        unsafe { a.launch(cfg) }.w()?;
        drop(a);
        if splits > 1 {
            let func = dev.get_or_load_custom_func(&name::<T>("attention_combine"), MODULE, PTX)?;
            let mut c = func.builder();
            c.arg(&partial).arg(&mut out);
            builder_arg!(c, d as u32, splits as u32);
            let cfg = LaunchConfig {
                grid_dim: ((b * nh) as u32, 1, 1),
                block_dim: ((d as u32).next_multiple_of(32), 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: as in rms_norm.
            unsafe { c.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    by_dtype!(q.0.dtype(), "decode_attention", |T| run::<T>(op, q, k, v))
}

/// Greedy decoding's pick from f32 logits: two u32s, the first index of the largest value and
/// whether every value is finite (one transfer to the host for both).
pub fn greedy(x: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    let dev = x.device();
    let xs = contiguous::<f32>(x, l)?;
    // SAFETY: as in rms_norm: the kernel writes both elements.
    let mut out = unsafe { dev.alloc::<u32>(2) }?;
    let func = dev.get_or_load_custom_func("greedy_f32", MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&xs);
    builder_arg!(b, xs.len() as u32);
    b.arg(&mut out);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as in rms_norm.
    unsafe { b.launch(cfg) }.w()?;
    drop(b);
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
