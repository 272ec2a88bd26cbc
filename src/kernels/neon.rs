//! AArch64 kernels: plain Advanced SIMD, `sdot` (FEAT_DotProd) and `usmmla` (FEAT_I8MM).
//!
//! - `gemm_u8s8_i32_4x8c1__neon`: widening multiply-accumulate (`umovl`/`sxtl` to 16 bits,
//!   `smlal` into 32 bits); exact for every input, for CPUs without dot products (Cortex-A53).
//! - `gemm_u8s8_i32_4x16c4__neondot`: `sdot` by element: 4 rows x 16 columns, K in groups of 4,
//!   the same panel layout as the x86 VNNI kernels. `sdot` multiplies signed by signed, so the
//!   activations' sign bit is flipped on load (`qa ^ 0x80 = qa - 128`): the raw accumulator is
//!   `sum (qa - 128) * qw` and the kernel declares `a_shift = 128` (see `Kernel::a_shift`).
//! - `gemm_u8s8_i32_4x8c8__neoni8mm`: `usmmla` (unsigned x signed 2x8 by 8x2 matrix multiply):
//!   pairs of rows times pairs of columns, K in groups of 8; no shift needed.
//!
//! `sdot` and `usmmla` are not stable intrinsics in Rust 1.95, so they are written with `asm!`
//! inside functions compiled with the matching target feature. The epilogue uses the scalar
//! definitions (the compiler vectorizes them with NEON, which every AArch64 CPU has).
//!
//! All three are tested under qemu-user with CPU models that have i8mm (`max`), only dotprod
//! (`neoverse-n1`) and neither (`cortex-a53`); see `scripts/test-aarch64.sh`.

use super::{pack_panels, scalar, unpack_panels, Kernel, TileOut};
use crate::isa::Isa;
use std::arch::aarch64::*;
use std::arch::asm;

/// The plain NEON table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::Neon,
    name: "gemm_u8s8_i32_4x8c1__neon",
    mr: 4,
    nr: 8,
    kr: 1,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_4x8c1__neon,
    pack: pack_panels::<8, 1>,
    unpack: unpack_panels::<8, 1>,
    ops: &scalar::OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: 4,
    thread_state: None,
};

/// The dot-product table entry.
pub const KERNEL_DOTPROD: Kernel = Kernel {
    isa: Isa::NeonDotprod,
    name: "gemm_u8s8_i32_4x16c4__neondot",
    mr: 4,
    nr: 16,
    kr: 4,
    a_bytes: 1,
    a_shift: 128,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_4x16c4__neondot,
    pack: pack_panels::<16, 4>,
    unpack: unpack_panels::<16, 4>,
    ops: &scalar::OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: 4,
    thread_state: None,
};

/// The i8mm table entry.
pub const KERNEL_I8MM: Kernel = Kernel {
    isa: Isa::NeonI8mm,
    name: "gemm_u8s8_i32_4x8c8__neoni8mm",
    mr: 4,
    nr: 8,
    kr: 8,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_4x8c8__neoni8mm,
    pack: pack_panels::<8, 8>,
    unpack: unpack_panels::<8, 8>,
    ops: &scalar::OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: 4,
    thread_state: None,
};

/// Delivers `rows` rows of `NR` raw accumulators as `out` asks.
///
/// # Safety
/// `out` satisfies the `TileOut` contract for `rows` rows and this NR.
unsafe fn deliver<const NR: usize>(tile: &[[i32; NR]], rows: usize, out: &TileOut<'_>) {
    match out {
        TileOut::I32(c) => {
            for (i, row) in tile.iter().enumerate().take(rows) {
                // SAFETY: room for MR * NR values (TileOut contract).
                unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(i * NR), NR) };
            }
        }
        TileOut::F32(t) => {
            for (i, row) in tile.iter().enumerate().take(rows) {
                // SAFETY: TileOut contract; the scalar row operations run everywhere.
                unsafe { t.write_row(&scalar::OPS, i, row) };
            }
            // SAFETY: TileOut contract (`rows` rows written above).
            unsafe { t.add_residual(rows) };
        }
    }
}

macro_rules! dispatch_rows {
    ($f:ident, $mr:expr, $($args:expr),*) => {
        match $mr {
            1 => $f::<1>($($args),*),
            2 => $f::<2>($($args),*),
            3 => $f::<3>($($args),*),
            _ => $f::<4>($($args),*),
        }
    };
}

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has NEON.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_4x8c1__neon(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { dispatch_rows!(rows_plain, mr, kp, a, a_stride, b, out) }
}

/// # Safety
/// As [`gemm_u8s8_i32_4x8c1__neon`] with `mr == R`.
#[target_feature(enable = "neon")]
unsafe fn rows_plain<const R: usize>(kp: usize, a: *const u8, a_stride: usize, b: *const i8, out: &TileOut<'_>) {
    let mut acc = [[vdupq_n_s32(0); 2]; R];
    // SAFETY (loop): reads stay inside the R rows of kp bytes and the kp * 8 bytes of the panel.
    unsafe {
        for k in 0..kp {
            // Eight columns of one K step, widened to 16 bits: |qa * qw| <= 255 * 128 fits the
            // 32-bit lanes of smlal exactly.
            let w = vmovl_s8(vld1_s8(b.add(k * 8)));
            let (lo, hi) = (vget_low_s16(w), vget_high_s16(w));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = *a.add(i * a_stride + k) as i16;
                acc[0] = vmlal_n_s16(acc[0], lo, x);
                acc[1] = vmlal_n_s16(acc[1], hi, x);
            }
        }
    }
    let mut tile = [[0i32; 8]; R];
    for (t, acc) in tile.iter_mut().zip(&acc) {
        // SAFETY: 8 i32 per row.
        unsafe {
            vst1q_s32(t.as_mut_ptr(), acc[0]);
            vst1q_s32(t.as_mut_ptr().add(4), acc[1]);
        }
    }
    // SAFETY: forwarded contract.
    unsafe { deliver(&tile, R, out) }
}

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has NEON and the dot-product extension.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_4x16c4__neondot(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { dispatch_rows!(rows_dot, mr, kp, a, a_stride, b, out) }
}

/// `acc.4s += w.16b (4 columns x 4 K) . x.4b[LANE]` (signed x signed).
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $x:expr, $lane:literal) => {
        asm!(concat!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[", $lane, "]"),
             acc = inout(vreg) $acc, w = in(vreg) $w, x = in(vreg) $x,
             options(pure, nomem, nostack, preserves_flags))
    };
}

/// # Safety
/// As [`gemm_u8s8_i32_4x16c4__neondot`] with `mr == R`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn rows_dot<const R: usize>(kp: usize, a: *const u8, a_stride: usize, b: *const i8, out: &TileOut<'_>) {
    let mut acc = [[vdupq_n_s32(0); 4]; R];
    let flip = vdupq_n_u8(0x80);
    let groups = kp / 4;
    // SAFETY (whole body): loads stay inside the R rows of kp bytes and the kp * 16 bytes of
    // the panel; `sdot` only touches registers.
    unsafe {
        let panel = |g: usize| -> [int8x16_t; 4] { std::array::from_fn(|c| vld1q_s8(b.add(g * 64 + 16 * c))) };
        let mut g = 0;
        // Four K groups at a time: 16 activation bytes per row, used lane by lane.
        while g + 4 <= groups {
            let x: [int8x16_t; R] =
                std::array::from_fn(|i| vreinterpretq_s8_u8(veorq_u8(vld1q_u8(a.add(i * a_stride + g * 4)), flip)));
            let (w0, w1, w2, w3) = (panel(g), panel(g + 1), panel(g + 2), panel(g + 3));
            for (acc, x) in acc.iter_mut().zip(&x) {
                for c in 0..4 {
                    sdot_lane!(acc[c], w0[c], *x, "0");
                    sdot_lane!(acc[c], w1[c], *x, "1");
                    sdot_lane!(acc[c], w2[c], *x, "2");
                    sdot_lane!(acc[c], w3[c], *x, "3");
                }
            }
            g += 4;
        }
        while g < groups {
            let w = panel(g);
            for (i, acc) in acc.iter_mut().enumerate() {
                let four = (a.add(i * a_stride + g * 4) as *const u32).read_unaligned();
                let x = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_u32(vdupq_n_u32(four)), flip));
                for c in 0..4 {
                    sdot_lane!(acc[c], w[c], x, "0");
                }
            }
            g += 1;
        }
    }
    let mut tile = [[0i32; 16]; R];
    for (t, acc) in tile.iter_mut().zip(&acc) {
        for (c, v) in acc.iter().enumerate() {
            // SAFETY: 16 i32 per row.
            unsafe { vst1q_s32(t.as_mut_ptr().add(4 * c), *v) };
        }
    }
    // SAFETY: forwarded contract.
    unsafe { deliver(&tile, R, out) }
}

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has NEON and the i8mm extension.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_4x8c8__neoni8mm(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { dispatch_rows!(rows_mmla, mr, kp, a, a_stride, b, out) }
}

/// # Safety
/// As [`gemm_u8s8_i32_4x8c8__neoni8mm`] with `mr == R`.
#[target_feature(enable = "neon,i8mm")]
unsafe fn rows_mmla<const R: usize>(kp: usize, a: *const u8, a_stride: usize, b: *const i8, out: &TileOut<'_>) {
    // acc[p][q]: rows 2p, 2p+1 x columns 2q, 2q+1, lanes (2p,2q) (2p,2q+1) (2p+1,2q) (2p+1,2q+1).
    let mut acc = [[vdupq_n_s32(0); 4]; 2];
    let pairs = R.div_ceil(2);
    // SAFETY (whole body): loads stay inside the R rows of kp bytes (a missing odd row is a
    // zero vector, never read) and the kp * 8 bytes of the panel.
    unsafe {
        for g in 0..kp / 8 {
            // Each 16 bytes: 8 K values of column 2q, then 8 of column 2q+1.
            let w: [int8x16_t; 4] = std::array::from_fn(|q| vld1q_s8(b.add(g * 64 + 16 * q)));
            for (p, acc) in acc.iter_mut().enumerate().take(pairs) {
                let r0 = vld1_u8(a.add(2 * p * a_stride + g * 8));
                let r1 = if 2 * p + 1 < R { vld1_u8(a.add((2 * p + 1) * a_stride + g * 8)) } else { vdup_n_u8(0) };
                let x = vcombine_u8(r0, r1);
                for q in 0..4 {
                    asm!("usmmla {acc:v}.4s, {x:v}.16b, {w:v}.16b",
                         acc = inout(vreg) acc[q], x = in(vreg) x, w = in(vreg) w[q],
                         options(pure, nomem, nostack, preserves_flags));
                }
            }
        }
    }
    let mut tile = [[0i32; 8]; 4];
    for (p, acc) in acc.iter().enumerate().take(pairs) {
        for q in 0..4 {
            let mut v = [0i32; 4];
            // SAFETY: 4 i32.
            unsafe { vst1q_s32(v.as_mut_ptr(), acc[q]) };
            tile[2 * p][2 * q] = v[0];
            tile[2 * p][2 * q + 1] = v[1];
            tile[2 * p + 1][2 * q] = v[2];
            tile[2 * p + 1][2 * q + 1] = v[3];
        }
    }
    // SAFETY: forwarded contract.
    unsafe { deliver(&tile, R, out) }
}
