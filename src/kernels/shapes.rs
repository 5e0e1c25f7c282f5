//! What the ops hand their kernels, CPU and CUDA alike.

use candle_core::{Layout, Result};

/// How a RoPE source and its destination are laid out: src (b, h, t, d) with `strides` from
/// `offset`, dst (b, h, cap, d) contiguous, written at positions pos..pos + t.
#[derive(Clone, Copy)]
pub(crate) struct RopeShape {
    pub b: usize,
    pub h: usize,
    pub t: usize,
    pub d: usize,
    pub offset: usize,
    pub strides: [usize; 3],
    pub cap: usize,
    pub pos: usize,
    /// Rows of the cos/sin tables, and whether they have a batch dim.
    pub t_cs: usize,
    pub cs_batched: bool,
}

impl RopeShape {
    pub(crate) fn new(xl: &Layout, cap: usize, pos: usize, tables: Option<&Layout>) -> Result<Self> {
        let (b, h, t, d) = xl.shape().dims4()?;
        let s = xl.stride();
        let (t_cs, cs_batched) = match tables.map(|l| l.dims()) {
            Some(&[t_cs, _]) => (t_cs, false),
            Some(&[_, t_cs, _]) => (t_cs, true),
            _ => (0, false),
        };
        Ok(Self { b, h, t, d, offset: xl.start_offset(), strides: [s[0], s[1], s[2]], cap, pos, t_cs, cs_batched })
    }
}

/// (q, k_cache, v_cache) -> attention output; see `decode_attention`.
pub(crate) struct DecodeAttention<'a> {
    /// The cache slot of each position attended to.
    pub slots: &'a [u32],
    pub scale: f32,
}
