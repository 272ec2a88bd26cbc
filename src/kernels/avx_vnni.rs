//! AVX-VNNI: VEX-encoded `vpdpbusd` on ymm (8 lanes x 4 u8*s8 products), for CPUs that have
//! VNNI without AVX-512 (Alder Lake and later client parts, some Atom/E-core servers).
//!
//! Micro-kernel `gemm_u8s8_i32_6x16c4__avxvnni`: 6 rows x 16 columns, K in groups of 4; per
//! group two ymm of weights, six broadcasts, 12 `vpdpbusd` into 12 accumulators (15 of the 16
//! ymm registers). Same panel layout as the AVX-512 kernel with NR = 16.
//!
//! The body is a macro instantiated twice: with the VEX instruction for the real entry, and
//! with the EVEX-encoded ymm form of AVX-512 VL + VNNI (identical semantics) as
//! [`evex_twin`]. A CPU without AVX-VNNI cannot run the first, but the tests run the second on
//! any AVX-512 VNNI machine, so the kernel's logic is tested wherever either exists.

use super::{pack_panels, unpack_panels, Kernel, TileOut};
use crate::isa::Isa;
use std::arch::x86_64::*;

const MR: usize = 6;
const NR: usize = 16;
const KR: usize = 4;
/// Prefetch distance in the weight stream, bytes.
const PREFETCH: usize = 4096;

/// The AVX-VNNI table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::AvxVnni,
    name: "gemm_u8s8_i32_6x16c4__avxvnni",
    mr: MR,
    nr: NR,
    kr: KR,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_6x16c4__avxvnni,
    pack: pack_panels::<NR, KR>,
    unpack: unpack_panels::<NR, KR>,
    ops: &super::avx2::OPS_U8,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: MR,
    thread_state: None,
};

/// The same kernel built with the EVEX (AVX-512 VL) encoding of `vpdpbusd ymm`: not a table
/// entry, a test vehicle for the AVX-VNNI kernel's logic on AVX-512 VNNI machines. Its `isa`
/// field says what it needs to run.
pub const fn evex_twin() -> Kernel {
    Kernel {
        isa: Isa::Avx512Vnni,
        name: "gemm_u8s8_i32_6x16c4__avx512vl_twin",
        ukernel: gemm_u8s8_i32_6x16c4__evex,
        ..KERNEL
    }
}

/// [`evex_twin`] with a `'static` address, for packed weights (see `kernels::stand_in_for`).
pub static EVEX_TWIN: Kernel = evex_twin();

macro_rules! vnni_ymm_kernel {
    ($entry:ident, $rows:ident, $features:literal, $dp:ident) => {
        /// # Safety
        /// The contract of [`super::MicroKernel`]; the CPU has the instructions named in
        /// the `target_feature` of the body.
        #[allow(non_snake_case)]
        unsafe fn $entry(mr: usize, kp: usize, a: *const u8, a_stride: usize, b: *const i8, c: &TileOut<'_>) {
            macro_rules! go {
                ($stream:literal) => {
                    // SAFETY: forwarded contract.
                    unsafe {
                        match mr {
                            1 => $rows::<1, $stream>(kp, a, a_stride, b, c),
                            2 => $rows::<2, $stream>(kp, a, a_stride, b, c),
                            3 => $rows::<3, $stream>(kp, a, a_stride, b, c),
                            4 => $rows::<4, $stream>(kp, a, a_stride, b, c),
                            5 => $rows::<5, $stream>(kp, a, a_stride, b, c),
                            _ => $rows::<6, $stream>(kp, a, a_stride, b, c),
                        }
                    }
                };
            }
            // A separate instance for streaming tiles (`F32Tile::stream_l2`), as in the
            // AVX-512 kernel: no test in the other tiles' loops.
            match super::streams_l2(c) {
                true => go!(true),
                false => go!(false),
            }
        }

        /// # Safety
        /// As the entry above with `mr == R`.
        #[target_feature(enable = $features)]
        unsafe fn $rows<const R: usize, const STREAM: bool>(
            kp: usize,
            a: *const u8,
            a_stride: usize,
            b: *const i8,
            out: &TileOut<'_>,
        ) {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            // SAFETY (whole body): loads stay inside the R rows of kp bytes and the kp * NR
            // bytes of the panel; stores write the first R rows of the MR x NR tile.
            unsafe {
                // Row pointers computed once, hidden from the optimizer (see the AVX-512
                // kernel): each broadcast is then indexed by the K group alone.
                let rowp: [*const i32; R] =
                    std::hint::black_box(std::array::from_fn(|i| a.add(i * a_stride) as *const i32));
                let step = |g: usize, acc: &mut [[__m256i; 2]; R]| {
                    let bp = b.add(g * NR * KR) as *const __m256i;
                    // The weight stream, one line per K group, 4 KiB ahead (measured on the EVEX
                    // twin, streaming a 16 MiB matrix: +11% for 1 row, +25-50% for 4-6 rows).
                    // A prefetch past the end is harmless
                    // (its address is made with wrapping_add: no out-of-bounds pointer arithmetic).
                    _mm_prefetch::<_MM_HINT_T0>((bp as *const i8).wrapping_add(PREFETCH));
                    if STREAM {
                        // The line far ahead into L2 (`F32Tile::stream_l2`; weights from DRAM,
                        // 1 thread: 1x4096x4096 0.94x the time, 4x and 6x4096x4096 0.85x; in
                        // L3: 1.01-1.03x. Every other line instead: 0.92-1.00x from DRAM).
                        _mm_prefetch::<_MM_HINT_T1>((bp as *const i8).wrapping_add(super::STREAM_L2_AHEAD));
                    }
                    let (b0, b1) = (_mm256_loadu_si256(bp), _mm256_loadu_si256(bp.add(1)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // KR = 4: group g of a row is the i32 at index g.
                        let av = _mm256_set1_epi32(rowp[i].add(g).read_unaligned());
                        acc[0] = $dp(acc[0], av, b0);
                        acc[1] = $dp(acc[1], av, b1);
                    }
                };
                let groups = kp / KR;
                let mut g = 0;
                while g + 2 <= groups {
                    step(g, &mut acc);
                    step(g + 1, &mut acc);
                    g += 2;
                }
                if g < groups {
                    step(g, &mut acc);
                }
                super::avx2::deliver_16(&acc, out);
                if let TileOut::F32(t) = out {
                    if t.residual.is_some() {
                        super::avx2::add_residual(R, t);
                    }
                }
            }
        }
    };
}

vnni_ymm_kernel!(gemm_u8s8_i32_6x16c4__avxvnni, rows_vex, "avx2,fma,avxvnni", _mm256_dpbusd_avx_epi32);
vnni_ymm_kernel!(gemm_u8s8_i32_6x16c4__evex, rows_evex, "avx2,fma,avx512f,avx512vl,avx512vnni", _mm256_dpbusd_epi32);
