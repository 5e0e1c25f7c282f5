//! The memory of every sequence's KV cache, set aside once at load for a byte budget: per layer
//! one k and one v buffer of fixed blocks of `BLOCK_TOKENS` positions. A sequence takes blocks as
//! it grows and gives them back when it shrinks or ends, so nothing is copied to grow.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, WithDType};

use crate::error::{Error, Result};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

pub struct KvPool {
    /// Per layer, each (1, n_kv_heads, blocks * BLOCK_TOKENS, head_dim): block b holds slots
    /// b * BLOCK_TOKENS.. of every head.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    blocks: usize,
    block_bytes: usize,
    /// The free blocks, lowest first: a sequence alone gets its slots in order.
    free: Mutex<BinaryHeap<Reverse<u32>>>,
}

impl KvPool {
    /// As many blocks as `budget` bytes hold (at least one).
    pub fn new(
        layers: usize,
        (n_kv_heads, head_dim): (usize, usize),
        budget: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let block_bytes = 2 * layers * n_kv_heads * BLOCK_TOKENS * head_dim * dtype.size_in_bytes();
        // Slots are u32. Without attention layers blocks take no memory: a million positions.
        let blocks = match block_bytes {
            0 => (1 << 20) / BLOCK_TOKENS,
            _ => (budget / block_bytes).min(u32::MAX as usize / BLOCK_TOKENS),
        };
        if blocks == 0 {
            return Err(Error::invalid(format!(
                "kv_cache_bytes={budget} is less than one block of the KV cache ({block_bytes} bytes: \
                 {BLOCK_TOKENS} positions of {layers} layers)"
            )));
        }
        let shape = (1, n_kv_heads, blocks * BLOCK_TOKENS, head_dim);
        let buffers = || (0..layers).map(|_| zeroed(shape, dtype, device)).collect::<Result<Vec<_>>>();
        let (k, v) = (buffers()?, buffers()?);
        let free = Mutex::new((0..blocks as u32).map(Reverse).collect());
        Ok(Self { k, v, blocks, block_bytes, free })
    }

    /// The budget in use: whole blocks.
    pub fn bytes(&self) -> usize {
        self.blocks * self.block_bytes
    }

    /// Positions the pool holds, all sequences together.
    pub fn capacity(&self) -> usize {
        self.blocks * BLOCK_TOKENS
    }

    /// Positions not held by any sequence.
    pub fn free_positions(&self) -> usize {
        self.lock().len() * BLOCK_TOKENS
    }

    /// The storage of `layer`, k and v, each (1, n_kv_heads, capacity, head_dim).
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// `n` free blocks, or none and an error that says the pool is full.
    pub(crate) fn take(&self, n: usize) -> Result<Vec<u32>> {
        let mut free = self.lock();
        if free.len() < n {
            return Err(Error::KvCacheFull {
                needed: n * BLOCK_TOKENS,
                free: free.len() * BLOCK_TOKENS,
                capacity: self.capacity(),
                bytes: self.bytes(),
            });
        }
        Ok((0..n).filter_map(|_| free.pop().map(|Reverse(b)| b)).collect())
    }

    pub(crate) fn release(&self, blocks: &[u32]) {
        self.lock().extend(blocks.iter().map(|&b| Reverse(b)));
    }

    /// Copies block `src` of every layer onto block `dst`.
    pub(crate) fn copy_block(&self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize * BLOCK_TOKENS, dst as usize * BLOCK_TOKENS);
        for t in self.k.iter().chain(&self.v) {
            t.slice_set(&t.narrow(2, src, BLOCK_TOKENS)?.contiguous()?, 2, dst)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Reverse<u32>>> {
        // The heap is valid whatever a panicking holder did: each change is one call.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A zeroed buffer. On the CPU its pages are mapped only once written (the allocator's zeroed
/// memory comes from the OS that way), so a large budget costs memory only as it is used;
/// candle's `zeros` writes every element.
fn zeroed(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    fn lazily<T: WithDType>(shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let too_large = || Error::invalid(format!("cannot set aside {n} values for the KV cache"));
        let layout = std::alloc::Layout::array::<T>(n).map_err(|_| too_large())?;
        if layout.size() == 0 {
            return Ok(Tensor::zeros(shape, T::DTYPE, &Device::Cpu)?);
        }
        // SAFETY: the layout's size is not zero.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
        if ptr.is_null() {
            return Err(too_large());
        }
        // SAFETY: ptr comes from the global allocator with the layout of n Ts, and zero bytes are
        // a valid T (0.0) for the float types this is called with.
        let data = unsafe { Vec::from_raw_parts(ptr, n, n) };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
    match (device, dtype) {
        (Device::Cpu, DType::F32) => lazily::<f32>(shape),
        (Device::Cpu, DType::F16) => lazily::<half::f16>(shape),
        (Device::Cpu, DType::BF16) => lazily::<half::bf16>(shape),
        _ => Ok(Tensor::zeros(shape, dtype, device)?),
    }
}
