//! One sequence's per-layer key/value cache, preallocated; each forward writes its positions in
//! place (kernels::rope_write_kv).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub struct KvCache {
    /// Per layer, each (1, n_kv_heads, capacity, head_dim); none until the first `reserve`,
    /// so that no buffer is ever empty (a 0-byte CUDA allocation can fail).
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    layers: usize,
    /// (n_kv_heads, head_dim) of every buffer.
    dims: (usize, usize),
    dtype: DType,
    device: Device,
    /// Positions filled, the same in every layer between forwards.
    len: usize,
}

impl KvCache {
    pub fn new(
        layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut cache = Self {
            k: Vec::new(),
            v: Vec::new(),
            layers,
            dims: (n_kv_heads, head_dim),
            dtype,
            device: device.clone(),
            len: 0,
        };
        cache.reserve(capacity)?;
        Ok(cache)
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
        let (h, d) = self.dims;
        let grow = |old: Option<&Tensor>| -> Result<Tensor> {
            let grown = Tensor::zeros((1, h, new_capacity, d), self.dtype, &self.device)?;
            if let Some(old) = old.filter(|_| self.len > 0) {
                grown.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(grown)
        };
        self.k = (0..self.layers).map(|i| grow(self.k.get(i))).collect::<Result<_>>()?;
        self.v = (0..self.layers).map(|i| grow(self.v.get(i))).collect::<Result<_>>()?;
        Ok(())
    }

    /// The whole storage of `layer`, k and v, each (1, n_kv_heads, capacity, head_dim):
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
        Ok(Self { k: copy(&self.k)?, v: copy(&self.v)?, device: self.device.clone(), ..*self })
    }

    /// Marks `t` more positions as filled, once every layer has written them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buffers(c: &KvCache) -> Vec<usize> {
        c.k.iter().chain(&c.v).map(Tensor::elem_count).collect()
    }

    #[test]
    fn no_buffer_is_empty_and_growing_keeps_the_positions() -> Result<()> {
        let mut c = KvCache::new(2, 2, 4, 0, DType::F32, &Device::Cpu)?;
        assert!(buffers(&c).is_empty(), "an empty cache holds no buffers");
        c.reserve(0)?;
        assert!(buffers(&c).is_empty());
        c.reserve(3)?;
        assert_eq!(buffers(&c), vec![2 * 3 * 4; 4]);
        let filled = Tensor::arange(0f32, 24.0, &Device::Cpu)?.reshape((1, 2, 3, 4))?;
        for t in c.k.iter().chain(&c.v) {
            t.slice_set(&filled, 2, 0)?;
        }
        c.advance(3);
        c.reserve(2)?;
        assert_eq!(c.capacity(), 6, "growing at least doubles");
        for t in c.k.iter().chain(&c.v) {
            let kept = t.narrow(2, 0, 3)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(kept, filled.flatten_all()?.to_vec1::<f32>()?);
        }
        let copy = c.try_clone()?;
        assert_eq!((copy.len(), copy.capacity()), (3, 6));
        Ok(())
    }
}
