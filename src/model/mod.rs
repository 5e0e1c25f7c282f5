//! The Granite decoder: the forward pass (`granite`, which reads like the paper), attention, the
//! MLP, the causal mask, rotary embeddings, the KV cache, and the projections over every weight
//! format (`linear`).

mod attention;
pub(crate) mod granite;
pub(crate) mod kv_cache;
pub mod linear;
mod mask;
mod mlp;
pub(crate) mod rope;
