//! AVX-512 VNNI: `vpdpbusd` on zmm (16 lanes x 4 u8*s8 products per instruction).
//!
//! Micro-kernel `gemm_u8s8_i32_8x48c4__avx512vnni`: 8 rows of A x 48 columns of W, K in
//! groups of 4. Per K group it loads three zmm of weights (48 columns x 4 bytes, the panel
//! layout of `pack_panels::<48, 4>`) and broadcasts 4 bytes of each A row, then issues 24
//! `vpdpbusd` into 24 independent accumulators (28 of 32 zmm registers), with 11 loads per 24
//! dot products. Measured on this machine class (the loop alone, operands in L1, best of 30
//! interleaved runs): 8x48 reaches 557-600 GOPS where 12x32 (24 accumulators too, but 14 loads
//! and 12 address steps per group) reaches 508-561 and 6x64 486-506; 8x32 (16 accumulators)
//! reached 64% of the peak. Fewer rows (M tails, M = 1..7 decoding) use the same body
//! instantiated for that row count; with 1 to 4 rows the K loop keeps two accumulator sets
//! (even and odd groups) to break the dependency chains (at most 24 accumulators).
//!
//! `vpdpbusd` never saturates (its `vpdpbusds` sibling does), so the sums are exact.

use super::{pack_panels, unpack_panels, F32Tile, Kernel, RowOps, ScaledRowOps, TileOut};
use crate::gemm::{
    Epilogue, ERF_P, ERF_Q, GELU_TANH_A, GELU_TANH_B, QUICK_GELU_HALF_ALPHA, TANH_CLAMP, TANH_P, TANH_Q,
};
use crate::isa::Isa;
use crate::quant::ActType;
use std::arch::x86_64::*;

const MR: usize = 8;
const NR: usize = 48;
const KR: usize = 4;
/// zmm vectors per row of a tile.
const V: usize = NR / 16;
/// Prefetch distance in the weight stream, bytes (see `rows`). Measured interleaved: 4 KiB
/// beats 256 B, 1 KiB and 2 KiB by 7-15% on weight-streaming shapes (1x4096x4096,
/// 4x4096x4096, 16x11008x4096) and is neutral on compute-bound ones; 8 KiB is no better and
/// 16 KiB slightly worse.
const PREFETCH: usize = 4096;

/// The AVX-512 VNNI table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::Avx512Vnni,
    name: "gemm_u8s8_i32_8x48c4__avx512vnni",
    mr: MR,
    nr: NR,
    kr: KR,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 2,
    ukernel: gemm_u8s8_i32_8x48c4__avx512vnni,
    pack: pack_panels::<NR, KR>,
    unpack: unpack_panels::<NR, KR>,
    ops: &OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: 2 * MR,
    thread_state: None,
};

/// AVX-512 row operations. The epilogue itself runs in registers inside the micro-kernel
/// (`deliver`, masked for partial panels), so the row form is only the portable definition.
pub static OPS: RowOps = RowOps {
    row_stats,
    quantize_row,
    dequantize_row: super::scalar::dequantize_row,
    scaled: Some(&ScaledRowOps { row_stats: row_stats_scaled, quantize_row: quantize_row_scaled }),
    quantize_and_stats: Some(quantize_and_stats),
};

/// # Safety
/// The contract of [`super::MicroKernel`]; the CPU has AVX-512 F/BW/VL and VNNI.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_8x48c4__avx512vnni(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    c: &TileOut<'_>,
) {
    // The last panel of a matrix whose N is not a multiple of 48 may hold only 1..=32 real
    // columns: then only the zmm vectors that hold them are computed (W = 1 or 2 of 3), which
    // saves up to two thirds of that panel's work (N = 256: 11% of the product). The packed
    // layout is the same; the other vectors' weights are simply not loaded.
    let w = match c {
        TileOut::F32(t) => t.cols().div_ceil(16).clamp(1, V),
        TileOut::I32(_) => V,
    };
    macro_rules! go {
        ($w:literal) => {
            // SAFETY: forwarded contract (mr <= 2 * MR: `KERNEL.stream_mr`).
            unsafe {
                match mr <= MR {
                    true => rows_of::<$w, NR>(mr, kp, a, a_stride, b, c),
                    false => tall_of::<$w>(mr, kp, a, a_stride, b, c),
                }
            }
        };
    }
    match w {
        1 => go!(1),
        2 => go!(2),
        _ => go!(3),
    }
}

/// K groups per chunk of a tall tile ([`tall`]): 24 KiB of a 48-column panel, which stays in
/// L1 while the second row tile meets it.
const TALL_CHUNK: usize = 128;
/// How far ahead the second row tile of a tall tile asks for weights to be brought into L2
/// (one line per K group) when the tile streams them (`F32Tile::stream_l2`): two chunks, so
/// that memory keeps delivering while that tile computes from L1 (the first asks
/// `STREAM_L2_AHEAD` ahead as a single tile does). Without it the two tiles' times added up,
/// memory idle during the second's: against 24 KiB, 48 KiB measured 0.92-1.00x the time, 32
/// to 96 KiB alike; none at all 1.05-1.13x.
const TALL_AHEAD: usize = 2 * TALL_CHUNK * NR * KR;

/// [`tall`] for `mr` (9..=16) rows, split into two row tiles as evenly as possible.
///
/// # Safety
/// As [`gemm_u8s8_i32_8x48c4__avx512vnni`] with `MR < mr <= 2 * MR`.
#[inline(always)]
unsafe fn tall_of<const W: usize>(mr: usize, kp: usize, a: *const u8, a_stride: usize, b: *const i8, c: &TileOut<'_>) {
    // SAFETY: forwarded contract.
    unsafe {
        match mr {
            9 => tall::<5, 4, W>(kp, a, a_stride, b, c),
            10 => tall::<5, 5, W>(kp, a, a_stride, b, c),
            11 => tall::<6, 5, W>(kp, a, a_stride, b, c),
            12 => tall::<6, 6, W>(kp, a, a_stride, b, c),
            13 => tall::<7, 6, W>(kp, a, a_stride, b, c),
            14 => tall::<7, 7, W>(kp, a, a_stride, b, c),
            15 => tall::<8, 7, W>(kp, a, a_stride, b, c),
            _ => tall::<8, 8, W>(kp, a, a_stride, b, c),
        }
    }
}

/// A tall tile: `R1 + R2` rows (9 to 16) as two row tiles that meet each chunk of
/// [`TALL_CHUNK`] K groups of the panel in turn, their accumulators kept in memory between
/// chunks (one store and one load of each per chunk, about 2% of the work). A chunk then
/// comes from the last-level cache or memory once, for the first tile, and from L1 for the
/// second, while the weights stream steadily, as for a single tile (decoding); two separate
/// tiles each read the whole panel, the second from L2 with no weights arriving meanwhile.
/// Medians of alternating calls against two tiles, 1 thread: weights from DRAM (32 copies)
/// 12x4096x4096 0.90-0.94x the time, 16x4096x4096 0.88-0.90x, 16x4096x11008 0.80-0.83x; in L3
/// 0.85-0.91x, 0.80x and 0.70-0.74x; operands in L2 16x768x768 0.74-0.84x, 16x1024x1024 0.79x;
/// 2 threads from DRAM 9x4096x4096 0.92x, 16x4096x11008 0.69x.
///
/// # Safety
/// As [`gemm_u8s8_i32_8x48c4__avx512vnni`] with `mr == R1 + R2`, `W` as in [`rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tall<const R1: usize, const R2: usize, const W: usize>(
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    let groups = kp / KR;
    let stream_l2 = super::streams_l2(out);
    let mut acc1 = [[_mm512_setzero_si512(); W]; R1];
    let mut acc2 = [[_mm512_setzero_si512(); W]; R2];
    // SAFETY (whole body): the loads read inside the R1 + R2 rows of `kp` bytes and the panel
    // (`chunk`); the stores write the tile's rows (the TileOut contract for mr = R1 + R2).
    unsafe {
        let mut g0 = 0;
        while g0 < groups {
            let g1 = (g0 + TALL_CHUNK).min(groups);
            chunk::<R1, W>(&mut acc1, a, a_stride, g0, g1, b, if stream_l2 { super::STREAM_L2_AHEAD } else { 0 });
            chunk::<R2, W>(
                &mut acc2,
                a.add(R1 * a_stride),
                a_stride,
                g0,
                g1,
                b,
                if stream_l2 { TALL_AHEAD } else { 0 },
            );
            g0 = g1;
        }
        match out {
            TileOut::I32(c) => {
                for (i, acc) in acc1.iter().chain(acc2.iter()).enumerate() {
                    let dst = c.add(i * NR) as *mut __m512i;
                    for (v, acc) in acc.iter().enumerate() {
                        _mm512_storeu_si512(dst.add(v), *acc);
                    }
                }
            }
            TileOut::F32(t) => {
                // Both tiles' accumulators in one array of rows, as `deliver_f32` reads them.
                let mut all = [[_mm512_setzero_si512(); W]; 2 * MR];
                all[..R1].copy_from_slice(&acc1);
                all[R1..R1 + R2].copy_from_slice(&acc2);
                deliver_f32::<W>(all.as_ptr(), R1 + R2, t);
                if t.residual.is_some() {
                    add_residual(R1 + R2, t);
                }
            }
        }
    }
}

/// K groups `g0..g1` of `R` rows from `a` (stride `a_stride`) added to `acc`, which is loaded
/// at the start and stored at the end.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI; the rows hold at least `4 * g1` bytes; the panel at
/// `b` (48 columns) at least `g1` groups.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunk<const R: usize, const W: usize>(
    acc: &mut [[__m512i; W]; R],
    a: *const u8,
    a_stride: usize,
    g0: usize,
    g1: usize,
    b: *const i8,
    far: usize,
) {
    // SAFETY (whole body): the contract above; prefetches are hints (wrapping_add: never
    // out-of-bounds pointer arithmetic).
    unsafe {
        let rowp: [*const i32; R] = std::hint::black_box(std::array::from_fn(|i| a.add(i * a_stride) as *const i32));
        let mut x = *acc;
        // The body for group $g (a macro, not a closure: a closure this large is not inlined).
        macro_rules! step {
            ($g:expr) => {{
                let g = $g;
                let p = b.add(g * NR * KR) as *const __m512i;
                for v in 0..W {
                    _mm_prefetch::<_MM_HINT_T0>((p.add(v) as *const i8).wrapping_add(PREFETCH));
                }
                if far != 0 {
                    _mm_prefetch::<_MM_HINT_T1>((p as *const i8).wrapping_add(far));
                }
                let bv: [__m512i; W] = std::array::from_fn(|v| _mm512_loadu_si512(p.add(v)));
                for i in 0..R {
                    let av = _mm512_set1_epi32(rowp[i].add(g).read_unaligned());
                    for v in 0..W {
                        x[i][v] = _mm512_dpbusd_epi32(x[i][v], av, bv[v]);
                    }
                }
            }};
        }
        let mut g = g0;
        while g + 2 <= g1 {
            step!(g);
            step!(g + 1);
            g += 2;
        }
        if g < g1 {
            step!(g);
        }
        *acc = x;
    }
}

/// [`rows`] for `mr` (1..=8) rows, on panels `P` columns wide.
///
/// # Safety
/// As [`rows`].
#[inline(always)]
pub(super) unsafe fn rows_of<const W: usize, const P: usize>(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    c: &TileOut<'_>,
) {
    macro_rules! go {
        ($stream:literal) => {
            // SAFETY: forwarded contract.
            unsafe {
                match mr {
                    1 => rows::<1, true, W, P, $stream>(kp, a, a_stride, b, c),
                    2 => rows::<2, true, W, P, $stream>(kp, a, a_stride, b, c),
                    3 => rows::<3, true, W, P, $stream>(kp, a, a_stride, b, c),
                    4 => rows::<4, true, W, P, $stream>(kp, a, a_stride, b, c),
                    5 => rows::<5, false, W, P, $stream>(kp, a, a_stride, b, c),
                    6 => rows::<6, false, W, P, $stream>(kp, a, a_stride, b, c),
                    7 => rows::<7, false, W, P, $stream>(kp, a, a_stride, b, c),
                    _ => rows::<8, false, W, P, $stream>(kp, a, a_stride, b, c),
                }
            }
        };
    }
    // A separate instance for streaming tiles: the far prefetch in every tile's loop, even
    // at distance 0 or behind a test, cost compute-bound shapes 10% (128x768x768, medians of
    // alternating runs) and 30-50% (the test made LLVM spill accumulators).
    match super::streams_l2(c) {
        true => go!(true),
        false => go!(false),
    }
}

/// `R` rows; `SPLIT`: keep separate accumulators for even and odd K groups; `W`: the first
/// `W` of the panel's `P / 16` zmm columns groups are computed (the others are padding or
/// unused); `P`: the panel width, 48 (this kernel's) or 32 (the AMX kernel's row tails, on its
/// panels, which have the same layout); `STREAM`: the tile streams the weights
/// (`F32Tile::stream_l2`).
///
/// # Safety
/// As [`gemm_u8s8_i32_8x48c4__avx512vnni`] with `mr == R` and panels of `P` columns (an i32
/// tile then has `P` columns per row); `W == P / 16` unless `out` is an f32 tile with at most
/// `16 * W` columns.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // two accumulator sets indexed in lockstep
unsafe fn rows<const R: usize, const SPLIT: bool, const W: usize, const P: usize, const STREAM: bool>(
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    let groups = kp / KR;
    debug_assert!(groups >= 1);
    // SAFETY (whole body): every load reads inside the `kp` bytes of an A row or the
    // `kp * NR` bytes of the panel; stores write the first R rows of the MR x NR tile.
    unsafe {
        // One base pointer per row, hidden from the optimizer: otherwise LLVM derives row i's
        // address from row i-1's inside the loop, an add per row and K group that competes
        // with `vpdpbusd` for the vector ports; with the R pointers in registers each
        // broadcast is indexed by the group alone. Micro-kernel alone: +4-10% (K = 384-3072).
        let rowp: [*const i32; R] = std::hint::black_box(std::array::from_fn(|i| a.add(i * a_stride) as *const i32));
        // KR = 4: group g of a row is the i32 at index g.
        let bcast = |i: usize, g: usize| _mm512_set1_epi32(rowp[i].add(g).read_unaligned());
        let panel = |g: usize| -> [__m512i; W] {
            let p = b.add(g * P * KR) as *const __m512i;
            // Software prefetch PREFETCH bytes ahead in the weight stream: with few rows the
            // kernel is bound by how fast weights arrive (GEMV-like shapes), and the hardware
            // prefetcher alone leaves bandwidth unused. A prefetch past the end is harmless
            // (its address is made with wrapping_add: no out-of-bounds pointer arithmetic).
            for v in 0..W {
                _mm_prefetch::<_MM_HINT_T0>((p.add(v) as *const i8).wrapping_add(PREFETCH));
            }
            if STREAM {
                // Far into L2, one line per group (the L2 streamer fetches its neighbours):
                // `F32Tile::stream_l2`.
                _mm_prefetch::<_MM_HINT_T1>((p as *const i8).wrapping_add(super::STREAM_L2_AHEAD));
            }
            std::array::from_fn(|v| _mm512_loadu_si512(p.add(v)))
        };
        // The driver's L2 hint: one line per loop iteration (two K groups, about 24 cycles),
        // requested while the kernel computes from L1 and L2, so the weights that come next
        // arrive from memory at a steady 2-3 bytes per cycle instead of all at once when their
        // first tile needs them (which left it waiting on the last-level cache).
        let (pf, pf_lines) = match out {
            TileOut::F32(t) => (t.prefetch_l2.as_ptr(), t.prefetch_l2.len().div_ceil(64)),
            TileOut::I32(_) => (b, 0),
        };
        // As many lines per iteration as spread the share over the K loop, at most 4 (16x11008x4096,
        // two tiles per panel, 1 thread: 0.93x the time of one line per iteration).
        let per = pf_lines.div_ceil((groups / 2).max(1)).clamp(1, 4);
        let mut pf_next = 0;
        let mut hint = || {
            for _ in 0..per {
                if pf_next < pf_lines {
                    // In bounds: line pf_next < ceil(len / 64) starts inside the slice.
                    _mm_prefetch::<_MM_HINT_T1>(pf.add(pf_next * 64));
                    pf_next += 1;
                }
            }
        };
        // The first K group initializes the accumulators (a zeroed array would be written to
        // the stack with memset first, which costs a few percent of a tile).
        let bv = panel(0);
        let mut acc: [[__m512i; W]; R] = std::array::from_fn(|i| {
            let av = bcast(i, 0);
            std::array::from_fn(|v| _mm512_dpbusd_epi32(_mm512_setzero_si512(), av, bv[v]))
        });
        let mut g = 1;
        if SPLIT {
            // A second accumulator set for the odd K groups, so that each chain of dependent
            // `vpdpbusd` is half as long; folded into `acc` after the loop.
            let mut odd = [[_mm512_setzero_si512(); W]; R];
            while g + 2 <= groups {
                hint();
                let (b0, b1) = (panel(g), panel(g + 1));
                for i in 0..R {
                    let (a0, a1) = (bcast(i, g), bcast(i, g + 1));
                    for v in 0..W {
                        acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], a0, b0[v]);
                        odd[i][v] = _mm512_dpbusd_epi32(odd[i][v], a1, b1[v]);
                    }
                }
                g += 2;
            }
            for i in 0..R {
                for v in 0..W {
                    acc[i][v] = _mm512_add_epi32(acc[i][v], odd[i][v]);
                }
            }
        }
        // Two groups per iteration (half the loop overhead), then the last one if odd.
        while g + 2 <= groups {
            hint();
            for u in 0..2 {
                let bv = panel(g + u);
                for i in 0..R {
                    let av = bcast(i, g + u);
                    for v in 0..W {
                        acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, bv[v]);
                    }
                }
            }
            g += 2;
        }
        while g < groups {
            let bv = panel(g);
            for i in 0..R {
                let av = bcast(i, g);
                for v in 0..W {
                    acc[i][v] = _mm512_dpbusd_epi32(acc[i][v], av, bv[v]);
                }
            }
            g += 1;
        }
        deliver::<R, W, P>(&acc, out);
        if let TileOut::F32(t) = out {
            if t.residual.is_some() {
                add_residual(R, t);
            }
        }
    }
}

/// Adds the residual to the `rows` rows of an f32 tile just written: one f32 addition per
/// element, masked for partial panels. Not inlined: see [`F32Tile::add_residual`].
///
/// # Safety
/// The CPU has AVX-512 F; `t` satisfies the `F32Tile` contract for `rows` rows.
#[inline(never)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn add_residual(rows: usize, t: &F32Tile<'_>) {
    let Some((r, ldr)) = t.residual else { return };
    let cols = t.cols();
    // SAFETY: rows x cols of y are this tile's, of the residual readable; masked lanes are
    // neither read nor written.
    unsafe {
        for i in 0..rows {
            let (y, r) = (t.y.add(i * t.ldy), r.add(i * ldr));
            let mut j = 0;
            while j < cols {
                let m = lane_mask(cols - j);
                let v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, y.add(j)), _mm512_maskz_loadu_ps(m, r.add(j)));
                _mm512_mask_storeu_ps(y.add(j), m, v);
                j += 16;
            }
        }
    }
}

/// Delivers `R` rows of `16 * W` columns held in W zmm accumulators each, as `out` asks
/// (`W == P / 16` for i32 tiles, `P` columns per row); partial panels use masked loads and
/// stores.
///
/// # Safety
/// The CPU has AVX-512 F; `out` satisfies the `TileOut` contract for `R` rows and `P` columns.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn deliver<const R: usize, const W: usize, const P: usize>(acc: &[[__m512i; W]; R], out: &TileOut<'_>) {
    // SAFETY (whole body): the TileOut contract; masked lanes are neither read nor written.
    unsafe {
        match out {
            TileOut::I32(c) => {
                for (i, acc) in acc.iter().enumerate() {
                    let dst = c.add(i * P) as *mut __m512i;
                    for (v, acc) in acc.iter().enumerate() {
                        _mm512_storeu_si512(dst.add(v), *acc);
                    }
                }
            }
            TileOut::F32(t) => {
                // A copy goes to memory: were the address of `acc` itself taken, the compiler
                // would keep the accumulators on the stack through the whole K loop.
                let spilled: [[__m512i; W]; R] = std::hint::black_box(*acc);
                // It holds R rows (the enclosing SAFETY: the TileOut contract).
                deliver_f32::<W>(spilled.as_ptr(), R, t)
            }
        }
    }
}

/// The f32 epilogue of `rows` rows of `16 * W` columns, the accumulators in memory.
///
/// Not inlined, and one compact loop over the rows per (W, bias, activation): unrolled over
/// the rows of the tile with the activation matched per element, as it first was, the epilogue
/// of each micro-kernel instance took about 9 KB of code (24 instances), spilled its column
/// constants (24 accumulators leave too few registers) and was 8.8% of the kernel's time on
/// 128x768x768. The accumulators now go to the stack (stores and loads use other ports than
/// the arithmetic).
///
/// # Safety
/// The CPU has AVX-512 F; `acc` points to `rows` arrays of W accumulators; `t` satisfies the
/// `F32Tile` contract for `rows` rows with at most `16 * W` columns.
#[inline(never)]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn deliver_f32<const W: usize>(acc: *const [__m512i; W], rows: usize, t: &F32Tile<'_>) {
    // SAFETY (each arm): forwarded.
    unsafe {
        match (t.bias.is_some(), t.act) {
            (false, Epilogue::None) => deliver_rows::<W, false, 0>(acc, rows, t),
            (false, Epilogue::Relu) => deliver_rows::<W, false, 1>(acc, rows, t),
            (false, Epilogue::Gelu) => deliver_rows::<W, false, 2>(acc, rows, t),
            (false, Epilogue::GeluTanh) => deliver_rows::<W, false, 3>(acc, rows, t),
            (false, Epilogue::Silu) => deliver_rows::<W, false, 4>(acc, rows, t),
            (false, Epilogue::QuickGelu) => deliver_rows::<W, false, 5>(acc, rows, t),
            (true, Epilogue::None) => deliver_rows::<W, true, 0>(acc, rows, t),
            (true, Epilogue::Relu) => deliver_rows::<W, true, 1>(acc, rows, t),
            (true, Epilogue::Gelu) => deliver_rows::<W, true, 2>(acc, rows, t),
            (true, Epilogue::GeluTanh) => deliver_rows::<W, true, 3>(acc, rows, t),
            (true, Epilogue::Silu) => deliver_rows::<W, true, 4>(acc, rows, t),
            (true, Epilogue::QuickGelu) => deliver_rows::<W, true, 5>(acc, rows, t),
        }
    }
}

/// [`deliver_f32`] with the bias (`BIAS`) and the activation (`ACT`: the C ABI value of the activation)
/// fixed.
///
/// # Safety
/// As [`deliver_f32`]; `BIAS == t.bias.is_some()`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn deliver_rows<const W: usize, const BIAS: bool, const ACT: u8>(
    acc: *const [__m512i; W],
    rows: usize,
    t: &F32Tile<'_>,
) {
    let act = match ACT {
        0 => Epilogue::None,
        1 => Epilogue::Relu,
        2 => Epilogue::Gelu,
        3 => Epilogue::GeluTanh,
        4 => Epilogue::Silu,
        _ => Epilogue::QuickGelu,
    };
    // SAFETY (whole body): the TileOut contract; masked lanes are neither read nor written.
    unsafe {
        let cols = t.cols();
        debug_assert!(cols <= 16 * W);
        let mask: [__mmask16; W] = std::array::from_fn(|h| lane_mask(cols.saturating_sub(16 * h)));
        let cs: [__m512i; W] =
            std::array::from_fn(|h| _mm512_maskz_loadu_epi32(mask[h], t.col_sums.as_ptr().add(16 * h)));
        let sw: [__m512; W] = std::array::from_fn(|h| _mm512_maskz_loadu_ps(mask[h], t.scales.as_ptr().add(16 * h)));
        let bias: [__m512; W] = std::array::from_fn(|h| match t.bias {
            Some(b) if BIAS => _mm512_maskz_loadu_ps(mask[h], b.as_ptr().add(16 * h)),
            _ => _mm512_setzero_ps(),
        });
        // Where each zmm column group of row 0 goes (runs of 16 in the head layout).
        let base: [*mut f32; W] = std::array::from_fn(|h| match &t.blocks16 {
            Some(p) if 16 * h < cols => p[h],
            _ => t.y.wrapping_add(16 * h),
        });
        for i in 0..rows {
            let (zav, sav) = (_mm512_set1_epi32(t.za[i]), _mm512_set1_ps(t.sa[i]));
            let acc = &*acc.add(i);
            for h in 0..W {
                // Same operations and order as crate::gemm::dequantize_row.
                let c = _mm512_sub_epi32(acc[h], _mm512_mullo_epi32(zav, cs[h]));
                let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(c), _mm512_mul_ps(sav, sw[h]));
                if BIAS {
                    v = _mm512_add_ps(v, bias[h]);
                }
                v = activate(v, act);
                // A group past the tile's columns has an empty mask: nothing is stored (and its
                // address, possibly outside the output, is not touched).
                _mm512_mask_storeu_ps(base[h].wrapping_add(i * t.ldy), mask[h], v);
            }
        }
    }
}

/// The epilogue activation; the same operations, in the same order, as
/// `crate::gemm::{relu, gelu, gelu_tanh, silu, quick_gelu}`.
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
                p = _mm512_fmadd_ps(p, s, set(ERF_P[i]));
                q = _mm512_fmadd_ps(q, s, set(ERF_Q[i]));
            }
            let e = _mm512_div_ps(_mm512_mul_ps(z, p), q);
            let e = _mm512_min_ps(_mm512_max_ps(e, set(-1.0)), set(1.0));
            let h = _mm512_mul_ps(v, set(0.5));
            _mm512_fmadd_ps(h, e, h)
        }
        Epilogue::GeluTanh => {
            let set = _mm512_set1_ps;
            let u = _mm512_mul_ps(v, _mm512_fmadd_ps(set(GELU_TANH_B), _mm512_mul_ps(v, v), set(GELU_TANH_A)));
            let h = _mm512_mul_ps(v, set(0.5));
            // SAFETY (this arm and the next two): the contract of `activate`.
            _mm512_fmadd_ps(h, unsafe { tanh(u) }, h)
        }
        Epilogue::Silu => {
            let h = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
            _mm512_fmadd_ps(h, unsafe { tanh(h) }, h)
        }
        Epilogue::QuickGelu => {
            let h = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
            let u = _mm512_mul_ps(v, _mm512_set1_ps(QUICK_GELU_HALF_ALPHA));
            _mm512_fmadd_ps(h, unsafe { tanh(u) }, h)
        }
    }
}

/// `crate::gemm::tanh`: the same operations in the same order.
///
/// # Safety
/// As [`activate`].
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tanh(u: __m512) -> __m512 {
    let set = _mm512_set1_ps;
    let u = _mm512_min_ps(_mm512_max_ps(u, set(-TANH_CLAMP)), set(TANH_CLAMP));
    let s = _mm512_mul_ps(u, u);
    let (mut p, mut q) = (set(TANH_P[4]), set(TANH_Q[4]));
    for i in (0..4).rev() {
        p = _mm512_fmadd_ps(p, s, set(TANH_P[i]));
        q = _mm512_fmadd_ps(q, s, set(TANH_Q[i]));
    }
    let th = _mm512_div_ps(_mm512_mul_ps(u, p), q);
    _mm512_min_ps(_mm512_max_ps(th, set(-1.0)), set(1.0))
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

/// Bytes ahead of the range pass's reads that [`row_stats`] prefetches.
const RANGE_PREFETCH: usize = 2048;

/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn row_stats(x: &[f32]) -> Option<(f32, f32)> {
    // SAFETY: forwarded; `s` is not read.
    unsafe { row_stats_as::<false>(x, &[]) }
}

/// [`row_stats`] of `x[i] * s[i]` (see `RowOps::scaled`).
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
unsafe fn row_stats_scaled(x: &[f32], s: &[f32]) -> Option<(f32, f32)> {
    assert_eq!(x.len(), s.len());
    // SAFETY: forwarded; equal lengths.
    unsafe { row_stats_as::<true>(x, s) }
}

/// The running range of a row, as [`row_stats`] takes it, 16 lanes at a time.
///
/// Four independent (min, max) pairs: one pair would be a chain of dependent `vminps` (4
/// cycles each per 16 values), slower than the loads. min and max are exact and
/// order-independent, so the result is the definition's whatever the order of the vectors.
/// `v * 0 + flag` stays +-0 while every value is finite and becomes NaN (for good: NaN plus
/// anything is NaN) at the first NaN or infinity: one operation per vector where a compare into
/// a mask register and a move out of it would be two.
struct Range {
    lo: [__m512; 4],
    hi: [__m512; 4],
    flag: [__m512; 4],
}

impl Range {
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn new() -> Self {
        let zero = _mm512_setzero_ps();
        Range { lo: [zero; 4], hi: [zero; 4], flag: [zero; 4] }
    }

    /// Takes the 16 values of `v` into accumulator `u` (< 4). Lanes set to 0 (masked loads of
    /// a tail) are neutral: the range is widened to include 0 anyway, and 0 is finite.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn add(&mut self, u: usize, v: __m512) {
        self.lo[u] = _mm512_min_ps(self.lo[u], v);
        self.hi[u] = _mm512_max_ps(self.hi[u], v);
        self.flag[u] = _mm512_fmadd_ps(v, _mm512_setzero_ps(), self.flag[u]);
    }

    /// `(min, max)`, or `None` when a value was NaN or infinite.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish(self) -> Option<(f32, f32)> {
        let [l0, l1, l2, l3] = self.lo;
        let [h0, h1, h2, h3] = self.hi;
        let [f0, f1, f2, f3] = self.flag;
        let lo = _mm512_min_ps(_mm512_min_ps(l0, l1), _mm512_min_ps(l2, l3));
        let hi = _mm512_max_ps(_mm512_max_ps(h0, h1), _mm512_max_ps(h2, h3));
        let flag = _mm512_add_ps(_mm512_add_ps(f0, f1), _mm512_add_ps(f2, f3));
        let bad = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(flag, flag);
        let (l, h) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        (bad == 0).then_some((l, h))
    }
}

/// Prefetches the 4 lines after `x[j..j + 64]`'s, `RANGE_PREFETCH` bytes ahead: a range pass
/// over A coming from L3 or memory is bound by how fast lines arrive, and prefetching 2 KiB
/// ahead (into the next rows when they follow) made it 8-19% faster, interleaved. A prefetch
/// never faults; the address is made with wrapping_add.
#[inline(always)]
fn prefetch_range_ahead(x: &[f32], j: usize) {
    for l in 0..4 {
        let line = (x.as_ptr() as *const i8).wrapping_add(4 * (j + 16 * l) + RANGE_PREFETCH);
        // SAFETY: a prefetch is a hint that cannot fault; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line) };
    }
}

/// `SCALED`: the values are `x[i] * s[i]` (`s.len() == x.len()`), else `x[i]` (`s` unused).
///
/// # Safety
/// The CPU has AVX-512 F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn row_stats_as<const SCALED: bool>(x: &[f32], s: &[f32]) -> Option<(f32, f32)> {
    // SAFETY (whole body): AVX-512 F (the contract); every load is inside x (and s, of the
    // same length when SCALED); masked lanes are not read (no fault) and read as 0.
    unsafe {
        let mut range = Range::new();
        let mut j = 0;
        while j + 64 <= x.len() {
            prefetch_range_ahead(x, j);
            for u in 0..4 {
                let mut v = _mm512_loadu_ps(x.as_ptr().add(j + 16 * u));
                if SCALED {
                    v = _mm512_mul_ps(v, _mm512_loadu_ps(s.as_ptr().add(j + 16 * u)));
                }
                range.add(u, v);
            }
            j += 64;
        }
        while j < x.len() {
            let m = lane_mask(x.len() - j);
            let mut v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(j));
            if SCALED {
                // Masked lanes give 0 * 0.
                v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, s.as_ptr().add(j)));
            }
            range.add(0, v);
            j += 16;
        }
        range.finish()
    }
}

/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    if super::recip_scale_ok(scale) {
        // SAFETY: forwarded; the scale is inside the bounds.
        unsafe { quantize_row_as::<true, false, false>(x, &[], scale, zero_point, ty, out, &[]) };
    } else {
        // SAFETY: forwarded.
        unsafe { quantize_row_as::<false, false, false>(x, &[], scale, zero_point, ty, out, &[]) };
    }
}

/// [`quantize_row`] of `x[i] * s[i]` (see `RowOps::scaled`).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_scaled(x: &[f32], s: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    assert_eq!(x.len(), s.len());
    if super::recip_scale_ok(scale) {
        // SAFETY: forwarded; the scale is inside the bounds; equal lengths.
        unsafe { quantize_row_as::<true, true, false>(x, s, scale, zero_point, ty, out, &[]) };
    } else {
        // SAFETY: forwarded; equal lengths.
        unsafe { quantize_row_as::<false, true, false>(x, s, scale, zero_point, ty, out, &[]) };
    }
}

/// `RECIP`: divide by the reciprocal-and-correction method (see [`super::RECIP_SCALE_MIN`]), which
/// requires `scale` within its bounds; otherwise by `vdivps`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_row_as<const RECIP: bool, const SCALED: bool, const STATS: bool>(
    x: &[f32],
    s: &[f32],
    scale: f32,
    zero_point: i32,
    ty: ActType,
    out: &mut [u8],
    next: &[f32],
) -> Option<(f32, f32)> {
    assert_eq!(x.len(), out.len());
    assert!(!SCALED || s.len() == x.len());
    assert!(!STATS || (next.len() == x.len() && !SCALED));
    // STATS: the range of `next` as `row_stats` takes it, its loads interleaved with this
    // row's arithmetic.
    // SAFETY: AVX-512 F (the contract).
    let mut range = unsafe { Range::new() };
    let mut stats = |j: usize, u: usize, m: __mmask16| {
        // SAFETY: the lanes of m are inside `next` (masked lanes read as 0: neutral).
        unsafe { range.add(u, _mm512_maskz_loadu_ps(m, next.as_ptr().add(j))) };
    };
    // The value at j: x[j] (times s[j] when SCALED), 16 lanes, masked loads for tails.
    let load = |j: usize, m: __mmask16| {
        // SAFETY: lanes of m are inside x (and s, of the same length when SCALED).
        let v = unsafe { _mm512_maskz_loadu_ps(m, x.as_ptr().add(j)) };
        if SCALED {
            _mm512_mul_ps(v, unsafe { _mm512_maskz_loadu_ps(m, s.as_ptr().add(j)) })
        } else {
            v
        }
    };
    let sv = _mm512_set1_ps(scale);
    let yv = _mm512_set1_ps(1.0 / scale);
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
    // round_half_even(x / scale) as i32, as quantize_value (explicit rounding, whatever MXCSR
    // says), plus the zero point.
    let rounded = |v: __m512| {
        let quotient = if RECIP {
            let q = _mm512_mul_ps(v, yv);
            let r = _mm512_fnmadd_ps(q, sv, v); // x - q * scale, exact
            _mm512_fmadd_ps(r, yv, q)
        } else {
            _mm512_div_ps(v, sv)
        };
        let r = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(quotient);
        _mm512_add_epi32(r, addv)
    };
    // The stored value in an i32 lane: clamp(r + add, lo, hi) + bias (see quantize_value).
    let quantized = |v: __m512| _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(rounded(v), lov), hiv), bias);
    let mut j = 0;
    // 64 values per step: the i32 lanes are narrowed with two packing steps and put back in
    // order with one permutation. The packs saturate (i32 -> i16 -> u8), so for asymmetric
    // uint8 (bias 0, range 0..=255) they are the clamp and `rounded` suffices; |r| stays far
    // from the i32 limits since |x / scale| <= 255 for the values a scale was made from.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let asym = ty == ActType::AsymmetricU8;
    while j + 64 <= x.len() {
        if STATS {
            prefetch_range_ahead(next, j);
            for u in 0..4 {
                stats(j + 16 * u, u, 0xffff);
            }
        }
        // SAFETY: j + 64 <= x.len() == out.len().
        unsafe {
            let q: [__m512i; 4] = if asym {
                std::array::from_fn(|u| rounded(load(j + 16 * u, 0xffff)))
            } else {
                std::array::from_fn(|u| quantized(load(j + 16 * u, 0xffff)))
            };
            let w = _mm512_packus_epi16(_mm512_packs_epi32(q[0], q[1]), _mm512_packs_epi32(q[2], q[3]));
            _mm512_storeu_si512(out.as_mut_ptr().add(j) as *mut __m512i, _mm512_permutexvar_epi32(order, w));
        }
        j += 64;
    }
    while j < x.len() {
        let m = lane_mask(x.len() - j);
        if STATS {
            stats(j, 0, m);
        }
        // SAFETY: masked loads and stores touch only the lanes inside both slices.
        unsafe {
            let q = quantized(load(j, m));
            _mm_mask_storeu_epi8(out.as_mut_ptr().add(j) as *mut i8, m, _mm512_cvtepi32_epi8(q));
        }
        j += 16;
    }
    if !STATS {
        return None;
    }
    // SAFETY: AVX-512 F (the contract).
    unsafe { range.finish() }
}

/// [`RowOps::quantize_and_stats`]: `quantize_row(x, ..)` and `row_stats(next)` in one loop.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn quantize_and_stats(
    x: &[f32],
    scale: f32,
    zero_point: i32,
    ty: ActType,
    out: &mut [u8],
    next: &[f32],
) -> Option<(f32, f32)> {
    if super::recip_scale_ok(scale) {
        // SAFETY: forwarded; the scale is inside the bounds.
        unsafe { quantize_row_as::<true, false, true>(x, &[], scale, zero_point, ty, out, next) }
    } else {
        // SAFETY: forwarded.
        unsafe { quantize_row_as::<false, false, true>(x, &[], scale, zero_point, ty, out, next) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::activations::row_stats as row_stats_definition;

    fn have_avx512() -> bool {
        let ok = crate::isa::Isa::Avx512Vnni.is_supported();
        if !ok {
            eprintln!("SKIPPED: AVX-512 row operations: this CPU lacks AVX-512 VNNI");
        }
        ok
    }

    /// The reciprocal-and-correction quotient rounds exactly like the division (see
    /// `kernels::tests::check_rounds_like_the_division`).
    #[test]
    fn quantize_row_rounds_like_the_division() {
        if !have_avx512() {
            return;
        }
        crate::kernels::tests::check_rounds_like_the_division(|x, s, zp, ty, out| {
            // SAFETY: AVX-512 checked above; equal lengths.
            unsafe { quantize_row(x, s, zp, ty, out) }
        });
    }

    /// Every quotient near the hardest scale (see `check_every_quotient_like_the_division`).
    #[test]
    fn quantize_row_rounds_like_the_division_everywhere() {
        if !have_avx512() {
            return;
        }
        crate::kernels::tests::check_every_quotient_like_the_division(|x, s, zp, ty, out| {
            // SAFETY: AVX-512 checked above; equal lengths.
            unsafe { quantize_row(x, s, zp, ty, out) }
        });
    }

    #[test]
    fn row_stats_match_the_definition() {
        if !have_avx512() {
            return;
        }
        for len in 0..200usize {
            let x: Vec<f32> = (0..len).map(|i| ((i * 7919) % 201) as f32 - 100.0 + 0.25 * (len % 3) as f32).collect();
            // SAFETY: AVX-512 checked above.
            assert_eq!(unsafe { row_stats(&x) }, row_stats_definition(&x), "len {len}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for pos in [0, len / 2, len.saturating_sub(1)] {
                    if pos < len {
                        let mut y = x.clone();
                        y[pos] = bad;
                        // SAFETY: AVX-512 checked above.
                        assert_eq!(unsafe { row_stats(&y) }, None, "len {len} pos {pos} {bad}");
                    }
                }
            }
            // Extreme finite values are not mistaken for non-finite ones.
            for extreme in [f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-45] {
                if len > 0 {
                    let mut y = x.clone();
                    y[len / 2] = extreme;
                    // SAFETY: AVX-512 checked above.
                    assert_eq!(unsafe { row_stats(&y) }, row_stats_definition(&y), "len {len} {extreme}");
                }
            }
        }
    }
}
