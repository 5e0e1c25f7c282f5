//! The Granite decoder: the forward pass (`granite`, which reads like the paper), its layers
//! (`layer`: a mixer and a feed-forward), attention, the Mamba2 mixer, the MLP, the mixture of
//! experts, the causal mask, rotary embeddings, a sequence's cache (`kv_cache`: its blocks of the
//! shared `kv_pool`, whose full blocks `prefix_index` finds by their tokens, and its Mamba2 state,
//! `ssm_state`), and the projections over every weight format (`linear`).

mod attention;
pub(crate) mod granite;
pub(crate) mod kv_cache;
pub(crate) mod kv_pool;
mod layer;
pub mod linear;
mod mamba;
mod mask;
mod mlp;
mod moe;
pub(crate) mod prefix_index;
pub(crate) mod rope;
pub(crate) mod span;
pub mod ssm_state;

/// Greedy decoding's pick, the first of equal maxima as transformers takes it: on the logits'
/// device (`greedy`) or over logits read back (`first_max`).
pub(crate) use crate::kernels::{cpu::greedy::first_max, greedy};
