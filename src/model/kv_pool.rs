//! The memory of every sequence's KV cache, set aside once at load for a byte budget: per layer
//! one k and one v buffer of fixed blocks of `BLOCK_TOKENS` positions. A sequence takes blocks as
//! it grows and gives them back when it shrinks or ends, so nothing is copied to grow. With prefix
//! caching, full blocks are indexed by their tokens (`prefix_index`): sequences with the same
//! start share them, and a block let go stays cached until its room is wanted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, WithDType};

use crate::error::{Error, Result};
use crate::model::prefix_index::{ChainHash, PrefixIndex};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 16;

pub struct KvPool {
    /// Per layer, each (1, n_kv_heads, blocks * BLOCK_TOKENS, head_dim): block b holds slots
    /// b * BLOCK_TOKENS.. of every head.
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    blocks: usize,
    block_bytes: usize,
    state: Mutex<Blocks>,
}

/// Who holds which block.
struct Blocks {
    /// The blocks nobody holds and no prefix is cached in, lowest first: a sequence alone gets its
    /// slots in order.
    free: BinaryHeap<Reverse<u32>>,
    /// Per block, the sequences holding it.
    holders: Vec<u32>,
    /// None: prefix caching is off.
    prefixes: Option<PrefixIndex>,
    reuse: PrefixReuse,
}

/// Which blocks sequences index for others to reuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrefixReuse {
    #[default]
    Off,
    /// Those whose every position, from the start, was computed as a prompt's rows: a request
    /// that reuses them gets the bits it gets computing its prompt whole (`KvCache::append`).
    Exact,
    /// Every full block, decode's too: reused keys and values were computed in another forward,
    /// so results agree with an uncached run to float rounding.
    All,
}

impl Blocks {
    /// Blocks a sequence may take: free ones and cached ones nobody holds.
    fn available(&self) -> usize {
        self.free.len() + self.prefixes.as_ref().map_or(0, PrefixIndex::idle)
    }
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
        let free = (0..blocks as u32).map(Reverse).collect();
        let state = Mutex::new(Blocks { free, holders: vec![0; blocks], prefixes: None, reuse: PrefixReuse::Off });
        Ok(Self { k, v, blocks, block_bytes, state })
    }

    /// The budget in use: whole blocks.
    pub fn bytes(&self) -> usize {
        self.blocks * self.block_bytes
    }

    /// Positions the pool holds, all sequences together.
    pub fn capacity(&self) -> usize {
        self.blocks * BLOCK_TOKENS
    }

    /// Sets which blocks are cached for reuse (a change drops what is cached); a model with
    /// Mamba2 layers cannot reuse any, as its state is not in the blocks.
    pub fn set_prefix_reuse(&self, reuse: PrefixReuse) {
        let mut state = self.lock();
        if let Some(mut index) = state.prefixes.take() {
            while let Some(block) = index.evict() {
                state.free.push(Reverse(block));
            }
        }
        state.prefixes = (reuse != PrefixReuse::Off).then(|| PrefixIndex::new(self.blocks));
        state.reuse = reuse;
    }

    pub fn prefix_reuse(&self) -> PrefixReuse {
        self.lock().reuse
    }

    /// Positions not held by any sequence (cached prefixes nobody holds included).
    pub fn free_positions(&self) -> usize {
        self.lock().available() * BLOCK_TOKENS
    }

    /// Positions of cached prefixes that no sequence holds.
    pub fn idle_cached_positions(&self) -> usize {
        self.lock().prefixes.as_ref().map_or(0, PrefixIndex::idle) * BLOCK_TOKENS
    }

    /// The storage of `layer`, k and v, each (1, n_kv_heads, capacity, head_dim).
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// `n` blocks for one sequence, or none and an error that says the pool is full. Free blocks
    /// go first, then the cached prefixes nobody holds, the least recently used first.
    pub(crate) fn take(&self, n: usize) -> Result<Vec<u32>> {
        let mut state = self.lock();
        if state.available() < n {
            return Err(Error::KvCacheFull {
                needed: n * BLOCK_TOKENS,
                free: state.available() * BLOCK_TOKENS,
                capacity: self.capacity(),
                bytes: self.bytes(),
            });
        }
        let state = &mut *state;
        let mut taken = Vec::with_capacity(n);
        while taken.len() < n {
            let next = state.free.pop().map(|Reverse(b)| b);
            let Some(block) = next.or_else(|| state.prefixes.as_mut().and_then(PrefixIndex::evict)) else { break };
            state.holders[block as usize] = 1;
            taken.push(block);
        }
        Ok(taken)
    }

    /// One sequence lets go of `blocks`, given in position order: an indexed block nobody holds
    /// stays cached, the last first to go.
    pub(crate) fn release(&self, blocks: &[u32]) {
        let state = &mut *self.lock();
        for &block in blocks.iter().rev() {
            let holders = &mut state.holders[block as usize];
            *holders = holders.saturating_sub(1);
            if *holders > 0 {
                continue;
            }
            match &mut state.prefixes {
                Some(index) if index.contains(block) => index.park(block),
                _ => state.free.push(Reverse(block)),
            }
        }
    }

    /// The blocks cached for `chunks` (full blocks of tokens) after the block keyed `parent`, as
    /// far as they go, each taken for one more sequence; with their keys.
    pub(crate) fn take_cached<'t>(
        &self,
        mut parent: Option<ChainHash>,
        chunks: impl Iterator<Item = &'t [u32]>,
    ) -> Vec<(u32, ChainHash)> {
        let state = &mut *self.lock();
        let Some(index) = &mut state.prefixes else { return Vec::new() };
        let mut found = Vec::new();
        for tokens in chunks {
            let Some((block, key)) = index.find(parent, tokens) else { break };
            let holders = &mut state.holders[block as usize];
            if *holders == 0 {
                index.unpark(block);
            }
            *holders += 1;
            found.push((block, key));
            parent = Some(key);
        }
        found
    }

    /// Indexes a full `block` as holding `tokens` after the block keyed `parent`; returns its key,
    /// or None when prefix caching is off.
    pub(crate) fn index(&self, block: u32, parent: Option<ChainHash>, tokens: &[u32]) -> Option<ChainHash> {
        Some(self.lock().prefixes.as_mut()?.insert(block, parent, tokens))
    }

    /// Whether others may read `block`: it is indexed, or held by more than one sequence. Such
    /// a block is never written again.
    pub(crate) fn is_shared(&self, block: u32) -> bool {
        let state = self.lock();
        state.holders[block as usize] > 1 || state.prefixes.as_ref().is_some_and(|i| i.contains(block))
    }

    /// Copies block `src` of every layer onto block `dst`.
    pub(crate) fn copy_block(&self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize * BLOCK_TOKENS, dst as usize * BLOCK_TOKENS);
        for t in self.k.iter().chain(&self.v) {
            t.slice_set(&t.narrow(2, src, BLOCK_TOKENS)?.contiguous()?, 2, dst)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        // No code that runs under the lock panics short of a bug.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
