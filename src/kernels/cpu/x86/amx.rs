//! AMX tiles (Intel Sapphire Rapids on) for `bf16::gemm`: outᵀ blocks of 32 weight rows × 32
//! tokens in four f32 tiles, each k-step loading two 16-row tiles of W and two blocks of packed
//! x, then four `tdpbf16ps`. Each 32-row block of W is first copied into whole tiles, 1 KiB in
//! one piece (rows k apart would share cache sets, and the block is read once per 32 tokens). Rust has no stable AMX intrinsics, so the instructions are
//! written out; the tile registers are used only inside `gemm`, which configures them first.

use std::arch::asm;

use half::bf16;

use crate::kernels::cpu::bf16::packed::{scatter, Packed, TOKENS};
use crate::kernels::cpu::Out;

/// Whether this CPU has AMX-TILE and AMX-BF16 and Linux lets this process use the tile data
/// (asked for once, with `arch_prctl(ARCH_REQ_XCOMP_PERM)`).
pub fn enable() -> bool {
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    if !amx_bf16 || !amx_tile {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks the kernel for a permission; it fails
    // (non-zero) on kernels or VMs without AMX support and changes nothing then.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// The tile configuration: palette 1, tiles 0-7 of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = 16;
        }
        Self(c)
    }
}

/// Columns 0..n of out for the rows of `w` (n, k), n a multiple of 16.
/// # Safety
/// `enable()` returned true; k is a multiple of 32; out has (x.m, stride) values and n ≤ stride.
pub unsafe fn gemm(w: &[bf16], k: usize, x: &Packed, out: Out, stride: usize) {
    let n = w.len() / k;
    debug_assert!(n.is_multiple_of(16) && k.is_multiple_of(32));
    let config = Config::new();
    // SAFETY: the configuration is valid for palette 1, which `enable` found.
    asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
    let steps = k / 32;
    let mut c = [[0f32; 256]; 4];
    let mut panel = vec![bf16::ZERO; 32 * k];
    for r in (0..n).step_by(32) {
        let slices = if n - r >= 32 { 2 } else { 1 };
        // The block's rows as whole tiles, 1 KiB apart: [slice][step][row][32 values].
        for (row, values) in w[r * k..(r + 16 * slices) * k].chunks_exact(k).enumerate() {
            let (slice, row) = (row / 16, row % 16);
            for (s, step) in values.chunks_exact(32).enumerate() {
                panel[((slice * steps + s) * 16 + row) * 32..][..32].copy_from_slice(step);
            }
        }
        let w0 = panel.as_ptr() as *const u8;
        let w1 = if slices == 2 { w0.add(steps * 1024) } else { w0 };
        for b in (0..x.blocks()).step_by(2) {
            let x0 = x.block(b).as_ptr() as *const u8;
            let x1 = if b + 1 < x.blocks() { x.block(b + 1).as_ptr() as *const u8 } else { x0 };
            block(w0, w1, x0, x1, x.pairs, &mut c);
            for (t, tile) in c.iter().enumerate() {
                let (slice, token_block) = (t / 2, b + t % 2);
                if slice >= slices || token_block >= x.blocks() {
                    continue;
                }
                for row in 0..16 {
                    let lanes: &[f32; TOKENS] = tile[row * 16..][..16].try_into().expect("16 lanes");
                    scatter(lanes, out, stride, token_block * TOKENS, x.m, r + slice * 16 + row);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// The four tiles C[s][t] = W slice s · packed block t over all `pairs`, stored into c[2s + t]
/// (16 weight rows × 16 tokens each).
/// # Safety
/// Tiles configured by `gemm`; w0, w1 point at pairs / 16 whole tiles of 16 rows × 64 bytes
/// each, one after the other, x0, x1 at packed blocks of `pairs` × 64 bytes; pairs a multiple of 16.
#[inline]
unsafe fn block(w0: *const u8, w1: *const u8, x0: *const u8, x1: *const u8, pairs: usize, c: &mut [[f32; 256]; 4]) {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    for p in (0..pairs).step_by(16) {
        // A k-step of 32 values: a tile of W's rows, 16 pairs (16 rows of 64 bytes) of x; both
        // 1 KiB in one piece.
        asm!(
            "tileloadd tmm4, [{w0} + {ws}]",
            "tileloadd tmm5, [{w1} + {ws}]",
            "tileloadd tmm6, [{x0} + {xs}]",
            "tileloadd tmm7, [{x1} + {xs}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            w0 = in(reg) w0.add(p * 64),
            w1 = in(reg) w1.add(p * 64),
            x0 = in(reg) x0.add(p * 64),
            x1 = in(reg) x1.add(p * 64),
            ws = in(reg) 64usize,
            xs = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {s}], tmm0",
        "tilestored [{c1} + {s}], tmm1",
        "tilestored [{c2} + {s}], tmm2",
        "tilestored [{c3} + {s}], tmm3",
        c0 = in(reg) c[0].as_mut_ptr(),
        c1 = in(reg) c[1].as_mut_ptr(),
        c2 = in(reg) c[2].as_mut_ptr(),
        c3 = in(reg) c[3].as_mut_ptr(),
        s = in(reg) 64usize,
        options(nostack),
    );
}
