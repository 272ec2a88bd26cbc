//! AMX-INT8: `tdpbusd` on tile registers (16 rows x 64 bytes each; one instruction multiplies a
//! 16 x 64 u8 tile by a 64 x 16 s8 tile into 16 x 16 exact i32 sums: 16,384 multiply-adds).
//!
//! Micro-kernel `gemm_u8s8_i32_32x32c4__amx_int8`: 32 rows of A x 32 columns of W in a 2 x 2
//! block of accumulator tiles (tmm0-3), with two A tiles (tmm4-5, 16 rows x 64 K values each,
//! read straight from the quantized rows at their stride) and two B tiles (tmm6-7, 16 groups of
//! 4 K values x 16 columns each). The panels have the AVX-512 kernel's layout
//! (`pack_panels::<32, 4>`: each group of 4 K values holds 32 columns x 4 bytes, so a B tile is
//! 16 rows of 64 bytes at a stride of 128), with the depth padded to a multiple of 64 so that
//! every tile step is whole. Measured on this machine class (one tile cycling over 4 panels,
//! K = 768, loop alone): 2 x 2 tiles 1435 GOPS where 1 x 3 (16 x 48, the AVX-512 panel) gave
//! 977, against about 650 for AVX-512 VNNI's `vpdpbusd zmm`.
//!
//! Row tails: a tile of 16 to 31 rows computes its first 16 rows on tiles (tmm0, 1, 4, 6, 7);
//! the rest, and tiles of fewer than 16 rows (decoding), run on the AVX-512 VNNI kernel's code
//! on the same panels, 8 rows at a time. The f32 epilogue is the AVX-512 kernel's, from the
//! accumulators stored to the stack, so every result is the same bits as every other ISA's.
//!
//! The tile configuration (palette 1, all eight tiles 16 rows x 64 bytes: the one ONNX
//! Runtime's MLAS keeps loaded too) is loaded by the micro-kernel when the current one differs,
//! checked with `sttilecfg` (about 11 ns; `ldtilecfg` costs about 130 ns, so it is not loaded
//! per call); the driver restores the thread's previous state after its share of a GEMM
//! ([`super::ThreadState`]).
//!
//! `tdpbusd` does not saturate: the sums are exact (wrapping i32, as every kernel's).

use super::{avx512_vnni, pack_panels_to, unpack_panels_from, Kernel, ThreadState, TileOut};
use crate::isa::Isa;
use std::arch::asm;
use std::arch::x86_64::{__m512i, _mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
use std::mem::MaybeUninit;

const MR: usize = 32;
const NR: usize = 32;
/// K values per group in the panel (one dword lane of `tdpbusd`).
const KR: usize = 4;
/// K values per tile step (64 bytes per A tile row); the packed depth is a multiple of it.
const KSTEP: usize = 64;
/// Bytes per group row of a panel (32 columns x 4 K values): the B tiles' row stride.
const B_STRIDE: usize = NR * KR;
/// Prefetch distance in the weight stream, bytes: two tile steps.
const PREFETCH: usize = 2 * 16 * B_STRIDE;

/// The AMX-INT8 table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::AmxInt8,
    name: "gemm_u8s8_i32_32x32c4__amx_int8",
    mr: MR,
    nr: NR,
    kr: KSTEP,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_32x32c4__amx_int8,
    pack,
    unpack,
    ops: &avx512_vnni::OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: true,
    stream_mr: MR,
    thread_state: Some(&THREAD_STATE),
};

fn pack(q: &[i8], n: usize, k: usize, out: &mut [i8]) {
    pack_panels_to::<NR, KR>(q, n, k, k.div_ceil(KSTEP) * KSTEP, out)
}

fn unpack(packed: &[i8], n: usize, k: usize, q: &mut [i8]) {
    unpack_panels_from::<NR, KR>(packed, n, k, k.div_ceil(KSTEP) * KSTEP, q)
}

/// A tile configuration (`ldtilecfg`'s 64-byte operand).
#[repr(C, align(64))]
#[derive(Clone, Copy, PartialEq, Eq)]
struct TileConfig([u8; 64]);

/// Palette 1; tiles 0-7 of 16 rows x 64 bytes (`colsb` at bytes 16 + 2t, `rows` at 48 + t).
static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// The current tile configuration (all zero when the tiles are not in use).
///
/// # Safety
/// The CPU supports AMX and the process has the tile data permission.
#[inline]
unsafe fn current_config() -> TileConfig {
    let mut cur = MaybeUninit::<TileConfig>::uninit();
    // SAFETY: sttilecfg writes the 64 bytes of `cur` (aligned as it requires: 64).
    unsafe {
        asm!("sttilecfg [{0}]", in(reg) cur.as_mut_ptr(), options(nostack, preserves_flags));
        cur.assume_init()
    }
}

/// Loads [`CONFIG`] unless it is already loaded.
///
/// # Safety
/// As [`current_config`].
#[inline]
unsafe fn ensure_config() {
    // SAFETY: per the contract; ldtilecfg reads the 64 bytes of CONFIG.
    unsafe {
        if current_config() != CONFIG {
            asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, preserves_flags));
        }
    }
}

static THREAD_STATE: ThreadState = ThreadState { save, restore };

/// # Safety
/// As [`current_config`].
unsafe fn save() -> [u8; 64] {
    // SAFETY: per the contract.
    unsafe { current_config().0 }
}

/// Puts back the configuration `save` returned: nothing to do when it is still the current
/// one; the tiles are released (their state returned to the OS) when none was loaded.
///
/// # Safety
/// As [`current_config`]; `saved` came from [`save`].
unsafe fn restore(saved: &[u8; 64]) {
    // SAFETY: per the contract; ldtilecfg reads the 64 bytes of `cfg`, a configuration the
    // CPU accepted before.
    unsafe {
        if current_config().0 == *saved {
            return;
        }
        if saved[0] == 0 {
            asm!("tilerelease", options(nostack, nomem, preserves_flags));
        } else {
            let cfg = TileConfig(*saved);
            asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, preserves_flags));
        }
    }
}

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has AMX-INT8 and AVX-512 F/BW/VL/VNNI and
/// the process the tile data permission (all checked by [`Isa::AmxInt8`]'s detection).
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_32x32c4__amx_int8(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    debug_assert!((1..=MR).contains(&mr) && kp.is_multiple_of(KSTEP));
    // SAFETY (whole body): the forwarded contract; the sub-tiles below cover rows of this tile.
    unsafe {
        let on_tiles = match mr {
            MR => {
                tiles::<true>(kp, a, a_stride, b, out);
                MR
            }
            16..MR => {
                tiles::<false>(kp, a, a_stride, b, out);
                16
            }
            _ => 0,
        };
        let mut r = on_tiles;
        while r < mr {
            let rows = (mr - r).min(8);
            let sub_f32;
            let sub = match out {
                TileOut::I32(c) => TileOut::I32(c.add(r * NR)),
                TileOut::F32(t) => {
                    sub_f32 = t.rows_from(r);
                    TileOut::F32(&sub_f32)
                }
            };
            let ar = a.add(r * a_stride);
            match out {
                TileOut::F32(t) if t.cols() <= 16 => avx512_vnni::rows_of::<1, NR>(rows, kp, ar, a_stride, b, &sub),
                _ => avx512_vnni::rows_of::<2, NR>(rows, kp, ar, a_stride, b, &sub),
            }
            r += rows;
        }
    }
}

/// The accumulators of a full tile in memory, as `tilestored` writes them: row `i`, columns
/// `16 h..16 h + 16` at `[i][h]`.
#[repr(C, align(64))]
struct Acc([[__m512i; 2]; MR]);

/// 32 rows (`FULL`) or the first 16 rows of the tile on the tile registers, delivered as `out`
/// asks.
///
/// # Safety
/// As [`gemm_u8s8_i32_32x32c4__amx_int8`], with at least 32 (`FULL`) or 16 rows.
#[target_feature(enable = "avx512f")]
unsafe fn tiles<const FULL: bool>(kp: usize, a: *const u8, a_stride: usize, b: *const i8, out: &TileOut<'_>) {
    let rows = if FULL { MR } else { 16 };
    // SAFETY (whole body): the tile loads read, per step s, bytes 64 s..64 s + 64 of the first
    // `rows` A rows (inside their kp bytes) and 16 group rows of 64 bytes at stride 128 from
    // byte 2048 s of the panel (inside its kp * 32 bytes); the stores write `rows` rows of the
    // i32 tile (MR x NR, row stride 128 bytes) or of `acc`.
    unsafe {
        ensure_config();
        if FULL {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem, preserves_flags));
        }
        let a1 = a.wrapping_add(16 * a_stride);
        // The driver's L2 hint (weights of the next panel or block), spread over the steps.
        let (pf, pf_lines) = match out {
            TileOut::F32(t) => (t.prefetch_l2.as_ptr(), t.prefetch_l2.len().div_ceil(64)),
            TileOut::I32(_) => (b, 0),
        };
        let steps = kp / KSTEP;
        let per = pf_lines.div_ceil(steps).min(8);
        let mut pf_next = 0;
        for s in 0..steps {
            let bp = b.add(s * 16 * B_STRIDE);
            // The step PREFETCH bytes ahead in the weight stream into L1: tile loads that miss
            // wait for every line (a prefetch past the end is harmless: its address is made
            // with wrapping_add). 1 thread, medians of alternating calls: 16x11008x4096 0.88x
            // the time, 64x4096x4096 0.90x, 128x768x3072 0.92x, 128x768x768 0.92x. Bringing
            // the next step's A rows as well was slower.
            let ahead = bp.wrapping_add(PREFETCH);
            for l in 0..16 * B_STRIDE / 64 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
            }
            for _ in 0..per {
                if pf_next < pf_lines {
                    // In bounds: line pf_next < ceil(len / 64) starts inside the slice.
                    _mm_prefetch::<_MM_HINT_T1>(pf.add(pf_next * 64));
                    pf_next += 1;
                }
            }
            if FULL {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}]",
                    "tileloadd tmm6, [{b} + {ldb}]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b} + {ldb} + 64]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {lda}]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    a0 = in(reg) a.add(s * KSTEP),
                    a1 = in(reg) a1.add(s * KSTEP),
                    lda = in(reg) a_stride,
                    b = in(reg) bp,
                    ldb = in(reg) B_STRIDE,
                    options(nostack, readonly, preserves_flags),
                );
            } else {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}]",
                    "tileloadd tmm6, [{b} + {ldb}]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b} + {ldb} + 64]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    a0 = in(reg) a.add(s * KSTEP),
                    lda = in(reg) a_stride,
                    b = in(reg) bp,
                    ldb = in(reg) B_STRIDE,
                    options(nostack, readonly, preserves_flags),
                );
            }
        }
        let store = |c: *mut i32| {
            asm!(
                "tilestored [{c} + {ld}], tmm0",
                "tilestored [{c} + {ld} + 64], tmm1",
                c = in(reg) c,
                ld = in(reg) NR * 4,
                options(nostack, preserves_flags),
            );
            if FULL {
                asm!(
                    "tilestored [{c} + {ld}], tmm2",
                    "tilestored [{c} + {ld} + 64], tmm3",
                    c = in(reg) c.add(16 * NR),
                    ld = in(reg) NR * 4,
                    options(nostack, preserves_flags),
                );
            }
        };
        match out {
            TileOut::I32(c) => store(*c),
            TileOut::F32(t) => {
                let mut acc = MaybeUninit::<Acc>::uninit();
                store(acc.as_mut_ptr() as *mut i32);
                // The stores above wrote the first `rows` rows.
                let acc = acc.as_ptr() as *const [__m512i; 2];
                avx512_vnni::deliver_f32::<2>(acc, rows, t);
                if t.residual.is_some() {
                    avx512_vnni::add_residual(rows, t);
                }
            }
        }
    }
}

/// The `tdpbusd` throughput loop of `dynq peak`: six independent accumulator tiles, operands
/// in tiles, `iters` x 6 instructions (98,304 multiply-adds per iteration). Returns a value of
/// the result so that nothing is optimized away. Leaves the thread's tile state as it was.
///
/// # Safety
/// The CPU supports [`Isa::AmxInt8`] (detected: AMX-INT8, AVX-512 VNNI, tile permission).
pub(crate) unsafe fn tdpbusd_loop(iters: usize) -> u64 {
    let a = [1u8; 16 * 64];
    let b = [1i8; 16 * 64];
    let mut c = [0i32; 16 * 16];
    // SAFETY: the tile loads read the 1 KiB of `a` and `b` (16 rows of 64 bytes, stride 64),
    // the store writes the 1 KiB of `c`; the configuration is restored at the end.
    unsafe {
        let saved = save();
        ensure_config();
        asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", "tilezero tmm4", "tilezero tmm5",
            "tileloadd tmm6, [{a} + {ld}]",
            "tileloadd tmm7, [{b} + {ld}]",
            a = in(reg) a.as_ptr(),
            b = in(reg) b.as_ptr(),
            ld = in(reg) 64usize,
            options(nostack, readonly, preserves_flags),
        );
        for _ in 0..iters {
            asm!(
                "tdpbusd tmm0, tmm6, tmm7",
                "tdpbusd tmm1, tmm6, tmm7",
                "tdpbusd tmm2, tmm6, tmm7",
                "tdpbusd tmm3, tmm6, tmm7",
                "tdpbusd tmm4, tmm6, tmm7",
                "tdpbusd tmm5, tmm6, tmm7",
                options(nostack, nomem, preserves_flags),
            );
        }
        asm!("tilestored [{c} + {ld}], tmm5", c = in(reg) c.as_mut_ptr(), ld = in(reg) 64usize, options(nostack, preserves_flags));
        restore(&saved);
    }
    c[0] as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{gemm, GemmOptions, PackOptions, PackedWeights, WeightLayout};

    fn have_amx() -> bool {
        let ok = Isa::AmxInt8.is_supported();
        if !ok {
            eprintln!("SKIPPED: AMX tile state tests: this CPU (or OS) does not run AMX-INT8");
        }
        ok
    }

    /// One single-threaded GEMM on AMX on the calling thread, checked against the scalar kernel.
    fn gemm_on_this_thread() {
        let (m, n, k) = (40, 70, 130);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 53 % 97) as f32 - 40.0) / 30.0).collect();
        let opts = GemmOptions { num_threads: 1, ..Default::default() };
        let mut out = Vec::new();
        for isa in [Isa::AmxInt8, Isa::Scalar] {
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let mut y = vec![0f32; m * n];
            gemm(&pw, &a, m, k, None, &mut y, n, &opts).unwrap();
            out.push(y);
        }
        assert!(out[0].iter().zip(&out[1]).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// A thread that used no tiles before a GEMM has them released after it; a thread with
    /// another configuration loaded (another library's) finds it loaded again, and the
    /// micro-kernel, which met that configuration, still computed with its own.
    #[test]
    fn a_gemm_leaves_the_threads_tile_state_as_it_found_it() {
        if !have_amx() {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY (all): AMX is usable here (checked above).
            unsafe {
                assert_eq!(save(), [0u8; 64], "a new thread has no tile configuration");
                gemm_on_this_thread();
                assert_eq!(save(), [0u8; 64], "tiles released after the GEMM");
                // Another configuration: palette 1, tile 0 of 8 rows x 32 bytes only.
                let mut other = [0u8; 64];
                other[0] = 1;
                other[16] = 32;
                other[48] = 8;
                restore(&other);
                assert_eq!(save(), other);
                gemm_on_this_thread();
                assert_eq!(save(), other, "the other configuration is back");
                // The configuration of this kernel (and ONNX Runtime's MLAS) stays as it was.
                restore(&CONFIG.0);
                gemm_on_this_thread();
                assert_eq!(save(), CONFIG.0);
                restore(&[0u8; 64]);
                assert_eq!(save(), [0u8; 64]);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn tdpbusd_loop_counts_and_restores() {
        if !have_amx() {
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: AMX is usable here (checked above).
            unsafe {
                // Each of 3 iterations adds 64 products of 1 x 1 to every element of tile 5.
                assert_eq!(tdpbusd_loop(3), 3 * 64);
                assert_eq!(save(), [0u8; 64]);
            }
        })
        .join()
        .unwrap();
    }
}
