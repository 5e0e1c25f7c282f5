//! Spans: some tokens of one sequence. A forward runs one or more spans packed one after
//! another; each span continues its own sequence's cache at its own positions.

use candle_core::Tensor;

use crate::model::kv_cache::KvCache;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logits {
    All,
    Last,
}

/// Some tokens of one sequence, as a caller hands them to `Granite::forward_spans`.
pub struct Span<'a> {
    pub tokens: &'a [u32],
    /// Compute every row as a prompt's (`PackedRows`), however few: for the rest of a prompt
    /// whose start came from a cache, so that its rows get the bits they get read whole.
    pub as_prompt: bool,
    /// The sequence's cache, which `tokens` continue; None: a fresh sequence, kept nowhere.
    pub cache: Option<&'a mut KvCache>,
    pub logits: Logits,
}

/// What every layer needs to know about the positions of one span.
pub(crate) struct Positions {
    /// Each (t, head_dim / 2).
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
    /// Additive causal mask, (t, start + t); see `causal_mask`.
    pub(crate) mask: Option<Tensor>,
}

/// A span inside the forward: its rows among all the spans' rows, its positions and its cache.
pub(crate) struct SpanRows<'a> {
    pub(crate) tokens: &'a [u32],
    pub(crate) as_prompt: bool,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) pos: Positions,
    /// Where the keys of each position up to the span's last live: the cache's slots, or 0..len
    /// in the span's own keys without a cache.
    pub(crate) slots: Vec<u32>,
    pub(crate) cache: Option<&'a mut KvCache>,
}
