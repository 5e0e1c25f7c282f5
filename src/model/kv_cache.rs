//! Per-layer key/value cache, preallocated; each forward writes its positions in place (kernels::rope_write_kv).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub struct KvCache {
    /// Per layer, each (batch, n_kv_heads, capacity, head_dim).
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Positions filled, the same in every layer between forwards.
    len: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let zeros = || Tensor::zeros((batch, n_kv_heads, capacity, head_dim), dtype, device);
        let k = (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?;
        let v = (0..layers).map(|_| zeros()).collect::<candle_core::Result<_>>()?;
        Ok(Self { k, v, len: 0 })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.k.first().map_or(0, |k| k.dim(2).unwrap_or(0))
    }

    /// Makes room for `extra` more positions, at least doubling when it must grow.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        let capacity = self.capacity();
        if needed <= capacity {
            return Ok(());
        }
        let new_capacity = needed.max(2 * capacity);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let (b, h, _, d) = t.dims4()?;
            let grown = Tensor::zeros((b, h, new_capacity, d), t.dtype(), t.device())?;
            grown.slice_set(&t.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            *t = grown;
        }
        Ok(())
    }

    /// The whole storage of `layer`, k and v, each (batch, n_kv_heads, capacity, head_dim):
    /// positions from `len()` on are free for the forward that writes them.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.k[layer], &self.v[layer])
    }

    /// Forgets every position from `len` on (the storage stays for reuse).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// A deep copy that shares no storage with `self`.
    pub fn try_clone(&self) -> Result<Self> {
        let copy = |ts: &[Tensor]| ts.iter().map(Tensor::copy).collect::<candle_core::Result<Vec<_>>>();
        Ok(Self { k: copy(&self.k)?, v: copy(&self.v)?, len: self.len })
    }

    /// Marks `t` more positions as filled, once every layer has written them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
