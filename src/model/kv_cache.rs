//! One sequence's cache: its key/value blocks of the shared pool, in position order, and (for
//! models with Mamba2 layers) its recurrent state. Each forward writes its positions' keys in
//! place (kernels::rope_write_kv) at the slots the blocks give them. With prefix caching, each
//! full block is indexed in the pool as it fills, and a new sequence starts from the blocks
//! cached for the start of its prompt (`reuse_prefix`); a shared block is copied before a write.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::Result;
use crate::model::kv_pool::{KvPool, PrefixReuse, BLOCK_TOKENS};
use crate::model::prefix_index::ChainHash;
use crate::model::ssm_state::{SsmStates, StateShape};

pub struct KvCache {
    pool: Arc<KvPool>,
    /// Block i holds positions i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS.
    blocks: Vec<u32>,
    /// Positions filled, the same in every layer between forwards.
    len: usize,
    /// The tokens of those positions.
    tokens: Vec<u32>,
    /// How many of the first positions were computed as a prompt's rows (`PackedRows`): those a
    /// request reading the same prompt computes with the same bits.
    as_prompt: usize,
    /// The prefix index's key of each full block (none with prefix caching off).
    keys: Vec<ChainHash>,
    /// The Mamba2 layers' state, if the model has any.
    ssm: Option<SsmStates>,
}

impl KvCache {
    pub fn new(pool: Arc<KvPool>, ssm: Option<StateShape>) -> Self {
        let ssm = ssm.map(SsmStates::new);
        Self { pool, blocks: Vec::new(), len: 0, tokens: Vec::new(), as_prompt: 0, keys: Vec::new(), ssm }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the blocks held hold.
    pub fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_TOKENS
    }

    /// Takes blocks from the pool for `extra` more positions, and a block of its own for the
    /// last one filled in part if others may read it; an error when the pool is full.
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let part = self.len / BLOCK_TOKENS;
        if !self.len.is_multiple_of(BLOCK_TOKENS) && self.pool.is_shared(self.blocks[part]) {
            let own = self.pool.take(1)?[0];
            self.pool.copy_block(self.blocks[part], own)?;
            self.pool.release(&[std::mem::replace(&mut self.blocks[part], own)]);
        }
        let needed = (self.len + extra).div_ceil(BLOCK_TOKENS).saturating_sub(self.blocks.len());
        if needed > 0 {
            self.blocks.extend(self.pool.take(needed)?);
        }
        Ok(())
    }

    /// The pool slot of each position 0..n (n <= capacity).
    pub fn slots(&self, n: usize) -> Vec<u32> {
        (0..n).map(|p| self.blocks[p / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (p % BLOCK_TOKENS) as u32).collect()
    }

    /// The storage of `layer`, k and v, each (1, n_kv_heads, pool slots, head_dim): the slots of
    /// positions from `len()` on are free for the forward that writes them.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        self.pool.layer(layer)
    }

    /// The Mamba2 layers' state, if the model has any.
    pub fn ssm(&self) -> Option<&SsmStates> {
        self.ssm.as_ref()
    }

    pub(crate) fn ssm_mut(&mut self) -> Option<&mut SsmStates> {
        self.ssm.as_mut()
    }

    /// The length `truncate(n)` goes back to: n, or with a recurrent state, the longest length up
    /// to n that it holds a copy of (or 0).
    pub fn restorable(&self, n: usize) -> usize {
        match &self.ssm {
            Some(s) => s.restorable(self.len, n),
            None => n.min(self.len),
        }
    }

    /// Forgets every position from `restorable(len)` on; whole blocks past it go back to the pool.
    pub fn truncate(&mut self, len: usize) {
        self.len = match &mut self.ssm {
            Some(s) => s.truncate(self.len, len),
            None => self.len.min(len),
        };
        self.tokens.truncate(self.len);
        self.as_prompt = self.as_prompt.min(self.len);
        self.keys.truncate(self.len / BLOCK_TOKENS);
        let keep = self.len.div_ceil(BLOCK_TOKENS);
        if keep < self.blocks.len() {
            self.pool.release(&self.blocks[keep..]);
            self.blocks.truncate(keep);
        }
    }

    /// A copy of the filled positions in blocks of its own.
    pub fn try_clone(&self) -> Result<Self> {
        let mut copy = Self::new(self.pool.clone(), None);
        copy.ssm = self.ssm.clone();
        copy.reserve(self.len)?;
        for (&src, &dst) in self.blocks.iter().zip(&copy.blocks) {
            self.pool.copy_block(src, dst)?;
        }
        (copy.len, copy.tokens, copy.as_prompt) = (self.len, self.tokens.clone(), self.as_prompt);
        copy.keys = self.keys.clone();
        Ok(copy)
    }

    /// Marks `tokens` as filling the next positions, once every layer has written them
    /// (`as_prompt`: computed as a prompt's rows); indexes the blocks this fills that the pool
    /// takes (with `PrefixReuse::Exact`, only those computed as a prompt's from the start).
    pub fn append(&mut self, tokens: &[u32], as_prompt: bool) {
        if as_prompt && self.as_prompt == self.len {
            self.as_prompt += tokens.len();
        }
        self.len += tokens.len();
        self.tokens.extend_from_slice(tokens);
        if let Some(s) = &mut self.ssm {
            s.commit(self.len, tokens.len());
            return;
        }
        let indexable = match self.pool.prefix_reuse() {
            PrefixReuse::Off => return,
            PrefixReuse::Exact => self.as_prompt,
            PrefixReuse::All => self.len,
        };
        while self.keys.len() < indexable / BLOCK_TOKENS {
            let i = self.keys.len();
            let full = &self.tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            let Some(key) = self.pool.index(self.blocks[i], self.keys.last().copied(), full) else { break };
            self.keys.push(key);
        }
    }

    /// Takes the blocks cached for `prompt`'s next whole blocks of tokens, up to `limit`
    /// positions, if the cache holds `prompt`'s start and ends on a whole block; returns how
    /// many positions it took. Models with a Mamba2 state take none.
    pub fn reuse_prefix(&mut self, prompt: &[u32], limit: usize) -> usize {
        let whole = self.len.is_multiple_of(BLOCK_TOKENS) && self.keys.len() == self.len / BLOCK_TOKENS;
        let exact = self.as_prompt == self.len;
        if self.ssm.is_some() || !whole || !prompt.starts_with(&self.tokens) {
            return 0;
        }
        let end = limit.min(prompt.len()).max(self.len);
        let wanted = prompt[self.len..end].chunks_exact(BLOCK_TOKENS);
        let found = self.pool.take_cached(self.keys.last().copied(), wanted);
        for (block, key) in found.iter().copied() {
            self.blocks.push(block);
            self.keys.push(key);
        }
        let n = found.len() * BLOCK_TOKENS;
        self.tokens.extend_from_slice(&prompt[self.len..self.len + n]);
        // Blocks found after an exact start are exact (`PrefixReuse::Exact` indexes no others).
        if exact {
            self.as_prompt += n;
        }
        self.len += n;
        n
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.pool.release(&self.blocks);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn pool(blocks: usize) -> Arc<KvPool> {
        let bytes = blocks * 2 * 2 * 2 * BLOCK_TOKENS * 4 * 4;
        Arc::new(KvPool::new(2, (2, 4), bytes, DType::F32, &Device::Cpu).unwrap())
    }

    #[test]
    fn blocks_come_from_the_pool_and_go_back() -> Result<()> {
        let pool = pool(4);
        assert_eq!((pool.capacity(), pool.free_positions()), (4 * BLOCK_TOKENS, 4 * BLOCK_TOKENS));
        let mut a = KvCache::new(pool.clone(), None);
        a.reserve(BLOCK_TOKENS + 1)?;
        assert_eq!(a.capacity(), 2 * BLOCK_TOKENS);
        assert_eq!(a.slots(BLOCK_TOKENS + 1), (0..BLOCK_TOKENS as u32 + 1).collect::<Vec<_>>(), "in order alone");
        a.append(&[7; BLOCK_TOKENS + 1], false);
        let mut b = KvCache::new(pool.clone(), None);
        b.reserve(1)?;
        a.reserve(BLOCK_TOKENS)?;
        // a's third block comes after b's.
        assert_eq!(a.slots(2 * BLOCK_TOKENS + 1)[2 * BLOCK_TOKENS], 3 * BLOCK_TOKENS as u32);
        let full = b.reserve(3 * BLOCK_TOKENS).unwrap_err().to_string();
        assert!(full.contains("KV cache is full"), "{full}");
        assert_eq!(b.capacity(), BLOCK_TOKENS, "a failed reserve takes nothing");
        a.truncate(BLOCK_TOKENS);
        assert_eq!((a.len(), a.capacity(), pool.free_positions()), (BLOCK_TOKENS, BLOCK_TOKENS, 2 * BLOCK_TOKENS));
        drop(a);
        drop(b);
        assert_eq!(pool.free_positions(), pool.capacity());
        Ok(())
    }

    #[test]
    fn a_pool_without_attention_layers_is_free_and_small() -> Result<()> {
        let pool = Arc::new(KvPool::new(0, (2, 4), 1 << 30, DType::F32, &Device::Cpu)?);
        assert_eq!((pool.bytes(), pool.capacity()), (0, 1 << 20));
        let mut a = KvCache::new(pool, None);
        a.reserve(1000)?;
        Ok(())
    }

    #[test]
    fn a_clone_has_its_own_blocks_with_the_same_values() -> Result<()> {
        let pool = pool(4);
        let mut a = KvCache::new(pool.clone(), None);
        a.reserve(BLOCK_TOKENS + 3)?;
        a.append(&[7; BLOCK_TOKENS + 3], false);
        let (k, v) = a.layer(1);
        let values = Tensor::arange(0f32, (k.elem_count()) as f32, &Device::Cpu)?.reshape(k.shape())?;
        k.slice_set(&values, 2, 0)?;
        v.slice_set(&values, 2, 0)?;
        let b = a.try_clone()?;
        assert_eq!(pool.free_positions(), 0);
        let at = |c: &KvCache| -> Result<Vec<f32>> {
            let index = Tensor::new(c.slots(c.len()), &Device::Cpu)?;
            Ok(c.layer(1).0.index_select(&index, 2)?.flatten_all()?.to_vec1()?)
        };
        assert_ne!(a.slots(a.len()), b.slots(b.len()));
        assert_eq!(at(&a)?, at(&b)?);
        Ok(())
    }
}
