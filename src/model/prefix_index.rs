//! Automatic prefix caching: full KV blocks found by the tokens they hold and every token before
//! them, so that a sequence starting with tokens computed before takes their blocks instead of
//! computing them again. Blocks no sequence holds stay indexed until the pool needs them, the
//! least recently let go first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use crate::model::kv_pool::BLOCK_TOKENS;

/// A block's key: a hash of its tokens and its parent's key, so of every token from the start.
pub(crate) type ChainHash = u64;

/// The key before the first block.
const ROOT: ChainHash = 0;

pub(crate) struct PrefixIndex {
    /// Keyed at random per process: a prompt cannot be made to collide with another on purpose.
    keys: RandomState,
    blocks: HashMap<ChainHash, u32>,
    /// Per block, what it is indexed under, if it is.
    entries: Vec<Option<Entry>>,
    /// Indexed blocks no sequence holds, by the tick they were let go at.
    idle: BTreeMap<u64, u32>,
    idle_since: Vec<u64>,
    tick: u64,
}

/// What a block is indexed under; a lookup checks the tokens and the parent, not the hash alone.
struct Entry {
    key: ChainHash,
    parent: ChainHash,
    tokens: [u32; BLOCK_TOKENS],
}

impl PrefixIndex {
    pub(crate) fn new(blocks: usize) -> Self {
        Self {
            keys: RandomState::new(),
            blocks: HashMap::new(),
            entries: (0..blocks).map(|_| None).collect(),
            idle: BTreeMap::new(),
            idle_since: vec![0; blocks],
            tick: 0,
        }
    }

    /// The key of the block holding `tokens` after the block keyed `parent` (None: the first).
    pub(crate) fn key(&self, parent: Option<ChainHash>, tokens: &[u32]) -> ChainHash {
        self.keys.hash_one((parent.unwrap_or(ROOT), tokens))
    }

    /// The indexed block with these tokens after `parent`, if any.
    pub(crate) fn find(&self, parent: Option<ChainHash>, tokens: &[u32]) -> Option<(u32, ChainHash)> {
        let key = self.key(parent, tokens);
        let block = *self.blocks.get(&key)?;
        let entry = self.entries[block as usize].as_ref()?;
        (entry.parent == parent.unwrap_or(ROOT) && entry.tokens == tokens).then_some((block, key))
    }

    /// Indexes `block` as holding `tokens` after `parent`, unless another block holds them already.
    pub(crate) fn insert(&mut self, block: u32, parent: Option<ChainHash>, tokens: &[u32]) -> ChainHash {
        let key = self.key(parent, tokens);
        let (Ok(tokens), false) = (tokens.try_into(), self.blocks.contains_key(&key)) else { return key };
        if self.entries[block as usize].is_none() {
            self.blocks.insert(key, block);
            self.entries[block as usize] = Some(Entry { key, parent: parent.unwrap_or(ROOT), tokens });
        }
        key
    }

    pub(crate) fn contains(&self, block: u32) -> bool {
        self.entries[block as usize].is_some()
    }

    /// Keeps an indexed block that no sequence holds any more, until it is wanted.
    pub(crate) fn park(&mut self, block: u32) {
        self.tick += 1;
        self.idle.insert(self.tick, block);
        self.idle_since[block as usize] = self.tick;
    }

    /// Takes a parked block back for a sequence; false if it was not parked.
    pub(crate) fn unpark(&mut self, block: u32) -> bool {
        self.idle.remove(&self.idle_since[block as usize]).is_some()
    }

    /// Parked blocks.
    pub(crate) fn idle(&self) -> usize {
        self.idle.len()
    }

    /// Drops the parked block let go of longest ago from the index, for other use.
    pub(crate) fn evict(&mut self) -> Option<u32> {
        let (_, block) = self.idle.pop_first()?;
        if let Some(entry) = self.entries[block as usize].take() {
            self.blocks.remove(&entry.key);
        }
        Some(block)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_found_by_its_tokens_and_those_before_it() {
        let mut index = PrefixIndex::new(4);
        let (a, b) = ([1; BLOCK_TOKENS], [2; BLOCK_TOKENS]);
        let first = index.insert(0, None, &a);
        index.insert(1, Some(first), &b);
        assert_eq!(index.find(None, &a), Some((0, first)));
        assert_eq!(index.find(Some(first), &b).map(|f| f.0), Some(1));
        assert_eq!(index.find(None, &b), None, "the same tokens after other ones");
        // The same tokens again index nothing new.
        assert_eq!(index.insert(2, None, &a), first);
        assert!(!index.contains(2));
        // Parked blocks go, oldest first, and are no longer found.
        index.park(1);
        index.park(0);
        assert!(index.unpark(1));
        index.park(1);
        assert_eq!((index.idle(), index.evict(), index.idle()), (2, Some(0), 1));
        assert_eq!(index.find(None, &a), None);
    }
}
