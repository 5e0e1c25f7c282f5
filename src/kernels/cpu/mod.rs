//! The CPU kernels: the weight formats and their matrix products (`gemv` for decode, `gemm` for
//! prompts), and the element ops (norm, rope, attention, softmax, swiglu), each a portable path
//! the compiler vectorizes, with x86 builds chosen at run time where the CPU has AVX2+FMA+F16C;
//! prompts of bf16 weights on AMX or AVX512-BF16 where present (`bf16`). What only x86 runs is
//! in `x86/`, which the portable code calls and which imports nothing that calls it back.

mod activations;
pub mod bf16;
pub(crate) mod attention;
pub mod formats;
mod gemm;
mod gemv;
pub(crate) mod greedy;
pub(crate) mod int8;
pub mod mamba;
pub(crate) mod norm;
mod precision;
pub(crate) mod prefill;
pub(crate) mod rope;
pub(crate) mod softmax;
pub(crate) mod swiglu;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

pub(crate) use formats::decode_rows;
pub use formats::{Part, Rows, GROUP};
pub use gemm::{gemm, reads as gemm_reads, rows_independent as gemm_rows_independent};
pub use gemv::{gemv, gemv_each, reads as gemv_reads};
pub use precision::Precision;

/// Whether this CPU has AVX2, FMA and F16C, which the fast paths here use.
pub(crate) fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return x86::loads::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A raw pointer that worker threads may share: every worker writes disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: an `Out` is only written through at elements that no other worker reads or writes
// (each job owns its output columns), and the buffer outlives the parallel loop that shares it.
unsafe impl Send for Out {}
// SAFETY: as for Send: shared references only hand out the pointer for disjoint writes.
unsafe impl Sync for Out {}

impl Out {
    /// A method, so that closures capture the whole `Out` rather than its raw pointer field.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Defines a function whose body is compiled twice, for AVX2+FMA (called where the CPU has them)
/// and for the baseline. The loops of the ops below are written for the compiler to vectorize,
/// and x86-64's baseline gives it 4 lanes and no FMA; the helpers they call are `#[inline(always)]`.
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident$(<$($g:ident: $b:path),*>)?($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name$(<$($g: $b),*>)?($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body$(<$($g: $b),*>)?($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::cpu::avx2() {
                /// # Safety
                /// The CPU has AVX2 and FMA.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast$(<$($g: $b),*>)?($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                // SAFETY: the features are present.
                return unsafe { fast($($arg),*) };
            }
            body($($arg),*)
        }
    };
}
/// Elements touched below which a CPU op stays on the calling thread.
const PARALLEL_WORK: usize = 1 << 15;

/// Calls `f(scratch, i, chunk)` on each `chunk`-long piece of `dst`, in parallel when `work` (elements
/// touched) is large enough; `init` makes one scratch per worker.
pub(crate) fn for_chunks<T: Send, S>(
    dst: &mut [T],
    chunk: usize,
    work: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize, &mut [T]) + Sync + Send,
) {
    if work >= PARALLEL_WORK && dst.len() > chunk {
        dst.par_chunks_mut(chunk).enumerate().for_each_init(init, |s, (i, c)| f(s, i, c));
    } else {
        let mut s = init();
        dst.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(&mut s, i, c));
    }
}

pub(crate) use vectorized;
