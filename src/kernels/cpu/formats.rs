//! The weight formats the CPU kernels read, each decoded to f32 in groups of 32 weights of one
//! row (one GGUF block): dense f32/f16/bf16 rows, and GGUF's Q4_0/Q4_1/Q8_0 blocks, whose
//! integers the products multiply as they are. Other GGUF types (the k-quants, Q5_0, Q5_1) are
//! decoded by candle, for `gemm` only.

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use super::x86::loads as x86;

/// Every format is handled in groups of 32 weights of one row (one GGUF block).
pub const GROUP: usize = 32;

/// A row-major weight matrix in one of the formats this module reads.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// GGUF blocks, as llama.cpp lays them out.
    Q4_0(&'a [u8]),
    Q4_1(&'a [u8]),
    Q8_0(&'a [u8]),
    /// Blocks of another GGUF type (the k-quants, Q5_0, Q5_1), decoded by candle: `gemm` reads
    /// them, `gemv` only the k-quants, where the CPU has the int8 kernels.
    Other(GgmlDType, &'a [u8]),
}

/// The stored types with a `Rows` variant of their own: `gemv` reads them at their exact values.
pub const OWN_TYPES: [GgmlDType; 6] =
    [GgmlDType::F32, GgmlDType::F16, GgmlDType::BF16, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

/// A weight matrix and its number of rows, which take the next columns of the output.
pub type Part<'a> = (Rows<'a>, usize);

impl<'a> Rows<'a> {
    /// `bytes` read as `format`; None for another format, or half/f32 values that are not aligned.
    pub fn of(format: GgmlDType, bytes: &'a [u8]) -> Option<Self> {
        Some(match format {
            GgmlDType::F32 => Rows::F32(cast(bytes)?),
            GgmlDType::F16 => Rows::F16(cast(bytes)?),
            GgmlDType::BF16 => Rows::BF16(cast(bytes)?),
            GgmlDType::Q4_0 => Rows::Q4_0(bytes),
            GgmlDType::Q4_1 => Rows::Q4_1(bytes),
            GgmlDType::Q8_0 => Rows::Q8_0(bytes),
            _ => return None,
        })
    }

    /// `bytes` as `Rows::Other` blocks of `format`, when candle decodes that type and the bytes
    /// are whole, aligned blocks.
    pub fn other(format: GgmlDType, bytes: &'a [u8]) -> Option<Self> {
        use candle_core::quantized::k_quants::*;
        let fits = match format {
            GgmlDType::Q5_0 => cast::<BlockQ5_0>(bytes).is_some(),
            GgmlDType::Q5_1 => cast::<BlockQ5_1>(bytes).is_some(),
            GgmlDType::Q2K => cast::<BlockQ2K>(bytes).is_some(),
            GgmlDType::Q3K => cast::<BlockQ3K>(bytes).is_some(),
            GgmlDType::Q4K => cast::<BlockQ4K>(bytes).is_some(),
            GgmlDType::Q5K => cast::<BlockQ5K>(bytes).is_some(),
            GgmlDType::Q6K => cast::<BlockQ6K>(bytes).is_some(),
            _ => false,
        };
        fits.then_some(Rows::Other(format, bytes))
    }

    /// Bytes per row of k weights.
    pub(crate) fn row_bytes(self, k: usize) -> usize {
        match self {
            Rows::F32(_) => 4 * k,
            Rows::F16(_) | Rows::BF16(_) => 2 * k,
            Rows::Q4_0(_) => k / GROUP * Q4_0::BYTES,
            Rows::Q4_1(_) => k / GROUP * Q4_1::BYTES,
            Rows::Q8_0(_) => k / GROUP * Q8_0::BYTES,
            Rows::Other(t, _) => k / t.block_size() * t.type_size(),
        }
    }

    /// How the weights are stored.
    pub fn format(self) -> GgmlDType {
        match self {
            Rows::F32(_) => GgmlDType::F32,
            Rows::F16(_) => GgmlDType::F16,
            Rows::BF16(_) => GgmlDType::BF16,
            Rows::Q4_0(_) => GgmlDType::Q4_0,
            Rows::Q4_1(_) => GgmlDType::Q4_1,
            Rows::Q8_0(_) => GgmlDType::Q8_0,
            Rows::Other(t, _) => t,
        }
    }

    /// The matrix's memory.
    pub fn bytes(self) -> &'a [u8] {
        match self {
            Rows::F32(s) => bytes_of(s),
            Rows::F16(s) => bytes_of(s),
            Rows::BF16(s) => bytes_of(s),
            Rows::Q4_0(b) | Rows::Q4_1(b) | Rows::Q8_0(b) | Rows::Other(_, b) => b,
        }
    }
}

/// How one group of 32 dense weights is stored and decoded to f32.
pub(crate) trait Dense {
    const BYTES: usize;
    /// Whether `avx2` returns each half of the group as its even weights, then its odd ones; the
    /// activations are then reordered to match (`evens_then_odds`).
    const EVENS_THEN_ODDS: bool = false;
    fn scalar(group: &[u8], out: &mut [f32; GROUP]);
    /// # Safety
    /// `group` points at `BYTES` readable bytes and the CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(group: *const u8) -> [x86::V; 4];
}

/// x with each 16 values reordered as their 8 even ones, then their 8 odd ones.
#[cfg(target_arch = "x86_64")]
pub(crate) fn evens_then_odds(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(16).flat_map(|c| (0..16).map(move |i| c[if i < 8 { 2 * i } else { 2 * (i - 8) + 1 }])).collect()
}

pub(crate) fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

pub(crate) struct F32;
pub(crate) struct F16;
pub(crate) struct BF16;

impl Dense for F32 {
    const BYTES: usize = 4 * GROUP;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (o, b) in out.iter_mut().zip(g.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    /// # Safety
    /// As `Dense::avx2`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        std::array::from_fn(|j| x86::load_f32(g.add(32 * j)))
    }
}

impl Dense for F16 {
    const BYTES: usize = 2 * GROUP;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = half_at(g, 2 * i);
        }
    }
    /// # Safety
    /// As `Dense::avx2`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        std::array::from_fn(|j| x86::load_f16(g.add(16 * j)))
    }
}

/// bf16 is the top half of an f32: a 32-bit lane holding two bf16 gives the odd one by masking
/// and the even one by shifting, with no widening shuffle.
impl Dense for BF16 {
    const BYTES: usize = 2 * GROUP;
    const EVENS_THEN_ODDS: bool = true;
    fn scalar(g: &[u8], out: &mut [f32; GROUP]) {
        for (o, b) in out.iter_mut().zip(g.chunks_exact(2)) {
            *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    }
    /// # Safety
    /// As `Dense::avx2`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(g: *const u8) -> [x86::V; 4] {
        let [evens0, odds0] = x86::split_bf16(g);
        let [evens1, odds1] = x86::split_bf16(g.add(32));
        [evens0, odds0, evens1, odds1]
    }
}

/// GGUF blocks of 32 weights, multiplied as integers. Weight j of a block is d (v_j - CENTER) + m,
/// where v_j is the block's integer j, d its first f16 and m (only where OFFSET) its second.
pub(crate) trait Blocks {
    const BYTES: usize;
    const CENTER: i32;
    const OFFSET: bool;
    /// Where the integers start in a block.
    const START: usize;
    /// Whether the integers are nibbles (else signed bytes).
    const NIBBLES: bool;
    /// The 32 integers v_j.
    fn ints(block: &[u8]) -> [i32; GROUP];
    /// The 32 v_j as 16-bit integers: v_0..v_15, then v_16..v_31.
    /// # Safety
    /// `block` points at `BYTES` readable bytes, and the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(block: *const u8) -> [x86::I; 2];
}

pub(crate) struct Q4_0;
pub(crate) struct Q4_1;
pub(crate) struct Q8_0;

/// Byte j of a nibble block holds v_j in its low nibble and v_{j+16} in its high nibble.
fn nibble_ints(nibbles: &[u8]) -> [i32; GROUP] {
    std::array::from_fn(|j| if j < 16 { nibbles[j] & 15 } else { nibbles[j - 16] >> 4 } as i32)
}

/// Q4_0: f16 d, then 16 bytes of nibbles; weight = d (v - 8).
impl Blocks for Q4_0 {
    const BYTES: usize = 18;
    const CENTER: i32 = 8;
    const OFFSET: bool = false;
    const START: usize = 2;
    const NIBBLES: bool = true;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        nibble_ints(&block[Self::START..][..16])
    }
    /// # Safety
    /// As `Blocks::unpack`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(block: *const u8) -> [x86::I; 2] {
        x86::nibbles(block.add(2))
    }
}

/// Q4_1: f16 d and f16 m, then nibbles as in Q4_0; weight = d v + m.
impl Blocks for Q4_1 {
    const BYTES: usize = 20;
    const CENTER: i32 = 0;
    const OFFSET: bool = true;
    const START: usize = 4;
    const NIBBLES: bool = true;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        nibble_ints(&block[Self::START..][..16])
    }
    /// # Safety
    /// As `Blocks::unpack`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(block: *const u8) -> [x86::I; 2] {
        x86::nibbles(block.add(4))
    }
}

/// Q8_0: f16 d, then 32 signed bytes; weight = d v.
impl Blocks for Q8_0 {
    const BYTES: usize = 34;
    const CENTER: i32 = 0;
    const OFFSET: bool = false;
    const START: usize = 2;
    const NIBBLES: bool = false;
    fn ints(block: &[u8]) -> [i32; GROUP] {
        std::array::from_fn(|j| block[Self::START + j] as i8 as i32)
    }
    /// # Safety
    /// As `Blocks::unpack`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn unpack(block: *const u8) -> [x86::I; 2] {
        x86::bytes(block.add(2))
    }
}

/// Blocks decoded to their f32 weights, 32 per block.
#[inline(always)]
pub(crate) fn decode_blocks<B: Blocks>(bytes: &[u8], out: &mut [f32]) {
    for (block, out) in bytes.chunks_exact(B::BYTES).zip(out.chunks_exact_mut(GROUP)) {
        let (d, m) = (half_at(block, 0), if B::OFFSET { half_at(block, 2) } else { 0.0 });
        for (o, v) in out.iter_mut().zip(B::ints(block)) {
            *o = d * (v - B::CENTER) as f32 + m;
        }
    }
}

/// The bytes of f32/f16/bf16 values as those values, when aligned and whole.
pub(crate) fn cast<T>(bytes: &[u8]) -> Option<&[T]> {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    if !(bytes.as_ptr() as usize).is_multiple_of(align) || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: aligned, whole values, and every bit pattern is a valid f32, f16 or bf16.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, bytes.len() / size) })
}

pub(crate) fn bytes_of<T>(s: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain old data; u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
}

/// Checks every shape: k a positive multiple of 32, x (m, k), out (m, Σn), each part n rows of k.
/// Returns Σn.
pub(crate) fn checked(parts: &[Part], k: usize, x: &[f32], out: &[f32]) -> Result<usize, String> {
    if k == 0 || !k.is_multiple_of(GROUP) {
        return Err(format!("gemv needs a row length that is a positive multiple of {GROUP}, got {k}"));
    }
    let n: usize = parts.iter().map(|(_, n)| n).sum();
    let m = x.len() / k;
    if x.len() != m * k || out.len() != m * n {
        return Err(format!("gemv shapes: x has {} values, out {}, for k {k} and n {n}", x.len(), out.len()));
    }
    for &(w, rows) in parts {
        if let Rows::Other(t, _) = w {
            if !k.is_multiple_of(t.block_size()) {
                return Err(format!("{t:?} rows of {k} are not whole blocks of {}", t.block_size()));
            }
        }
        let (found, expected) = (w.bytes().len(), rows * w.row_bytes(k));
        if found != expected {
            return Err(format!("gemv weights: {found} bytes where {rows} x {k} needs {expected}"));
        }
    }
    Ok(n)
}

/// Rows `rows` of a checked matrix decoded to f32 into `out`.
pub(crate) fn decode_rows(w: Rows, k: usize, rows: Range<usize>, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let values = rows.start * k..rows.end * k;
    let blocks = |bytes: usize| rows.start * k / GROUP * bytes..rows.end * k / GROUP * bytes;
    #[inline(always)]
    fn decode(w: Rows, values: Range<usize>, blocks: impl Fn(usize) -> Range<usize>, out: &mut [f32]) {
        match w {
            Rows::F32(s) => out.copy_from_slice(&s[values]),
            Rows::F16(s) => s[values].convert_to_f32_slice(out),
            Rows::BF16(s) => s[values].convert_to_f32_slice(out),
            Rows::Q4_0(b) => decode_blocks::<Q4_0>(&b[blocks(Q4_0::BYTES)], out),
            Rows::Q4_1(b) => decode_blocks::<Q4_1>(&b[blocks(Q4_1::BYTES)], out),
            Rows::Q8_0(b) => decode_blocks::<Q8_0>(&b[blocks(Q8_0::BYTES)], out),
            Rows::Other(..) => unreachable!("decoded by decode_rows"),
        }
    }
    if let Rows::Other(t, b) = w {
        let row_bytes = w.row_bytes(k);
        return decode_other(t, &b[rows.start * row_bytes..rows.end * row_bytes], out);
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        /// # Safety
        /// The CPU has AVX2, FMA and F16C.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn fast(w: Rows, values: Range<usize>, blocks: impl Fn(usize) -> Range<usize>, out: &mut [f32]) {
            decode(w, values, blocks, out)
        }
        // SAFETY: the features are present.
        return unsafe { fast(w, values, blocks, out) };
    }
    decode(w, values, blocks, out)
}

/// Whole blocks of a `Rows::Other` type decoded to f32 by candle.
fn decode_other(format: GgmlDType, bytes: &[u8], out: &mut [f32]) {
    use candle_core::quantized::k_quants::*;
    fn decode<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
        B::to_float(cast(bytes).expect("checked by Rows::other"), out)
    }
    match format {
        GgmlDType::Q5_0 => decode::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => decode::<BlockQ5_1>(bytes, out),
        GgmlDType::Q2K => decode::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => decode::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => decode::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => decode::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => decode::<BlockQ6K>(bytes, out),
        _ => unreachable!("Rows::other takes no other type"),
    }
}
