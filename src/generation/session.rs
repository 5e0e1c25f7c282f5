//! A conversation's KV cache kept between calls: each call reuses the longest common token
//! prefix and computes only the rest, as passing `past_key_values` back to transformers does.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::generation::model::Generator;
use crate::generation::params::GenerateParams;
use crate::generation::sequence::Sequence;
use crate::model::kv_cache::KvCache;

pub struct Session {
    generator: Arc<Generator>,
    /// None while a generation has it.
    cache: Option<KvCache>,
    /// The tokens in the cache, prompt and generated.
    cached: Vec<u32>,
}

impl Session {
    pub fn new(generator: Arc<Generator>) -> Result<Self> {
        let cache = generator.model().new_cache();
        Ok(Self { generator, cache: Some(cache), cached: Vec::new() })
    }

    /// Starts a generation on the session's cache; hand it back with `finish`. Bad arguments
    /// leave the session as it was.
    pub fn start(&mut self, prompt: Vec<u32>, params: GenerateParams) -> Result<Sequence> {
        let cache = self.cache.as_ref().ok_or_else(Self::busy)?;
        let (request, common) = Sequence::continuing(&self.generator, cache, &self.cached, prompt, params)?;
        let cache = self.cache.take().ok_or_else(Self::busy)?;
        self.cached.clear();
        Sequence::start_from(&self.generator, request, cache, common)
    }

    /// Takes the cache back from a generation that `start` began, finished or not.
    pub fn finish(&mut self, generation: Sequence) {
        let (cache, tokens) =
            generation.into_cache().unwrap_or_else(|| (self.generator.model().new_cache(), Vec::new()));
        self.cache = Some(cache);
        self.cached = tokens;
    }

    fn busy() -> Error {
        Error::invalid("the session is busy with another generation; wait for it or fork() the session")
    }

    pub fn cached_ids(&self) -> &[u32] {
        &self.cached
    }

    pub fn is_busy(&self) -> bool {
        self.cache.is_none()
    }

    /// Forgets everything; the cache's blocks go back to the pool.
    pub fn reset(&mut self) -> Result<()> {
        self.truncate(0)
    }

    /// Keeps only the first `n` cached tokens. A model with Mamba2 layers keeps a state rather
    /// than every position: it goes back only to the start, the end, or a checkpoint (the end of
    /// each prompt, and one token before it); any other `n` is an error that names them.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        let cache = self.cache.as_mut().ok_or_else(Self::busy)?;
        let n = n.min(cache.len());
        if cache.restorable(n) != n {
            let mut lengths = vec![0];
            lengths.extend(cache.ssm().map(|s| s.checkpoints()).unwrap_or_default());
            lengths.push(cache.len());
            lengths.dedup();
            return Err(Error::invalid(format!(
                "this model's Mamba2 layers keep a state, not every position: the session can go back to \
                 {lengths:?} cached tokens, not {n}"
            )));
        }
        cache.truncate(n);
        self.cached.truncate(n);
        Ok(())
    }

    /// An independent copy: same cached tokens, blocks of its own.
    pub fn fork(&self) -> Result<Self> {
        let cache = self.cache.as_ref().ok_or_else(Self::busy)?.try_clone()?;
        Ok(Self { generator: self.generator.clone(), cache: Some(cache), cached: self.cached.clone() })
    }
}
