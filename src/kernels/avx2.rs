//! AVX2 without VNNI: exact by construction, and the AVX2 row operations that the AVX2 and
//! AVX-VNNI entries share.
//!
//! The classic `vpmaddubsw` route (u8 x s8, adjacent products summed into a saturating int16)
//! overflows: `255 * 127 + 255 * 127 = 64770 > 32767`, which silently corrupted results of
//! other libraries on such CPUs. This kernel never forms an int16 sum: activations are stored
//! as `u16` (the `u8` zero-extended, `a_bytes = 2`) and weights are sign-extended from the
//! int8 panel with `vpmovsxbw` as they are loaded, then `vpmaddwd` multiplies 16-bit lanes and
//! adds adjacent pairs into int32: `|a0*b0 + a1*b1| <= 2 * 255 * 128 = 65280`, exact in int32
//! for every possible input. The packed weights stay int8 (no extra memory traffic).
//!
//! Micro-kernel `gemm_u8s8_i32_6x16c2__avx2`: 6 rows x 16 columns, K in pairs; per pair two
//! widening loads of weights, six 32-bit broadcasts of activation pairs, 12 `vpmaddwd` and
//! 12 `vpaddd` into 12 accumulators (15 of the 16 ymm registers).
//!
//! Micro-kernel `gemm_u8s8_i32_6x16c4__avx2_narrow`: for narrow weights only (every K pair
//! with `|w0| + |w1| <= 128`, e.g. weights quantized to at most 64 in magnitude), where the
//! `vpmaddubsw` pair sum is at most `255 * 128 = 32640` and cannot saturate. Packing checks
//! the weights and picks it by itself; it refuses other weights for it.

use super::{pack_panels, unpack_panels, DequantRow, F32Tile, Kernel, RowOps, ScaledRowOps, TileOut};
use crate::gemm::{
    Epilogue, ERF_P, ERF_Q, GELU_TANH_A, GELU_TANH_B, QUICK_GELU_HALF_ALPHA, TANH_CLAMP, TANH_P, TANH_Q,
};
use crate::isa::Isa;
use crate::quant::activations::{quantize_value, QParams};
use crate::quant::ActType;
use std::arch::x86_64::*;

const MR: usize = 6;
const NR: usize = 16;
const KR: usize = 2;
/// Prefetch distance in the weight stream, bytes.
const PREFETCH: usize = 4096;

/// `$rows::<R, STREAM>(..)` for `$mr` rows (1..=6), in a separate instance for streaming tiles
/// (`F32Tile::stream_l2`): no test in the other tiles' loops (see the AVX-512 kernel).
macro_rules! by_rows {
    ($rows:ident, $mr:expr, $kp:expr, $a:expr, $a_stride:expr, $b:expr, $c:expr) => {{
        macro_rules! go {
            ($stream:literal) => {
                match $mr {
                    1 => $rows::<1, $stream>($kp, $a, $a_stride, $b, $c),
                    2 => $rows::<2, $stream>($kp, $a, $a_stride, $b, $c),
                    3 => $rows::<3, $stream>($kp, $a, $a_stride, $b, $c),
                    4 => $rows::<4, $stream>($kp, $a, $a_stride, $b, $c),
                    5 => $rows::<5, $stream>($kp, $a, $a_stride, $b, $c),
                    _ => $rows::<6, $stream>($kp, $a, $a_stride, $b, $c),
                }
            };
        }
        match super::streams_l2($c) {
            true => go!(true),
            false => go!(false),
        }
    }};
}

/// The AVX2 table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::Avx2,
    name: "gemm_u8s8_i32_6x16c2__avx2",
    mr: MR,
    nr: NR,
    kr: KR,
    a_bytes: 2,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_6x16c2__avx2,
    pack: pack_panels::<NR, KR>,
    unpack: unpack_panels::<NR, KR>,
    ops: &OPS_U16,
    weight_pair_limit: None,
    narrow: Some(&KERNEL_NARROW),
    full_tiles: false,
    stream_mr: MR,
    thread_state: None,
};

/// `|w[2j]| + |w[2j + 1]|` bound under which `vpmaddubsw` cannot saturate:
/// `255 * 128 = 32640 <= 32767`. Weights quantized to at most 64 in magnitude (`weight_qmax`
/// 64, ONNX Runtime's `reduce_range`) always meet it.
pub const NARROW_PAIR_LIMIT: u32 = 128;

/// The AVX2 entry for narrow weights (every K pair within [`NARROW_PAIR_LIMIT`]), which
/// packing picks by itself for such weights: the `vpmaddubsw + vpmaddwd + vpaddd` chain, 3
/// instructions per 32 multiply-adds where the exact kernel needs 4 and a sign extension.
/// Exact for the weights it accepts, so its results are the bits of every other kernel.
pub const KERNEL_NARROW: Kernel = Kernel {
    isa: Isa::Avx2,
    name: "gemm_u8s8_i32_6x16c4__avx2_narrow",
    mr: MR,
    nr: NR,
    kr: 4,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_6x16c4__avx2_narrow,
    pack: pack_panels::<NR, 4>,
    unpack: unpack_panels::<NR, 4>,
    ops: &OPS_U8,
    weight_pair_limit: Some(NARROW_PAIR_LIMIT),
    narrow: None,
    full_tiles: false,
    stream_mr: MR,
    thread_state: None,
};

/// AVX2 row operations writing `u8` activations.
pub static OPS_U8: RowOps = RowOps {
    row_stats,
    quantize_row: quantize_row_u8,
    dequantize_row,
    scaled: Some(&ScaledRowOps { row_stats: row_stats_scaled, quantize_row: quantize_row_u8_scaled }),
    quantize_and_stats: Some(quantize_and_stats_as::<1>),
};
/// AVX2 row operations writing `u16` activations (for `vpmaddwd` kernels).
pub static OPS_U16: RowOps = RowOps {
    row_stats,
    quantize_row: quantize_row_u16,
    dequantize_row,
    scaled: Some(&ScaledRowOps { row_stats: row_stats_scaled, quantize_row: quantize_row_u16_scaled }),
    quantize_and_stats: Some(quantize_and_stats_as::<2>),
};

/// # Safety
/// The contract of [`super::MicroKernel`] with `a_bytes = 2`; the CPU has AVX2.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_6x16c2__avx2(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    c: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { by_rows!(rows, mr, kp, a, a_stride, b, c) }
}

/// # Safety
/// As [`gemm_u8s8_i32_6x16c2__avx2`] with `mr == R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const R: usize, const STREAM: bool>(
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    // SAFETY (whole body): loads stay inside the R rows of kp u16 values and the kp * NR
    // bytes of the panel; stores write the first R rows of the MR x NR tile.
    unsafe {
        // Row pointers computed once, hidden from the optimizer (see the AVX-512 kernel): each
        // broadcast is then indexed by the K pair alone.
        let rowp: [*const i32; R] = std::hint::black_box(std::array::from_fn(|i| a.add(i * a_stride) as *const i32));
        let pairs = kp / KR;
        let step = |g: usize, acc: &mut [[__m256i; 2]; R]| {
            let bp = b.add(g * NR * KR) as *const __m128i;
            let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp));
            let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bp.add(1)));
            for (i, acc) in acc.iter_mut().enumerate() {
                // A K pair is two u16 values, the i32 at index g.
                let av = _mm256_set1_epi32(rowp[i].add(g).read_unaligned());
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b1));
            }
        };
        // Two K pairs (one cache line of weights) per iteration: half the loop overhead, whose
        // scalar operations share ports with the vector ones, and no test for the prefetch.
        let mut g = 0;
        while g + 2 <= pairs {
            // The line 4 KiB ahead (measured interleaved: +25-43% for M = 1..4 decoding shapes,
            // +3-10% for 16x11008x4096, within 2% on compute-bound ones). A prefetch past the
            // end is harmless (its address is made with wrapping_add: no out-of-bounds pointer
            // arithmetic).
            _mm_prefetch::<_MM_HINT_T0>((b.add(g * NR * KR)).wrapping_add(PREFETCH));
            if STREAM {
                // The line far ahead into L2 (`F32Tile::stream_l2`).
                _mm_prefetch::<_MM_HINT_T1>((b.add(g * NR * KR)).wrapping_add(super::STREAM_L2_AHEAD));
            }
            if R == 6 {
                // SAFETY: as `step` for pairs g and g + 1 (R == 6: rowp and acc have 6 rows).
                two_pairs_6(
                    &mut *(acc.as_mut_ptr() as *mut [[__m256i; 2]; 6]),
                    &*(rowp.as_ptr() as *const [*const i32; 6]),
                    g,
                    b.add(g * NR * KR),
                );
            } else {
                step(g, &mut acc);
                step(g + 1, &mut acc);
            }
            g += 2;
        }
        if g < pairs {
            step(g, &mut acc);
        }
        deliver_16(&acc, out);
        if let TileOut::F32(t) = out {
            if t.residual.is_some() {
                add_residual(R, t);
            }
        }
    }
}

/// The `asm!` of one step of a full 6-row tile of an AVX2 kernel (see [`two_pairs_6`]): the
/// template's operands are `{b}` (the panel), `{g}` (the K step), `{r0}`..`{r5}` (the rows),
/// the 12 accumulators `{a00}`..`{a51}` of `$acc`, four scratch registers `{b0}`, `{b1}`,
/// `{av}`, `{t}`, and `$extra` (named operands, each followed by a comma).
macro_rules! asm_6x16 {
    ($acc:expr, $rowp:expr, $g:expr, $b:expr, [$($tpl:expr),+] $(, $($extra:tt)*)?) => {{
        let [[a00, a01], [a10, a11], [a20, a21], [a30, a31], [a40, a41], [a50, a51]] = $acc;
        std::arch::asm!(
            $($tpl),+,
            b = in(reg) $b,
            g = in(reg) $g,
            $($($extra)*)?
            r0 = in(reg) $rowp[0],
            r1 = in(reg) $rowp[1],
            r2 = in(reg) $rowp[2],
            r3 = in(reg) $rowp[3],
            r4 = in(reg) $rowp[4],
            r5 = in(reg) $rowp[5],
            a00 = inout(ymm_reg) *a00,
            a01 = inout(ymm_reg) *a01,
            a10 = inout(ymm_reg) *a10,
            a11 = inout(ymm_reg) *a11,
            a20 = inout(ymm_reg) *a20,
            a21 = inout(ymm_reg) *a21,
            a30 = inout(ymm_reg) *a30,
            a31 = inout(ymm_reg) *a31,
            a40 = inout(ymm_reg) *a40,
            a41 = inout(ymm_reg) *a41,
            a50 = inout(ymm_reg) *a50,
            a51 = inout(ymm_reg) *a51,
            b0 = out(ymm_reg) _,
            b1 = out(ymm_reg) _,
            av = out(ymm_reg) _,
            t = out(ymm_reg) _,
            options(nostack, preserves_flags, readonly),
        )
    }};
}

/// One row of a K pair in [`two_pairs_6`]: broadcast the row's pair (`$off` bytes past pair
/// `g`), multiply by both widened weight vectors, add to the row's two accumulators.
#[rustfmt::skip] // one instruction per line
macro_rules! k_pair_row {
    ($r:literal, $a0:literal, $a1:literal, $off:literal) => {
        concat!(
            "vpbroadcastd {av}, dword ptr [{", $r, "} + {g} * 4 + ", $off, "]\n",
            "vpmaddwd {t}, {av}, {b0}\n",
            "vpaddd {", $a0, "}, {", $a0, "}, {t}\n",
            "vpmaddwd {av}, {av}, {b1}\n",
            "vpaddd {", $a1, "}, {", $a1, "}, {av}\n",
        )
    };
}

/// One K pair of [`two_pairs_6`]: widen the 32 weight bytes at `$b0` and `$b1` past `{b}`, then
/// the six rows (their pair `$off` bytes past pair `g`).
#[rustfmt::skip] // one instruction per line
macro_rules! k_pair {
    ($b0:literal, $b1:literal, $off:literal) => {
        concat!(
            "vpmovsxbw {b0}, xmmword ptr [{b} + ", $b0, "]\n",
            "vpmovsxbw {b1}, xmmword ptr [{b} + ", $b1, "]\n",
            k_pair_row!("r0", "a00", "a01", $off),
            k_pair_row!("r1", "a10", "a11", $off),
            k_pair_row!("r2", "a20", "a21", $off),
            k_pair_row!("r3", "a30", "a31", $off),
            k_pair_row!("r4", "a40", "a41", $off),
            k_pair_row!("r5", "a50", "a51", $off),
        )
    };
}

/// Two K pairs of a full 6-row tile, in assembly: the same operations as two calls of the
/// intrinsic step, but with the registers fixed. From intrinsics, LLVM interleaves the second
/// pair's weight loads with the first pair's last rows, needs 17 ymm registers for the 12
/// accumulators, and keeps one accumulator on the stack (a load, an add and a store per
/// iteration, whose store-to-load chain is then carried from one iteration to the next).
/// Here: 12 accumulators, the two widened weight vectors, the broadcast and one product: 16.
///
/// # Safety
/// The CPU has AVX2; `rowp[i] + g` and `rowp[i] + g + 1` are readable `i32`s (two K pairs of
/// row `i`), `b` points to 64 readable bytes (two K pairs of the panel).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn two_pairs_6(acc: &mut [[__m256i; 2]; 6], rowp: &[*const i32; 6], g: usize, b: *const i8) {
    // SAFETY: reads only the bytes named in the contract; writes only the register operands.
    unsafe { asm_6x16!(acc, rowp, g, b, [k_pair!(0, 16, 0), k_pair!(32, 48, 4)]) }
}

/// `vpmaddwd` multiplier that adds adjacent int16 lanes into int32, on its own cache line:
/// the narrow kernel reads it 12 times per K group, and with the 2-byte alignment of an
/// `[i16; 16]` it straddled two lines (which halved the kernel's speed on AMD Zen 3).
#[repr(C, align(64))]
struct Ones([i16; 16]);
static ONES_I16: Ones = Ones([1; 16]);

/// # Safety
/// The contract of [`super::MicroKernel`] with `a_bytes = 1`, for weights packed by
/// [`KERNEL_NARROW`] (every K pair within [`NARROW_PAIR_LIMIT`]); the CPU has AVX2.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_6x16c4__avx2_narrow(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    c: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe { by_rows!(rows_narrow, mr, kp, a, a_stride, b, c) }
}

/// # Safety
/// As [`gemm_u8s8_i32_6x16c4__avx2_narrow`] with `mr == R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_narrow<const R: usize, const STREAM: bool>(
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    const KR: usize = 4;
    let mut acc = [[_mm256_setzero_si256(); 2]; R];
    // SAFETY (whole body): loads stay inside the R rows of kp bytes and the kp * NR bytes of
    // the panel; stores write the first R rows of the MR x NR tile.
    unsafe {
        // Row pointers computed once, hidden from the optimizer (see the AVX-512 kernel).
        let rowp: [*const i32; R] = std::hint::black_box(std::array::from_fn(|i| a.add(i * a_stride) as *const i32));
        let ones = _mm256_load_si256(ONES_I16.0.as_ptr() as *const __m256i);
        let groups = kp / KR;
        let step = |g: usize, acc: &mut [[__m256i; 2]; R]| {
            let bp = b.add(g * NR * KR) as *const __m256i;
            let (b0, b1) = (_mm256_loadu_si256(bp), _mm256_loadu_si256(bp.add(1)));
            for (i, acc) in acc.iter_mut().enumerate() {
                // KR = 4: group g of a row is the i32 at index g. Each int16 pair sum is at most
                // 255 * NARROW_PAIR_LIMIT in magnitude: no saturation.
                let av = _mm256_set1_epi32(rowp[i].add(g).read_unaligned());
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));
            }
        };
        let mut g = 0;
        while g + 2 <= groups {
            // One line of weights per K group; prefetched 4 KiB ahead as in the exact kernel.
            let bg = b.add(g * NR * KR);
            _mm_prefetch::<_MM_HINT_T0>(bg.wrapping_add(PREFETCH));
            _mm_prefetch::<_MM_HINT_T0>(bg.wrapping_add(PREFETCH + 64));
            if STREAM {
                // Both lines far ahead into L2 (`F32Tile::stream_l2`).
                _mm_prefetch::<_MM_HINT_T1>(bg.wrapping_add(super::STREAM_L2_AHEAD));
                _mm_prefetch::<_MM_HINT_T1>(bg.wrapping_add(super::STREAM_L2_AHEAD + 64));
            }
            if R == 6 {
                // SAFETY: as `step` for groups g and g + 1 (R == 6: rowp and acc have 6 rows).
                narrow_two_groups_6(
                    &mut *(acc.as_mut_ptr() as *mut [[__m256i; 2]; 6]),
                    &*(rowp.as_ptr() as *const [*const i32; 6]),
                    g,
                    bg,
                );
            } else {
                step(g, &mut acc);
                step(g + 1, &mut acc);
            }
            g += 2;
        }
        if g < groups {
            step(g, &mut acc);
        }
        deliver_16(&acc, out);
        if let TileOut::F32(t) = out {
            if t.residual.is_some() {
                add_residual(R, t);
            }
        }
    }
}

/// One row of a K group in [`narrow_two_groups_6`]: broadcast the row's 4 activations (`$off`
/// bytes past group `g`), multiply-add them with both weight vectors into int16 pair sums,
/// widen those into int32 sums of 4 and add them to the row's two accumulators.
#[rustfmt::skip] // one instruction per line
macro_rules! k_group_row {
    ($r:literal, $a0:literal, $a1:literal, $off:literal) => {
        concat!(
            "vpbroadcastd {av}, dword ptr [{", $r, "} + {g} * 4 + ", $off, "]\n",
            "vpmaddubsw {t}, {av}, {b0}\n",
            "vpmaddwd {t}, {t}, ymmword ptr [{ones}]\n",
            "vpaddd {", $a0, "}, {", $a0, "}, {t}\n",
            "vpmaddubsw {av}, {av}, {b1}\n",
            "vpmaddwd {av}, {av}, ymmword ptr [{ones}]\n",
            "vpaddd {", $a1, "}, {", $a1, "}, {av}\n",
        )
    };
}

/// One K group of [`narrow_two_groups_6`]: load the 64 weight bytes at `$b0` past `{b}`, then
/// the six rows (their group `$off` bytes past group `g`).
#[rustfmt::skip] // one instruction per line
macro_rules! k_group {
    ($b0:literal, $b1:literal, $off:literal) => {
        concat!(
            "vmovdqu {b0}, ymmword ptr [{b} + ", $b0, "]\n",
            "vmovdqu {b1}, ymmword ptr [{b} + ", $b1, "]\n",
            k_group_row!("r0", "a00", "a01", $off),
            k_group_row!("r1", "a10", "a11", $off),
            k_group_row!("r2", "a20", "a21", $off),
            k_group_row!("r3", "a30", "a31", $off),
            k_group_row!("r4", "a40", "a41", $off),
            k_group_row!("r5", "a50", "a51", $off),
        )
    };
}

/// Two K groups of a full 6-row tile of the narrow kernel, in assembly for the reason given
/// at [`two_pairs_6`]: 12 accumulators, two weight vectors, the broadcast and one product fill
/// the 16 registers, so the `vpmaddwd` multiplier of ones is a memory operand.
///
/// # Safety
/// The CPU has AVX2; `rowp[i] + g` and `rowp[i] + g + 1` are readable `i32`s (two K groups
/// of row `i`), `b` points to 128 readable bytes (two K groups of the panel).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn narrow_two_groups_6(acc: &mut [[__m256i; 2]; 6], rowp: &[*const i32; 6], g: usize, b: *const i8) {
    // SAFETY: reads only the bytes named in the contract and ONES_I16; writes only the
    // register operands.
    unsafe {
        asm_6x16!(acc, rowp, g, b, [k_group!(0, 32, 0), k_group!(64, 96, 4)], ones = in(reg) ONES_I16.0.as_ptr(),)
    }
}

/// Delivers `R` rows of 16 columns held in two ymm accumulators each, as `out` asks. Shared by
/// the AVX2 and AVX-VNNI kernels.
///
/// # Safety
/// The CPU has AVX2 and FMA; `out` satisfies the `TileOut` contract for `R` rows and NR = 16.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn deliver_16<const R: usize>(acc: &[[__m256i; 2]; R], out: &TileOut<'_>) {
    // SAFETY (whole body): the TileOut contract.
    unsafe {
        match out {
            TileOut::I32(c) => {
                for (i, acc) in acc.iter().enumerate() {
                    let dst = c.add(i * 16) as *mut __m256i;
                    _mm256_storeu_si256(dst, acc[0]);
                    _mm256_storeu_si256(dst.add(1), acc[1]);
                }
            }
            TileOut::F32(t) if t.cols() == 16 => {
                let ld = |p: *const i32| _mm256_loadu_si256(p as *const __m256i);
                let cs = [ld(t.col_sums.as_ptr()), ld(t.col_sums.as_ptr().add(8))];
                let sw = [_mm256_loadu_ps(t.scales.as_ptr()), _mm256_loadu_ps(t.scales.as_ptr().add(8))];
                let bias = t.bias.map(|b| [_mm256_loadu_ps(b.as_ptr()), _mm256_loadu_ps(b.as_ptr().add(8))]);
                for (i, acc) in acc.iter().enumerate() {
                    let (zav, sav) = (_mm256_set1_epi32(t.za[i]), _mm256_set1_ps(t.sa[i]));
                    let y = t.y.add(i * t.ldy);
                    for h in 0..2 {
                        // Same operations and order as crate::gemm::dequantize_row.
                        let c = _mm256_sub_epi32(acc[h], _mm256_mullo_epi32(zav, cs[h]));
                        let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_mul_ps(sav, sw[h]));
                        if let Some(b) = bias {
                            v = _mm256_add_ps(v, b[h]);
                        }
                        v = activate(v, t.act);
                        _mm256_storeu_ps(y.add(8 * h), v);
                    }
                }
            }
            TileOut::F32(t) => {
                // A partial panel (the last columns of W): spill and use the row operation.
                let mut buf = [0i32; 16];
                for (i, acc) in acc.iter().enumerate() {
                    _mm256_storeu_si256(buf.as_mut_ptr() as *mut __m256i, acc[0]);
                    _mm256_storeu_si256(buf.as_mut_ptr().add(8) as *mut __m256i, acc[1]);
                    t.write_row(&OPS_U8, i, &buf);
                }
            }
        }
    }
}

/// Adds the residual to the `rows` rows of an f32 tile just written: one f32 addition per
/// element, 8 lanes at a time, then one by one. Not inlined: see [`F32Tile::add_residual`].
///
/// # Safety
/// The CPU has AVX and FMA; `t` satisfies the `F32Tile` contract for `rows` rows.
#[inline(never)]
#[target_feature(enable = "avx,fma")]
pub(crate) unsafe fn add_residual(rows: usize, t: &F32Tile<'_>) {
    let Some((r, ldr)) = t.residual else { return };
    let cols = t.cols();
    // SAFETY: rows x cols of y are this tile's, of the residual readable.
    unsafe {
        for i in 0..rows {
            let (y, r) = (t.y.add(i * t.ldy), r.add(i * ldr));
            let mut j = 0;
            while j + 8 <= cols {
                _mm256_storeu_ps(y.add(j), _mm256_add_ps(_mm256_loadu_ps(y.add(j)), _mm256_loadu_ps(r.add(j))));
                j += 8;
            }
            while j < cols {
                *y.add(j) += *r.add(j);
                j += 1;
            }
        }
    }
}

/// The epilogue activation; the same operations, in the same order, as
/// `crate::gemm::{relu, gelu, gelu_tanh, silu, quick_gelu}`.
///
/// # Safety
/// The CPU has AVX and FMA.
#[inline]
#[target_feature(enable = "avx,fma")]
pub(crate) unsafe fn activate(v: __m256, act: Epilogue) -> __m256 {
    match act {
        Epilogue::None => v,
        // maxps returns its second operand unless the first is greater: relu().
        Epilogue::Relu => _mm256_max_ps(v, _mm256_setzero_ps()),
        Epilogue::Gelu => {
            let set = _mm256_set1_ps;
            let z = _mm256_mul_ps(v, set(std::f32::consts::FRAC_1_SQRT_2));
            let z = _mm256_min_ps(_mm256_max_ps(z, set(-4.0)), set(4.0));
            let s = _mm256_mul_ps(z, z);
            let (mut p, mut q) = (set(ERF_P[5]), set(ERF_Q[5]));
            for i in (0..5).rev() {
                p = _mm256_fmadd_ps(p, s, set(ERF_P[i]));
                q = _mm256_fmadd_ps(q, s, set(ERF_Q[i]));
            }
            let e = _mm256_div_ps(_mm256_mul_ps(z, p), q);
            let e = _mm256_min_ps(_mm256_max_ps(e, set(-1.0)), set(1.0));
            let h = _mm256_mul_ps(v, set(0.5));
            _mm256_fmadd_ps(h, e, h)
        }
        Epilogue::GeluTanh => {
            let set = _mm256_set1_ps;
            let u = _mm256_mul_ps(v, _mm256_fmadd_ps(set(GELU_TANH_B), _mm256_mul_ps(v, v), set(GELU_TANH_A)));
            let h = _mm256_mul_ps(v, set(0.5));
            // SAFETY (this arm and the next two): the contract of `activate`.
            _mm256_fmadd_ps(h, unsafe { tanh(u) }, h)
        }
        Epilogue::Silu => {
            let h = _mm256_mul_ps(v, _mm256_set1_ps(0.5));
            _mm256_fmadd_ps(h, unsafe { tanh(h) }, h)
        }
        Epilogue::QuickGelu => {
            let h = _mm256_mul_ps(v, _mm256_set1_ps(0.5));
            let u = _mm256_mul_ps(v, _mm256_set1_ps(QUICK_GELU_HALF_ALPHA));
            _mm256_fmadd_ps(h, unsafe { tanh(u) }, h)
        }
    }
}

/// `crate::gemm::tanh`: the same operations in the same order.
///
/// # Safety
/// As [`activate`].
#[inline]
#[target_feature(enable = "avx,fma")]
unsafe fn tanh(u: __m256) -> __m256 {
    let set = _mm256_set1_ps;
    let u = _mm256_min_ps(_mm256_max_ps(u, set(-TANH_CLAMP)), set(TANH_CLAMP));
    let s = _mm256_mul_ps(u, u);
    let (mut p, mut q) = (set(TANH_P[4]), set(TANH_Q[4]));
    for i in (0..4).rev() {
        p = _mm256_fmadd_ps(p, s, set(TANH_P[i]));
        q = _mm256_fmadd_ps(q, s, set(TANH_Q[i]));
    }
    let th = _mm256_div_ps(_mm256_mul_ps(u, p), q);
    _mm256_min_ps(_mm256_max_ps(th, set(-1.0)), set(1.0))
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn row_stats(x: &[f32]) -> Option<(f32, f32)> {
    // SAFETY: forwarded; `s` is not read.
    unsafe { row_stats_as::<false>(x, &[]) }
}

/// [`row_stats`] of `x[i] * s[i]` (see `RowOps::scaled`).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_scaled(x: &[f32], s: &[f32]) -> Option<(f32, f32)> {
    assert_eq!(x.len(), s.len());
    // SAFETY: forwarded; equal lengths.
    unsafe { row_stats_as::<true>(x, s) }
}

/// `SCALED`: the values are `x[i] * s[i]` (`s.len() == x.len()`), else `x[i]`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_stats_as<const SCALED: bool>(x: &[f32], s: &[f32]) -> Option<(f32, f32)> {
    // SAFETY: AVX (the contract).
    let mut range = unsafe { Range::new() };
    let full = x.len() / 32 * 32;
    let mut tail_buf = [0f32; 32];
    let tail = if SCALED {
        for (t, (a, b)) in tail_buf.iter_mut().zip(x[full..].iter().zip(&s[full..])) {
            *t = a * b;
        }
        &tail_buf[..x.len() - full]
    } else {
        &x[full..]
    };
    for j in (0..full).step_by(32) {
        for u in 0..4 {
            // SAFETY: j + 32 <= x.len() (= s.len() when SCALED).
            let mut v = unsafe { _mm256_loadu_ps(x.as_ptr().add(j + 8 * u)) };
            if SCALED {
                v = _mm256_mul_ps(v, unsafe { _mm256_loadu_ps(s.as_ptr().add(j + 8 * u)) });
            }
            // SAFETY: AVX (the contract).
            unsafe { range.add(u, v) };
        }
    }
    // SAFETY: AVX (the contract).
    unsafe { range.finish(tail) }
}

/// Bytes ahead of the values whose range [`quantize_row_with`] takes that it prefetches (as
/// the AVX-512 loop does).
const RANGE_PREFETCH: usize = 2048;

/// A range being taken: four independent accumulators of each kind (one would be a chain of
/// dependent operations, 4 cycles each per 8 values). min and max are exact and
/// order-independent, so the result is the definition's.
struct Range {
    lo: [__m256; 4],
    hi: [__m256; 4],
    /// `x - x` is +0 for finite x and NaN for NaN and +-inf; OR-ed together, the bits stay
    /// zero exactly while every value is finite.
    bad: [__m256; 4],
}

impl Range {
    /// # Safety
    /// The CPU has AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn new() -> Self {
        let zero = _mm256_setzero_ps();
        Range { lo: [zero; 4], hi: [zero; 4], bad: [zero; 4] }
    }

    /// Takes the 8 values of `v` into accumulator `u` (< 4).
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn add(&mut self, u: usize, v: __m256) {
        self.lo[u] = _mm256_min_ps(self.lo[u], v);
        self.hi[u] = _mm256_max_ps(self.hi[u], v);
        self.bad[u] = _mm256_or_ps(self.bad[u], _mm256_sub_ps(v, v));
    }

    /// `(min, max)` of the values taken and of `tail` (the definition's range, 0 included), or
    /// `None` when a value was NaN or infinite.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn finish(self, tail: &[f32]) -> Option<(f32, f32)> {
        let [b0, b1, b2, b3] = self.bad;
        let bad = _mm256_castps_si256(_mm256_or_ps(_mm256_or_ps(b0, b1), _mm256_or_ps(b2, b3)));
        if _mm256_testz_si256(bad, bad) == 0 {
            return None;
        }
        let (tlo, thi) = crate::quant::activations::row_stats(tail)?;
        let [l0, l1, l2, l3] = self.lo;
        let [h0, h1, h2, h3] = self.hi;
        let lo = _mm256_min_ps(_mm256_min_ps(l0, l1), _mm256_min_ps(l2, l3));
        let hi = _mm256_max_ps(_mm256_max_ps(h0, h1), _mm256_max_ps(h2, h3));
        let mut l = [0f32; 8];
        let mut h = [0f32; 8];
        // SAFETY: 8-float arrays.
        unsafe {
            _mm256_storeu_ps(l.as_mut_ptr(), lo);
            _mm256_storeu_ps(h.as_mut_ptr(), hi);
        }
        Some((l.iter().fold(tlo, |m, &v| m.min(v)), h.iter().fold(thi, |m, &v| m.max(v))))
    }
}

/// The constants of a row's quantization: q = clamp(round_half_even(x / scale) + add, lo, hi)
/// + bias (see `quantize_value`), with `recip = RN(1 / scale)` for the `RECIP` quotient.
struct Quantizer {
    scale: __m256,
    recip: __m256,
    add: __m256i,
    lo: __m256i,
    hi: __m256i,
    bias: __m256i,
}

impl Quantizer {
    /// # Safety
    /// The CPU has AVX.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn new(scale: f32, zero_point: i32, ty: ActType) -> Self {
        let (add, lo, hi, bias) = match ty {
            ActType::AsymmetricU8 => (zero_point, 0, 255, 0),
            ActType::SymmetricI8 => (0, -127, 127, 128),
        };
        Quantizer {
            scale: _mm256_set1_ps(scale),
            recip: _mm256_set1_ps(1.0 / scale),
            add: _mm256_set1_epi32(add),
            lo: _mm256_set1_epi32(lo),
            hi: _mm256_set1_epi32(hi),
            bias: _mm256_set1_epi32(bias),
        }
    }

    /// 8 values to i32 lanes holding the `u8` results. `RECIP`: the quotient by the
    /// reciprocal-and-correction method (see `super::RECIP_SCALE_MIN`: the same value as the
    /// division, for scales inside its bounds), three FMA-unit operations instead of `vdivps`,
    /// which issues one 8-lane division every 5 cycles or so and bounded this loop.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn quantize8<const RECIP: bool>(&self, v: __m256) -> __m256i {
        // SAFETY: the contract.
        let r = unsafe { self.rounded8::<RECIP>(v) };
        _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(r, self.lo), self.hi), self.bias)
    }

    /// round_half_even(x / scale) + add for 8 values, before the clamp: within [-255, 510]
    /// for values inside the range the scale was made from (`|x / scale| <= 255`).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rounded8<const RECIP: bool>(&self, v: __m256) -> __m256i {
        let quotient = if RECIP {
            let q = _mm256_mul_ps(v, self.recip);
            let r = _mm256_fnmadd_ps(q, self.scale, v); // x - q * scale, exact
            _mm256_fmadd_ps(r, self.recip, q)
        } else {
            _mm256_div_ps(v, self.scale)
        };
        // round_half_even(quotient): explicit rounding, whatever MXCSR says; the rounded value
        // is integral, so the conversion is exact.
        let r = _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(quotient));
        _mm256_add_epi32(r, self.add)
    }
}

/// Quantizes a row into `u8` values (`BYTES == 1`) or `u8` values zero-extended to
/// little-endian `u16` (`BYTES == 2`); `out.len() == x.len() * BYTES`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_as<const BYTES: usize, const SCALED: bool>(
    x: &[f32],
    s: &[f32],
    scale: f32,
    zero_point: i32,
    ty: ActType,
    out: &mut [u8],
) {
    assert_eq!(x.len() * BYTES, out.len());
    assert!(!SCALED || s.len() == x.len());
    // SAFETY: AVX2 and FMA (the contract); forwarded.
    unsafe {
        if super::recip_scale_ok(scale) {
            quantize_row_with::<BYTES, SCALED, true, false>(x, s, scale, zero_point, ty, out, &[]);
        } else {
            quantize_row_with::<BYTES, SCALED, false, false>(x, s, scale, zero_point, ty, out, &[]);
        }
    }
}

/// [`RowOps::quantize_and_stats`] for `u8` (`BYTES == 1`) or `u16` (`BYTES == 2`) values:
/// `quantize_row(x, ..)` and `row_stats(next)` in one loop, so that the reads of `next` (from
/// L2 or L3 for most layers) overlap the quantization's arithmetic.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_and_stats_as<const BYTES: usize>(
    x: &[f32],
    scale: f32,
    zero_point: i32,
    ty: ActType,
    out: &mut [u8],
    next: &[f32],
) -> Option<(f32, f32)> {
    assert_eq!(x.len() * BYTES, out.len());
    assert_eq!(x.len(), next.len());
    // SAFETY: AVX2 and FMA (the contract); forwarded with the lengths asserted.
    unsafe {
        if super::recip_scale_ok(scale) {
            quantize_row_with::<BYTES, false, true, true>(x, &[], scale, zero_point, ty, out, next)
        } else {
            quantize_row_with::<BYTES, false, false, true>(x, &[], scale, zero_point, ty, out, next)
        }
    }
}

/// [`quantize_row_as`] with the quotient's method fixed (`RECIP` requires a scale inside the
/// bounds of `super::recip_scale_ok`); `STATS`: also the range of `next` (`row_stats`), its
/// loads interleaved with this row's arithmetic (else `next` is not read and `None` returned).
///
/// # Safety
/// As [`quantize_row_as`], whose assertions hold; `next.len() == x.len()` when `STATS`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_with<const BYTES: usize, const SCALED: bool, const RECIP: bool, const STATS: bool>(
    x: &[f32],
    s: &[f32],
    scale: f32,
    zero_point: i32,
    ty: ActType,
    out: &mut [u8],
    next: &[f32],
) -> Option<(f32, f32)> {
    debug_assert!(!STATS || next.len() == x.len());
    // SAFETY: AVX (the contract).
    let mut range = unsafe { Range::new() };
    // The 8 values of `next` at j into accumulator u, and a line 2 KiB ahead of them requested.
    let mut stats = |j: usize, u: usize| {
        if STATS {
            // SAFETY: j + 8 <= next.len() at every call below; a prefetch never faults (its
            // address is made with wrapping_add).
            unsafe {
                let p = next.as_ptr().add(j);
                if j.is_multiple_of(16) {
                    _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(RANGE_PREFETCH));
                }
                range.add(u, _mm256_loadu_ps(p));
            }
        }
    };
    // SAFETY: AVX (the contract).
    let qz = unsafe { Quantizer::new(scale, zero_point, ty) };
    // The value at j: x[j] (times s[j] when SCALED), 8 lanes.
    let load = |j: usize| {
        // SAFETY: j + 8 <= x.len() (== s.len() when SCALED) at every call below.
        unsafe {
            let v = _mm256_loadu_ps(x.as_ptr().add(j));
            if SCALED {
                _mm256_mul_ps(v, _mm256_loadu_ps(s.as_ptr().add(j)))
            } else {
                v
            }
        }
    };
    let q = |j: usize| {
        // SAFETY: the contract.
        unsafe { qz.quantize8::<RECIP>(load(j)) }
    };
    // Asymmetric uint8 (the default; bias 0, clamp to 0..=255): the full steps leave the clamp
    // to the saturating packs, as the AVX-512 loop does. `rounded8` is within [-255, 510]
    // (see there): the signed-to-unsigned i32 -> u16 pack takes negatives to 0, and the
    // i16 -> u8 pack (u8 rows) or one unsigned 16-bit minimum with 255 (u16 rows) takes the
    // rest above 255 to 255: the clamp's values, with 3 fewer operations per 8 values.
    let asym = ty == ActType::AsymmetricU8;
    let r = |j: usize| {
        // SAFETY: the contract.
        unsafe { qz.rounded8::<RECIP>(load(j)) }
    };
    let narrow = |j: usize| if asym { r(j) } else { q(j) };
    // Full steps of 32 (u8) or 16 (u16) values, narrowed by saturating packs and put back in
    // order with one permutation; one 32-byte store.
    let step = 32 / BYTES;
    let mut j = 0;
    while j + step <= x.len() {
        for u in 0..step / 8 {
            stats(j + 8 * u, u);
        }
        // SAFETY: j + step <= x.len(), so the step's BYTES * step = 32 bytes are inside `out`.
        unsafe {
            let w = if BYTES == 1 {
                // Per 128-bit half, the dwords of packus(packus(q0, q1), packus(q2, q3)) are
                // [q0 q1 q2 q3] (values 0-3) | [q0 q1 q2 q3] (values 4-7).
                let b = _mm256_packus_epi16(
                    _mm256_packus_epi32(narrow(j), narrow(j + 8)),
                    _mm256_packus_epi32(narrow(j + 16), narrow(j + 24)),
                );
                _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
            } else {
                // Per half, the qwords of packus(q0, q1) are [q0 q1] (values 0-3) | (values 4-7).
                let w = _mm256_packus_epi32(narrow(j), narrow(j + 8));
                let w = if asym { _mm256_min_epu16(w, _mm256_set1_epi16(255)) } else { w };
                _mm256_permute4x64_epi64::<0b11_01_10_00>(w)
            };
            _mm256_storeu_si256(out.as_mut_ptr().add(BYTES * j) as *mut __m256i, w);
        }
        j += step;
    }
    while j + 8 <= x.len() {
        stats(j, 0);
        // SAFETY: j + 8 <= x.len() and BYTES * (j + 8) <= out.len().
        unsafe {
            let w = _mm256_packus_epi32(q(j), q(j)); // u16: [q0..q3 q0..q3 | q4..q7 q4..q7]
            if BYTES == 1 {
                let bytes = _mm256_packus_epi16(w, w); // u8, same lane structure
                let lo4 = _mm256_extract_epi32::<0>(bytes) as u32;
                let hi4 = _mm256_extract_epi32::<4>(bytes) as u32;
                (out.as_mut_ptr().add(j) as *mut u64).write_unaligned((lo4 as u64) | ((hi4 as u64) << 32));
            } else {
                let w = _mm256_permute4x64_epi64::<0b1000>(w); // [q0..q3 q4..q7 | ...]
                _mm_storeu_si128(out.as_mut_ptr().add(2 * j) as *mut __m128i, _mm256_castsi256_si128(w));
            }
        }
        j += 8;
    }
    let p = QParams { scale, zero_point };
    for i in j..x.len() {
        let v = if SCALED { x[i] * s[i] } else { x[i] };
        out[BYTES * i] = quantize_value(v, p, ty);
        if BYTES == 2 {
            out[2 * i + 1] = 0;
        }
    }
    if !STATS {
        return None;
    }
    // SAFETY: AVX (the contract).
    unsafe { range.finish(&next[j..]) }
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_row_u8(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    // SAFETY: forwarded.
    unsafe { quantize_row_as::<1, false>(x, &[], scale, zero_point, ty, out) }
}

/// [`quantize_row_u8`] of `x[i] * s[i]`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_u8_scaled(x: &[f32], s: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    assert_eq!(x.len(), s.len());
    // SAFETY: forwarded; equal lengths.
    unsafe { quantize_row_as::<1, true>(x, s, scale, zero_point, ty, out) }
}

/// [`quantize_row_u16`] of `x[i] * s[i]`.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_row_u16_scaled(x: &[f32], s: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    assert_eq!(x.len(), s.len());
    // SAFETY: forwarded; equal lengths.
    unsafe { quantize_row_as::<2, true>(x, s, scale, zero_point, ty, out) }
}

/// # Safety
/// The CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_row_u16(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    // SAFETY: forwarded.
    unsafe { quantize_row_as::<2, false>(x, &[], scale, zero_point, ty, out) }
}

/// # Safety
/// The CPU has AVX2 and FMA; all slices of `row` have `out.len()` elements and `acc` at least that.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dequantize_row(row: &DequantRow<'_>, acc: &[i32], out: &mut [f32]) {
    let n = out.len();
    assert!(acc.len() >= n && row.col_sums.len() == n && row.scales.len() == n);
    assert!(row.bias.is_none_or(|b| b.len() == n));
    let (zav, sav) = (_mm256_set1_epi32(row.za), _mm256_set1_ps(row.sa));
    let full = n / 8 * 8;
    for j in (0..full).step_by(8) {
        // SAFETY: j + 8 <= n for every slice (checked above).
        unsafe {
            let a = _mm256_loadu_si256(acc.as_ptr().add(j) as *const __m256i);
            let cs = _mm256_loadu_si256(row.col_sums.as_ptr().add(j) as *const __m256i);
            // Same operations and order as crate::gemm::dequantize_row.
            let c = _mm256_sub_epi32(a, _mm256_mullo_epi32(zav, cs));
            let s = _mm256_mul_ps(sav, _mm256_loadu_ps(row.scales.as_ptr().add(j)));
            let mut t = _mm256_mul_ps(_mm256_cvtepi32_ps(c), s);
            if let Some(b) = row.bias {
                t = _mm256_add_ps(t, _mm256_loadu_ps(b.as_ptr().add(j)));
            }
            t = activate(t, row.act);
            _mm256_storeu_ps(out.as_mut_ptr().add(j), t);
        }
    }
    if full < n {
        let tail = DequantRow {
            za: row.za,
            sa: row.sa,
            col_sums: &row.col_sums[full..],
            scales: &row.scales[full..],
            bias: row.bias.map(|b| &b[full..]),
            act: row.act,
        };
        crate::gemm::dequantize_row(&tail, &acc[full..n], &mut out[full..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::activations::row_stats as row_stats_definition;
    use crate::quant::activations::{asymmetric_params, quantize_row, symmetric_params};

    /// Both AVX2 activation formats (u8 for the AVX-VNNI kernel, which this machine may not be
    /// able to run, and u16 for the AVX2 kernel) against the scalar definitions, including
    /// values that fall exactly on rounding ties and rows of every mix of 32-, 16- and 8-value
    /// steps and tails.
    #[test]
    fn row_ops_match_the_definitions() {
        if !Isa::Avx2.is_supported() {
            eprintln!("SKIPPED: AVX2 row operations: this CPU has no AVX2 and FMA");
            return;
        }
        let mut seed = 7u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [1usize, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 47, 48, 57, 64, 100] {
            for ty in [ActType::AsymmetricU8, ActType::SymmetricI8] {
                let x: Vec<f32> = (0..len)
                    .map(|i| {
                        let r = (rnd() % 2000) as f32 / 100.0 - 9.0;
                        if i % 5 == 0 {
                            (r.round() + 0.5) / 8.0
                        } else {
                            r
                        }
                    })
                    .collect();
                let (lo, hi) = row_stats_definition(&x).unwrap();
                // SAFETY: AVX2 checked above.
                assert_eq!(unsafe { row_stats_avx2_for_test(&x) }, Some((lo, hi)));
                let p = match ty {
                    ActType::AsymmetricU8 => asymmetric_params(lo, hi),
                    ActType::SymmetricI8 => symmetric_params(hi.max(-lo)),
                };
                let mut want = vec![0u8; len];
                quantize_row(&x, p.scale, p.zero_point, ty, &mut want);
                let mut u8s = vec![0u8; len];
                let mut u16s = vec![0xAAu8; 2 * len];
                // SAFETY: AVX2 checked above; lengths as required.
                unsafe {
                    quantize_row_u8(&x, p.scale, p.zero_point, ty, &mut u8s);
                    quantize_row_u16(&x, p.scale, p.zero_point, ty, &mut u16s);
                }
                assert_eq!(u8s, want, "u8 len={len} {ty:?}");
                let wide: Vec<u8> = want.iter().flat_map(|&v| [v, 0]).collect();
                assert_eq!(u16s, wide, "u16 len={len} {ty:?}");
            }
        }
        // SAFETY: AVX2 checked above.
        assert_eq!(unsafe { row_stats_avx2_for_test(&[1.0, f32::NAN, 2.0]) }, None);
    }

    /// The reciprocal-and-correction quotient rounds exactly like the division, in both output
    /// formats (see `kernels::tests::check_rounds_like_the_division`).
    #[test]
    fn quantize_row_rounds_like_the_division() {
        if !Isa::Avx2.is_supported() {
            eprintln!("SKIPPED: AVX2 row operations: this CPU has no AVX2 and FMA");
            return;
        }
        crate::kernels::tests::check_rounds_like_the_division(|x, s, zp, ty, out| {
            // SAFETY: AVX2 and FMA checked above; equal lengths.
            unsafe { quantize_row_u8(x, s, zp, ty, out) }
        });
        crate::kernels::tests::check_rounds_like_the_division(|x, s, zp, ty, out| {
            let mut wide = vec![0xAAu8; 2 * x.len()];
            // SAFETY: AVX2 and FMA checked above; twice the length.
            unsafe { quantize_row_u16(x, s, zp, ty, &mut wide) };
            for (o, v) in out.iter_mut().zip(wide.chunks_exact(2)) {
                assert_eq!(v[1], 0, "the high byte of a u16 value");
                *o = v[0];
            }
        });
    }

    /// Every quotient near the hardest scale (see `check_every_quotient_like_the_division`).
    #[test]
    fn quantize_row_rounds_like_the_division_everywhere() {
        if !Isa::Avx2.is_supported() {
            eprintln!("SKIPPED: AVX2 row operations: this CPU has no AVX2 and FMA");
            return;
        }
        crate::kernels::tests::check_every_quotient_like_the_division(|x, s, zp, ty, out| {
            // SAFETY: AVX2 and FMA checked above; equal lengths.
            unsafe { quantize_row_u8(x, s, zp, ty, out) }
        });
    }

    /// Ranges of every length (full 32-value steps and the tail), with a NaN (either sign) or
    /// an infinity at the start, middle or end refused, and extreme finite values kept.
    #[test]
    fn row_stats_flag_every_non_finite_value() {
        if !Isa::Avx2.is_supported() {
            eprintln!("SKIPPED: AVX2 row statistics: this CPU has no AVX2 and FMA");
            return;
        }
        for len in 0..150usize {
            let x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 201) as f32 - 100.0 + 0.25 * (len % 3) as f32).collect();
            // SAFETY: AVX2 checked above.
            assert_eq!(unsafe { row_stats_avx2_for_test(&x) }, row_stats_definition(&x), "len {len}");
            for pos in [0, len / 2, len.saturating_sub(1)].into_iter().filter(|&p| p < len) {
                for bad in [f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut y = x.clone();
                    y[pos] = bad;
                    // SAFETY: AVX2 checked above.
                    assert_eq!(unsafe { row_stats_avx2_for_test(&y) }, None, "len {len} pos {pos} {bad}");
                }
                for extreme in [f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45] {
                    let mut y = x.clone();
                    y[pos] = extreme;
                    // SAFETY: AVX2 checked above.
                    let got = unsafe { row_stats_avx2_for_test(&y) };
                    assert_eq!(got, row_stats_definition(&y), "len {len} pos {pos} {extreme}");
                }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    unsafe fn row_stats_avx2_for_test(x: &[f32]) -> Option<(f32, f32)> {
        // SAFETY: forwarded.
        unsafe { super::row_stats(x) }
    }
}
