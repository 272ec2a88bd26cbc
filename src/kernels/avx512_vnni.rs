//! AVX-512 VNNI: `vpdpbusd` on zmm (16 lanes x 4 u8*s8 products per instruction).
//!
//! Micro-kernel `gemm_u8s8_i32_12x32c4__avx512vnni`: 12 rows of A x 32 columns of W, K in
//! groups of 4. Per K group it loads two zmm of weights (32 columns x 4 bytes, the panel layout
//! of `pack_panels::<32, 4>`) and broadcasts 4 bytes of each A row, then issues 24 `vpdpbusd`
//! into 24 independent accumulators (27 of 32 zmm registers), with 14 loads per 24 dot
//! products. Measured on this machine class (loop of that shape, operands in L1): 16
//! accumulators (8x32) reach 64% of the `vpdpbusd` peak, 24 (12x32) 81%: the extra
//! accumulators hide the latency of the broadcast loads. Fewer rows (M tails, M = 1..11
//! decoding) use the same body instantiated for that row count; with 1 to 3 rows the K loop
//! keeps two accumulator sets (even and odd groups) to break the dependency chains.
//!
//! `vpdpbusd` never saturates (its `vpdpbusds` sibling does), so the sums are exact.

use super::{pack_panels, unpack_panels, Kernel, RowOps, TileOut};
use crate::gemm::{Epilogue, ERF_P, ERF_Q};
use crate::isa::Isa;
use crate::quant::ActType;
use std::arch::x86_64::*;

const MR: usize = 12;
const NR: usize = 32;
const KR: usize = 4;
/// Prefetch distance in the weight stream, bytes (see `rows`).
const PREFETCH: usize = 1024;

/// The AVX-512 VNNI table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::Avx512Vnni,
    name: "gemm_u8s8_i32_12x32c4__avx512vnni",
    mr: MR,
    nr: NR,
    kr: KR,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_12x32c4__avx512vnni,
    pack: pack_panels::<NR, KR>,
    unpack: unpack_panels::<NR, KR>,
    ops: &OPS,
};

/// AVX-512 row operations. The epilogue itself runs in registers inside the micro-kernel
/// (`deliver`, masked for partial panels), so the row form is only the portable definition.
pub static OPS: RowOps = RowOps { row_stats, quantize_row, dequantize_row: super::scalar::dequantize_row };

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has AVX-512 F/BW/VL and VNNI.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_12x32c4__avx512vnni(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    c: &TileOut<'_>,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match mr {
            1 => rows::<1, true>(kp, a, a_stride, b, c),
            2 => rows::<2, true>(kp, a, a_stride, b, c),
            3 => rows::<3, true>(kp, a, a_stride, b, c),
            4 => rows::<4, false>(kp, a, a_stride, b, c),
            5 => rows::<5, false>(kp, a, a_stride, b, c),
            6 => rows::<6, false>(kp, a, a_stride, b, c),
            7 => rows::<7, false>(kp, a, a_stride, b, c),
            8 => rows::<8, false>(kp, a, a_stride, b, c),
            9 => rows::<9, false>(kp, a, a_stride, b, c),
            10 => rows::<10, false>(kp, a, a_stride, b, c),
            11 => rows::<11, false>(kp, a, a_stride, b, c),
            _ => rows::<12, false>(kp, a, a_stride, b, c),
        }
    }
}

/// `R` rows; `SPLIT`: keep separate accumulators for even and odd K groups.
///
/// # Safety
/// As [`gemm_u8s8_i32_12x32c4__avx512vnni`] with `mr == R`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // two accumulator sets indexed in lockstep
unsafe fn rows<const R: usize, const SPLIT: bool>(
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    let groups = kp / KR;
    let mut acc0 = [[_mm512_setzero_si512(); 2]; R];
    let mut acc1 = [[_mm512_setzero_si512(); 2]; R];
    // SAFETY (whole body): every load reads inside the `kp` bytes of an A row or the
    // `kp * NR` bytes of the panel; stores write the first R rows of the MR x NR tile.
    unsafe {
        let bcast =
            |i: usize, g: usize| _mm512_set1_epi32((a.add(i * a_stride + g * KR) as *const i32).read_unaligned());
        let panel = |g: usize| {
            let p = b.add(g * NR * KR) as *const __m512i;
            // Software prefetch PREFETCH bytes ahead in the weight stream: with few rows the
            // kernel is bound by how fast weights arrive (GEMV-like shapes), and the hardware
            // prefetcher alone leaves bandwidth unused. A prefetch past the end is harmless.
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).add(PREFETCH));
            _mm_prefetch::<_MM_HINT_T0>((p as *const i8).add(PREFETCH + 64));
            (_mm512_loadu_si512(p), _mm512_loadu_si512(p.add(1)))
        };
        let mut g = 0;
        if SPLIT {
            while g + 2 <= groups {
                let (b0, b1) = panel(g);
                let (b2, b3) = panel(g + 1);
                for i in 0..R {
                    let av = bcast(i, g);
                    acc0[i][0] = _mm512_dpbusd_epi32(acc0[i][0], av, b0);
                    acc0[i][1] = _mm512_dpbusd_epi32(acc0[i][1], av, b1);
                    let av = bcast(i, g + 1);
                    acc1[i][0] = _mm512_dpbusd_epi32(acc1[i][0], av, b2);
                    acc1[i][1] = _mm512_dpbusd_epi32(acc1[i][1], av, b3);
                }
                g += 2;
            }
        }
        while g < groups {
            let (b0, b1) = panel(g);
            for i in 0..R {
                let av = bcast(i, g);
                acc0[i][0] = _mm512_dpbusd_epi32(acc0[i][0], av, b0);
                acc0[i][1] = _mm512_dpbusd_epi32(acc0[i][1], av, b1);
            }
            g += 1;
        }
        if SPLIT {
            for i in 0..R {
                acc0[i][0] = _mm512_add_epi32(acc0[i][0], acc1[i][0]);
                acc0[i][1] = _mm512_add_epi32(acc0[i][1], acc1[i][1]);
            }
        }
        deliver(&acc0, out);
    }
}

/// Delivers `R` rows of 32 columns held in two zmm accumulators each, as `out` asks; partial
/// panels use masked loads and stores.
///
/// # Safety
/// The CPU has AVX-512 F; `out` satisfies the `TileOut` contract for `R` rows and NR = 32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn deliver<const R: usize>(acc: &[[__m512i; 2]; R], out: &TileOut<'_>) {
    // SAFETY (whole body): the TileOut contract; masked lanes are neither read nor written.
    unsafe {
        match out {
            TileOut::I32(c) => {
                for (i, acc) in acc.iter().enumerate() {
                    let dst = c.add(i * NR) as *mut __m512i;
                    _mm512_storeu_si512(dst, acc[0]);
                    _mm512_storeu_si512(dst.add(1), acc[1]);
                }
            }
            TileOut::F32(t) => {
                let cols = t.cols();
                let mask = [lane_mask(cols), lane_mask(cols.saturating_sub(16))];
                let cs: [__m512i; 2] =
                    std::array::from_fn(|h| _mm512_maskz_loadu_epi32(mask[h], t.col_sums.as_ptr().add(16 * h)));
                let sw: [__m512; 2] =
                    std::array::from_fn(|h| _mm512_maskz_loadu_ps(mask[h], t.scales.as_ptr().add(16 * h)));
                let bias = t.bias.map(|b| -> [__m512; 2] {
                    std::array::from_fn(|h| _mm512_maskz_loadu_ps(mask[h], b.as_ptr().add(16 * h)))
                });
                for (i, acc) in acc.iter().enumerate() {
                    let (zav, sav) = (_mm512_set1_epi32(t.za[i]), _mm512_set1_ps(t.sa[i]));
                    let y = t.y.add(i * t.ldy);
                    for h in 0..2 {
                        if mask[h] == 0 {
                            continue;
                        }
                        // Same operations and order as crate::gemm::dequantize_row.
                        let c = _mm512_sub_epi32(acc[h], _mm512_mullo_epi32(zav, cs[h]));
                        let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(sav, sw[h]));
                        if let Some(b) = bias {
                            v = _mm512_add_ps(v, b[h]);
                        }
                        v = activate(v, t.act);
                        _mm512_mask_storeu_ps(y.add(16 * h), mask[h], v);
                    }
                }
            }
        }
    }
}

/// The epilogue activation; the same operations, in the same order, as
/// `crate::gemm::{relu, gelu}`.
///
/// # Safety
/// The CPU has AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn activate(v: __m512, act: Epilogue) -> __m512 {
    match act {
        Epilogue::None => v,
        // maxps returns its second operand unless the first is greater: relu().
        Epilogue::Relu => _mm512_max_ps(v, _mm512_setzero_ps()),
        Epilogue::Gelu => {
            let set = _mm512_set1_ps;
            let z = _mm512_mul_ps(v, set(std::f32::consts::FRAC_1_SQRT_2));
            let z = _mm512_min_ps(_mm512_max_ps(z, set(-4.0)), set(4.0));
            let s = _mm512_mul_ps(z, z);
            let (mut p, mut q) = (set(ERF_P[5]), set(ERF_Q[5]));
            for i in (0..5).rev() {
                p = _mm512_add_ps(_mm512_mul_ps(p, s), set(ERF_P[i]));
                q = _mm512_add_ps(_mm512_mul_ps(q, s), set(ERF_Q[i]));
            }
            let e = _mm512_div_ps(_mm512_mul_ps(z, p), q);
            let e = _mm512_min_ps(_mm512_max_ps(e, set(-1.0)), set(1.0));
            _mm512_mul_ps(_mm512_mul_ps(v, set(0.5)), _mm512_add_ps(set(1.0), e))
        }
    }
}

/// Mask of the first `n` (< 16) lanes, or all 16.
#[inline(always)]
fn lane_mask(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn row_stats(x: &[f32]) -> Option<(f32, f32)> {
    let mut lo = _mm512_setzero_ps();
    let mut hi = _mm512_setzero_ps();
    let mut bad: __mmask16 = 0;
    let mut j = 0;
    while j < x.len() {
        let m = lane_mask(x.len() - j);
        // SAFETY: masked lanes are not read (no fault) and read as 0, which is neutral here
        // since the range is widened to include 0 anyway.
        let v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(j)) };
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
        // x - x is NaN exactly for NaN and +-inf; NEQ_UQ is true for unordered.
        bad |= _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(_mm512_sub_ps(v, v), _mm512_setzero_ps());
        j += 16;
    }
    (bad == 0).then(|| (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi)))
}

/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    assert_eq!(x.len(), out.len());
    let sv = _mm512_set1_ps(scale);
    let (lo, hi, add) = match ty {
        ActType::AsymmetricU8 => (0, 255, zero_point),
        ActType::SymmetricI8 => (-127, 127, 0),
    };
    let (lov, hiv, addv, bias) = (
        _mm512_set1_epi32(lo),
        _mm512_set1_epi32(hi),
        _mm512_set1_epi32(add),
        _mm512_set1_epi32(if ty == ActType::SymmetricI8 { 128 } else { 0 }),
    );
    let mut j = 0;
    while j < x.len() {
        let m = lane_mask(x.len() - j);
        // SAFETY: masked loads and stores touch only the lanes inside both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
            // round_half_even(x / scale), as quantize_value: explicit rounding, whatever MXCSR says.
            let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_div_ps(v, sv));
            let q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(r, addv), lov), hiv), bias);
            _mm_mask_storeu_epi8(out.as_mut_ptr().add(j) as *mut i8, m, _mm512_cvtepi32_epi8(q));
        }
        j += 16;
    }
}
