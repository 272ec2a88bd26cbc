//! The kernel table: one entry per ISA, carrying the micro-kernel, the weight packing routine
//! that feeds it and the tile geometry they share, so packing and kernel cannot drift apart.
//!
//! Kernel names follow `gemm_u8s8_i32_{MR}x{NR}c{KR}__{isa}`:
//! `u8s8` = unsigned 8-bit activations times signed 8-bit weights, `i32` = exact 32-bit
//! integer accumulators (the f32 epilogue is shared by all kernels, see `gemm`),
//! `MRxNR` = rows of A by columns of W computed per call, `cKR` = K is consumed in groups of KR
//! consecutive values per column (the width of one dot-product instruction lane),
//! `__isa` = the instruction set.

pub use crate::gemm::Epilogue;
use crate::isa::Isa;
use crate::quant::ActType;

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512_vnni;
#[cfg(target_arch = "x86_64")]
pub mod avx_vnni;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod scalar;

/// A micro-kernel: `C[i][j] = sum_{k < kp} (A[i][k] - a_shift) * B[k][j]` for `i < mr`,
/// `j < NR`, in wrapping `i32` arithmetic, delivered as `out` asks: the raw accumulators, or the f32
/// epilogue applied in registers and written straight to Y.
///
/// # Safety
/// - The CPU supports the kernel's ISA (guaranteed by [`crate::isa::resolve`] before any
///   packed weights exist for it).
/// - `1 <= mr <= stream_mr` (see [`Kernel::stream_mr`]; `MR` for most kernels).
/// - `a` points to `mr` rows of `kp * a_bytes` readable bytes, row `i` at `a + i * a_stride`.
/// - `b` points to one packed panel: `kp * NR` readable bytes in the kernel's layout.
/// - `out` satisfies the requirements documented on [`TileOut`] for this `mr`.
/// - `kp` is a positive multiple of `KR` (K is never 0).
pub type MicroKernel = unsafe fn(mr: usize, kp: usize, a: *const u8, a_stride: usize, b: *const i8, out: &TileOut<'_>);

/// Where a micro-kernel delivers its tile.
#[derive(Debug)]
pub enum TileOut<'a> {
    /// The raw accumulators, `mr x NR` row-major at this pointer: rows `i < mr` are written
    /// (overwritten, not accumulated), the others left as they were. Must have room for
    /// `max(mr, MR) * NR` values.
    I32(*mut i32),
    /// The f32 epilogue, written to Y.
    F32(&'a F32Tile<'a>),
}

/// The f32 epilogue of one tile: `y[i][j] = f32(acc - za[i] * col_sums[j]) * (sa[i] *
/// scales[j]) (+ bias[j]) (then the activation)`, the definition being
/// [`crate::gemm::dequantize_row`], then `+ residual[i][j]` (one f32 addition) when a residual is
/// given.
/// `za` and `sa` have `mr` values; `col_sums`, `scales` and `bias` have `cols <= NR` values;
/// row `i` of the output is `cols` writable floats at `y + i * ldy`, touched by no one else
/// (with `blocks16`: each run of 16 of them at its own place, see there);
/// row `i` of the residual, `cols` readable floats at `r + i * ldr`.
#[derive(Debug)]
pub struct F32Tile<'a> {
    pub za: &'a [i32],
    pub sa: &'a [f32],
    pub col_sums: &'a [i32],
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Epilogue,
    pub y: *mut f32,
    pub ldy: usize,
    /// Columns in runs of 16, each run at its own place: column `j` of row `i` goes to
    /// `blocks16[j / 16] + i * ldy + j % 16` (`y` is `blocks16[0]`). The attention-head output
    /// layout with heads of a multiple of 16 values, for tiles wider than 16 columns that
    /// straddle heads. Never given with a residual.
    pub blocks16: Option<[*mut f32; MAX_BLOCKS16]>,
    /// `(r, ldr)`: the residual's rows, added after the activation.
    pub residual: Option<(*const f32, usize)>,
    /// Weights the driver will need soon (the next panel or block), which a kernel may ask to
    /// be brought into L2 a line at a time while it computes: a hint, never read.
    pub prefetch_l2: &'a [i8],
    /// This tile is the only row tile that meets its panels (decoding, M up to one tile), so
    /// the weights stream through it once, most likely from memory: a kernel may ask for the
    /// lines of its panel stream far ahead into L2 (past the panel's end too: the driver's
    /// next panel follows it in memory). A hint, never read.
    pub stream_l2: bool,
}

/// How far ahead in its weight stream a kernel asks for lines to be brought into L2 when the
/// tile streams them alone ([`F32Tile::stream_l2`]), in bytes. The kernels' L1 prefetch (4 KiB
/// ahead) alone keeps too few lines in flight to pull weights from DRAM at the core's rate.
/// Medians of alternating calls, 1 thread, weights from DRAM (48 copies of the matrix, 768
/// MiB), against the L1 prefetch alone: AVX-512 kernel (one line per K group of three weight
/// lines) 1x4096x4096 0.93-0.95x the time, 4x4096x4096 0.89-0.91x, 8x4096x4096 0.87x, 2
/// threads 0.91x and 0.82x; AVX-VNNI (every line) 1x 0.94x, 4x and 6x 0.85x; AVX2 exact 1x
/// 0.86-0.93x, 7-bit weights 1x 0.82x, 4x 0.90x. With the matrix in L3 (one copy) the extra
/// requests cost 0-3% (AVX2 at M = 1: 3-5%); real decoding reads each matrix once per token,
/// from DRAM. For AVX-512, 32 and 64 KiB ahead measured the same as 16; 8 KiB, and a line for
/// each weight line rather than each group, cost 3-5% with the weights in L3.
#[cfg(target_arch = "x86_64")]
pub(crate) const STREAM_L2_AHEAD: usize = 16384;

/// Whether `out` is an f32 tile whose weights stream through it alone ([`F32Tile::stream_l2`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn streams_l2(out: &TileOut<'_>) -> bool {
    matches!(out, TileOut::F32(t) if t.stream_l2)
}

/// Runs of 16 columns in a tile with [`F32Tile::blocks16`] (the widest panel, AVX-512's, is 48).
pub const MAX_BLOCKS16: usize = 3;

impl F32Tile<'_> {
    /// Number of valid columns.
    pub fn cols(&self) -> usize {
        self.col_sums.len()
    }

    /// The epilogue inputs of row `i` (all columns).
    pub fn row(&self, i: usize) -> DequantRow<'_> {
        DequantRow {
            za: self.za[i],
            sa: self.sa[i],
            col_sums: self.col_sums,
            scales: self.scales,
            bias: self.bias,
            act: self.act,
        }
    }

    /// Output row `i` (a tile without [`Self::blocks16`]).
    ///
    /// # Safety
    /// The contract of the struct: row `i` is writable and not aliased.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn y_row(&self, i: usize) -> &mut [f32] {
        debug_assert!(self.blocks16.is_none());
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.y.add(i * self.ldy), self.cols()) }
    }

    /// Where column `16 * b` of row `i` goes.
    ///
    /// # Safety
    /// The contract of the struct; `16 * b < cols`.
    pub unsafe fn block_ptr(&self, i: usize, b: usize) -> *mut f32 {
        // SAFETY: per the contract, in bounds.
        unsafe {
            match &self.blocks16 {
                Some(p) => p[b].add(i * self.ldy),
                None => self.y.add(i * self.ldy + 16 * b),
            }
        }
    }

    /// The rows from `r` on, as a tile of their own (for a kernel that hands part of its
    /// rows to other code); without the L2 hint, which the caller's own loop issues.
    ///
    /// # Safety
    /// `r` is below the tile's rows (so row `r` of the output and of the residual lies inside
    /// the tile).
    pub unsafe fn rows_from(&self, r: usize) -> F32Tile<'_> {
        // SAFETY: per the contract, row r is inside the tile.
        unsafe {
            F32Tile {
                za: &self.za[r..],
                sa: &self.sa[r..],
                col_sums: self.col_sums,
                scales: self.scales,
                bias: self.bias,
                act: self.act,
                y: self.y.add(r * self.ldy),
                ldy: self.ldy,
                blocks16: self.blocks16.map(|p| p.map(|q| q.wrapping_add(r * self.ldy))),
                residual: self.residual.map(|(p, ld)| (p.add(r * ld), ld)),
                prefetch_l2: &[],
                stream_l2: self.stream_l2,
            }
        }
    }

    /// Writes row `i` from its `NR` accumulators (`acc.len() >= cols`) with the given row
    /// operations (the portable path, used for tails).
    ///
    /// # Safety
    /// As [`Self::y_row`] (or with `blocks16`, the places it names); `ops` belong to an ISA the
    /// CPU supports.
    pub unsafe fn write_row(&self, ops: &RowOps, i: usize, acc: &[i32]) {
        let cols = self.cols();
        if self.blocks16.is_none() {
            // SAFETY: per the contract.
            return unsafe { (ops.dequantize_row)(&self.row(i), &acc[..cols], self.y_row(i)) };
        }
        let mut row = [0f32; 16 * MAX_BLOCKS16];
        // SAFETY: the CPU runs `ops`; `row` has room for cols <= 16 * MAX_BLOCKS16 values.
        unsafe { (ops.dequantize_row)(&self.row(i), &acc[..cols], &mut row[..cols]) };
        for (b, run) in row[..cols].chunks(16).enumerate() {
            // SAFETY: the run's place, per the contract of blocks16.
            unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), self.block_ptr(i, b), run.len()) };
        }
    }

    /// Adds the residual (if any) to the first `rows` rows already written: one f32 addition
    /// per element (the portable form; each ISA's kernel has its own, with the same result).
    /// Kept out of the kernels' epilogue functions on purpose: growing those stops LLVM from
    /// inlining them into the K loop, whose accumulators then live in memory (3x slower).
    ///
    /// # Safety
    /// As [`Self::y_row`], for `rows <= ` the tile's rows.
    pub unsafe fn add_residual(&self, rows: usize) {
        if let Some((r, ldr)) = self.residual {
            for i in 0..rows {
                // SAFETY: per the contract: row i of y is ours, row i of the residual readable.
                let (y, r) = unsafe { (self.y_row(i), std::slice::from_raw_parts(r.add(i * ldr), self.cols())) };
                y.iter_mut().zip(r).for_each(|(y, r)| *y += *r);
            }
        }
    }
}

/// The O(M*K) and O(M*N) work around the micro-kernel, vectorized per ISA. Each function
/// computes exactly what its scalar definition computes (same operations, same order), so
/// every ISA produces the same bits.
///
/// # Safety (all three)
/// The CPU supports the ISA of the kernel-table entry that holds them.
#[derive(Debug)]
pub struct RowOps {
    /// `(min(0, min x), max(0, max x))` of a row, or `None` if it holds a NaN or infinity.
    /// Definition: [`crate::quant::activations::row_stats`].
    pub row_stats: unsafe fn(x: &[f32]) -> Option<(f32, f32)>,
    /// Quantizes a row with `scale` (`> 0`) and zero point into the kernel's activation
    /// format: `a_bytes` bytes per value (1: the `u8` itself; 2: the `u8` zero-extended to a
    /// little-endian `u16`), so `out.len() == x.len() * a_bytes`.
    /// Definition: [`crate::quant::activations::quantize_row`], for values inside the range
    /// the scale and zero point were made from (`|x / scale| <= 255`, as the GEMM's own
    /// ranges guarantee); the SIMD forms leave the clamp of values far outside it to
    /// saturating conversions, which may differ from the definition there.
    pub quantize_row: unsafe fn(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]),
    /// The f32 epilogue of one output row. Definition: [`crate::gemm::dequantize_row`].
    pub dequantize_row: unsafe fn(row: &DequantRow<'_>, acc: &[i32], out: &mut [f32]),
    /// `row_stats` and `quantize_row` of the row `x[i] * s[i]` (smoothed activations: one f32
    /// multiplication per element, then exactly what the two functions do), without writing the
    /// products out first; `None`: the driver multiplies into a buffer and calls the plain ones
    /// (the same values).
    pub scaled: Option<&'static ScaledRowOps>,
    /// `quantize_row(cur, ..)` and `row_stats(next)` in one loop (`cur` and `next` of the same
    /// length, `out` of as many values as `quantize_row` writes), so that the reads of the next
    /// row overlap the arithmetic of this one; `None`: the driver calls the two functions.
    pub quantize_and_stats: Option<QuantizeAndStats>,
}

/// See [`RowOps::quantize_and_stats`]: `(cur, scale, zero_point, ty, out, next)`, returning
/// `row_stats(next)`.
pub type QuantizeAndStats = unsafe fn(&[f32], f32, i32, ActType, &mut [u8], &[f32]) -> Option<(f32, f32)>;

/// See [`RowOps::scaled`]. `s.len() == x.len()`.
///
/// # Safety (both)
/// The CPU supports the ISA of the kernel-table entry that holds them.
#[derive(Debug)]
pub struct ScaledRowOps {
    pub row_stats: ScaledRowStats,
    pub quantize_row: ScaledQuantizeRow,
}

/// `row_stats(x * s)`.
pub type ScaledRowStats = unsafe fn(x: &[f32], s: &[f32]) -> Option<(f32, f32)>;
/// `quantize_row(x * s, scale, zero_point, ty, out)`.
pub type ScaledQuantizeRow = unsafe fn(x: &[f32], s: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]);

/// The per-row and per-column inputs of the epilogue for one output row segment: all column
/// slices have the length of the segment.
#[derive(Debug)]
pub struct DequantRow<'a> {
    pub za: i32,
    pub sa: f32,
    pub col_sums: &'a [i32],
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub act: Epilogue,
}

/// Packs canonical `[N][K]` row-major int8 weights into this kernel's layout.
/// `out` has exactly `packed_len(n, k)` bytes.
pub type PackFn = fn(q: &[i8], n: usize, k: usize, out: &mut [i8]);

/// Inverse of [`PackFn`]: recovers canonical `[N][K]` weights (`q.len() == n * k`).
pub type UnpackFn = fn(packed: &[i8], n: usize, k: usize, q: &mut [i8]);

/// One kernel-table entry.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub isa: Isa,
    /// Full kernel name (see the module documentation).
    pub name: &'static str,
    /// Rows of A per micro-kernel call.
    pub mr: usize,
    /// Columns of W per packed panel and per micro-kernel call.
    pub nr: usize,
    /// K values per dot-product group; K is padded to a multiple of it (with zero weights).
    /// For AMX, the depth of one tile step (64), whose panels hold groups of 4 inside.
    pub kr: usize,
    /// Bytes per quantized activation in the A buffer the micro-kernel reads: 1 (`u8`) or 2
    /// (`u8` zero-extended to `u16`, for kernels that multiply 16-bit lanes).
    pub a_bytes: usize,
    /// The kernel's raw accumulator is `sum (qa - a_shift) * qw` (0, or 128 for kernels built
    /// on a signed x signed instruction such as `sdot`, which flip the sign bit of `qa`).
    /// Consumers use the zero point `za - a_shift`, which gives the same exact result.
    pub a_shift: i32,
    /// Version of the in-memory packed layout of this entry; bumped whenever `pack` changes.
    pub layout_version: u32,
    pub ukernel: MicroKernel,
    pub pack: PackFn,
    pub unpack: UnpackFn,
    pub ops: &'static RowOps,
    /// `None`: exact for every int8 weight. `Some(limit)`: exact only for weights whose K
    /// pairs `(2j, 2j + 1)` of every output channel have `|w[2j]| + |w[2j + 1]| <= limit`
    /// (kernels whose 16-bit intermediate sums hold `255 * limit`); packing refuses other
    /// weights for such a kernel, so it never runs on them.
    pub weight_pair_limit: Option<u32>,
    /// A faster entry of the same ISA for weights within its `weight_pair_limit`, which
    /// packing picks instead of this one when the weights allow it (the results are the same
    /// bits: both compute the exact integer products).
    pub narrow: Option<&'static Kernel>,
    /// The driver gives this kernel its rows in full tiles of `mr`, the last tile holding the
    /// rest (instead of spreading them evenly over the tiles): for kernels much faster on a
    /// full tile than on a partial one (AMX, whose row tails run on AVX-512).
    pub full_tiles: bool,
    /// The most rows one call takes (`mr` or more): when M is at most this, the driver runs a
    /// single row tile of M rows that streams the weights once (decoding and small batches).
    /// The AVX-512 kernel takes up to `2 * mr`, as two row tiles that meet each chunk of the
    /// panel's K range together (the chunk then comes from memory once and from L1 for the
    /// second); other kernels `mr`.
    pub stream_mr: usize,
    /// Per-thread processor state the micro-kernel sets up by itself on first use (AMX: the
    /// tile configuration), which the driver saves before a thread's first tile and restores
    /// after its last (see [`ThreadState`]); `None` for kernels that change no such state.
    pub thread_state: Option<&'static ThreadState>,
}

/// Per-thread processor state a micro-kernel changes: the AMX tile configuration. The
/// micro-kernel loads its own configuration whenever the current one differs (so it is correct
/// however it is called); the driver brackets each thread's share of a GEMM with `save` and
/// `restore`, so that code sharing the thread (another library's AMX kernels, which may keep
/// their configuration loaded between calls) finds the state it left, and a thread that used
/// no tiles before gives them back to the operating system.
///
/// # Safety (both)
/// The CPU supports the ISA of the kernel-table entry that holds them.
#[derive(Debug)]
pub struct ThreadState {
    pub save: unsafe fn() -> [u8; 64],
    pub restore: unsafe fn(&[u8; 64]),
}

/// Saves a kernel's per-thread state on creation and restores it on drop (see
/// [`ThreadState`]); does nothing for kernels without such state.
pub(crate) struct ThreadStateGuard {
    state: Option<(&'static ThreadState, [u8; 64])>,
}

impl ThreadStateGuard {
    /// # Safety
    /// The CPU supports `kern`'s ISA (true wherever packed weights for it exist).
    pub(crate) unsafe fn new(kern: &Kernel) -> Self {
        // SAFETY: per the contract.
        ThreadStateGuard { state: kern.thread_state.map(|s| (s, unsafe { (s.save)() })) }
    }
}

impl Drop for ThreadStateGuard {
    fn drop(&mut self) {
        if let Some((s, saved)) = &self.state {
            // SAFETY: the state was saved by the same entry, on a CPU that runs it.
            unsafe { (s.restore)(saved) }
        }
    }
}

impl Kernel {
    /// Whether this kernel computes exact results for the canonical `[N][K]` weights `q`
    /// (see [`Self::weight_pair_limit`]).
    pub fn accepts_weights(&self, q: &[i8], k: usize) -> bool {
        match self.weight_pair_limit {
            None => true,
            Some(limit) => pairs_within(q, k, limit),
        }
    }

    /// K rounded up to a multiple of KR.
    pub fn padded_k(&self, k: usize) -> usize {
        k.div_ceil(self.kr) * self.kr
    }
    /// N rounded up to a multiple of NR.
    pub fn padded_n(&self, n: usize) -> usize {
        n.div_ceil(self.nr) * self.nr
    }
    /// Bytes of packed weights for an `n x k` matrix, or `None` on overflow.
    pub fn packed_len(&self, n: usize, k: usize) -> Option<usize> {
        self.padded_n(n).checked_mul(self.padded_k(k))
    }
}

/// All kernels compiled into this build. Tests and benchmarks iterate over this table, so a
/// new entry is tested and benchmarked without anyone having to remember it.
pub static KERNELS: &[Kernel] = &[
    scalar::KERNEL,
    #[cfg(target_arch = "aarch64")]
    neon::KERNEL,
    #[cfg(target_arch = "aarch64")]
    neon::KERNEL_DOTPROD,
    #[cfg(target_arch = "aarch64")]
    neon::KERNEL_I8MM,
    #[cfg(target_arch = "x86_64")]
    avx2::KERNEL,
    #[cfg(target_arch = "x86_64")]
    avx2::KERNEL_NARROW,
    #[cfg(target_arch = "x86_64")]
    avx_vnni::KERNEL,
    #[cfg(target_arch = "x86_64")]
    avx512_vnni::KERNEL,
    #[cfg(target_arch = "x86_64")]
    amx::KERNEL,
];

/// Scales for which the x86 row operations (`quantize_row`) replace the division `x / scale`
/// by a multiplication with the reciprocal and one correction step (Markstein): with
/// `y = RN(1 / scale)`,
/// `q = RN(x * y)` is within about one ulp of `x / scale`, the remainder `r = x - q * scale` is
/// exact in a fused multiply-add, and `RN(q + r * y)` is the correctly rounded quotient, i.e.
/// the same value as the division, provided nothing underflows or overflows. Here `|x / scale|
/// <= 255` (x lies in the range the scale was made from); inside these bounds a remainder that
/// would be subnormal is too small to move `q` (and flush-to-zero cannot change the result),
/// and a quotient below 0.25 rounds to 0 either way. Outside them, the division is used.
///
/// Evidence: the quotient bits of both methods were compared (offline, AVX-512) on every f32
/// `x` with `x / scale` in [1/4, 256] for 4,006 scales, half of them the scales whose
/// reciprocal is worst rounded among 2 million candidates: 336 billion quotients, no
/// difference. The tests compare the row operations with the definition on every such value
/// for two scales (one chosen the same way), and on ties and their neighbours in every binade.
#[cfg(target_arch = "x86_64")]
pub(crate) const RECIP_SCALE_MIN: f32 = 8.673_617e-19; // 2^-60
#[cfg(target_arch = "x86_64")]
pub(crate) const RECIP_SCALE_MAX: f32 = 1.152_921_5e18; // 2^60

/// Whether the row operations may divide by `scale` with the reciprocal and a correction
/// (see [`RECIP_SCALE_MIN`]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn recip_scale_ok(scale: f32) -> bool {
    (RECIP_SCALE_MIN..=RECIP_SCALE_MAX).contains(&scale)
}

/// The kernel that stands in for `isa` where this CPU cannot run that ISA's kernel but can
/// run the same code in another encoding: the AVX-VNNI kernel's EVEX twin
/// ([`avx_vnni::evex_twin`]) on AVX-512 VNNI CPUs without AVX-VNNI. Only for measuring the
/// kernel's code (`dynq bench` and `dynq peak` with `--isa avx_vnni`); never selected for
/// real work, and `None` wherever the ISA itself runs.
pub fn stand_in_for(isa: Isa) -> Option<&'static Kernel> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::AvxVnni && !isa.is_supported() && crate::isa::resolve(Isa::Avx512Vnni).is_ok() {
        return Some(&avx_vnni::EVEX_TWIN);
    }
    let _ = isa;
    None
}

/// The table entry for an ISA, if this build has one: the entry for every int8 weight (an ISA
/// may also have a narrow-weight entry, [`Kernel::narrow`], which packing picks by itself).
pub fn kernel_for(isa: Isa) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.isa == isa && k.weight_pair_limit.is_none())
}

/// Whether every K pair `(2j, 2j + 1)` of every row of the canonical `[N][K]` weights `q` has
/// `|q[2j]| + |q[2j + 1]| <= limit` (an odd K's last value pairs with the zero padding).
pub fn pairs_within(q: &[i8], k: usize, limit: u32) -> bool {
    q.chunks_exact(k.max(1))
        .all(|row| row.chunks(2).all(|p| p.iter().map(|&v| v.unsigned_abs() as u32).sum::<u32>() <= limit))
}

/// The standard "panel" layout shared by the dot-product kernels: columns are grouped in
/// panels of NR; inside a panel, K advances in groups of KR, and each group stores, for each of
/// the NR columns, its KR consecutive K values:
///
/// ```text
/// offset(n, k) = (n / NR) * (kp * NR) + (k / KR) * (NR * KR) + (n % NR) * KR + (k % KR)
/// ```
///
/// Padding columns (n >= N) and padding depths (k >= K) hold 0, so they add nothing.
pub(crate) fn pack_panels<const NR: usize, const KR: usize>(q: &[i8], n: usize, k: usize, out: &mut [i8]) {
    pack_panels_to::<NR, KR>(q, n, k, k.div_ceil(KR) * KR, out)
}

/// [`pack_panels`] with the depth padded to `kp` (a multiple of KR, at least K): the AMX
/// kernel's panels, whose depth is a multiple of its 64-deep tile step.
pub(crate) fn pack_panels_to<const NR: usize, const KR: usize>(
    q: &[i8],
    n: usize,
    k: usize,
    kp: usize,
    out: &mut [i8],
) {
    debug_assert!(kp >= k && kp.is_multiple_of(KR));
    debug_assert_eq!(out.len(), n.div_ceil(NR) * NR * kp);
    debug_assert_eq!(q.len(), n * k);
    out.fill(0);
    for (nn, row) in q.chunks_exact(k.max(1)).enumerate().take(n) {
        let (p, j) = (nn / NR, nn % NR);
        let panel = &mut out[p * kp * NR..(p + 1) * kp * NR];
        for (kk, &v) in row.iter().enumerate() {
            panel[(kk / KR) * NR * KR + j * KR + kk % KR] = v;
        }
    }
}

/// Inverse of [`pack_panels`].
pub(crate) fn unpack_panels<const NR: usize, const KR: usize>(packed: &[i8], n: usize, k: usize, q: &mut [i8]) {
    unpack_panels_from::<NR, KR>(packed, n, k, k.div_ceil(KR) * KR, q)
}

/// Inverse of [`pack_panels_to`].
pub(crate) fn unpack_panels_from<const NR: usize, const KR: usize>(
    packed: &[i8],
    n: usize,
    k: usize,
    kp: usize,
    q: &mut [i8],
) {
    debug_assert_eq!(q.len(), n * k);
    for nn in 0..n {
        let (p, j) = (nn / NR, nn % NR);
        let panel = &packed[p * kp * NR..(p + 1) * kp * NR];
        for kk in 0..k {
            q[nn * k + kk] = panel[(kk / KR) * NR * KR + j * KR + kk % KR];
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Checks a SIMD `quantize_row` against the definition (a division per value) where the
    /// reciprocal-and-correction quotient could round differently: scales of every binade
    /// inside the bounds and just outside them, values on rounding ties (`(n + 1/2) * scale`,
    /// rounded to f32) and their neighbours, and values spread over the whole range, in both
    /// activation schemes.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn check_rounds_like_the_division(quantize_row: impl Fn(&[f32], f32, i32, ActType, &mut [u8])) {
        use crate::quant::activations::quantize_row as definition;
        let mut seed = 0x2545_F491u32;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let mut scales = vec![
            RECIP_SCALE_MIN,
            RECIP_SCALE_MAX,
            RECIP_SCALE_MIN.next_down(),
            RECIP_SCALE_MAX.next_up(),
            1.0e-45,
            3.0e36,
            1.0 / 255.0,
        ];
        for e in -64..=64 {
            for _ in 0..6 {
                let mantissa = 1.0 + (rnd() >> 8) as f32 / (1u32 << 24) as f32;
                scales.push(mantissa * 2f32.powi(e));
            }
        }
        let mut checked = 0usize;
        for &s in &scales {
            let mut x = Vec::with_capacity(4 * 520);
            for n in -260..260 {
                let t = (n as f32 + 0.5) * s;
                x.extend([t, t.next_up(), t.next_down()]);
                x.push(s * ((rnd() >> 8) as f32 / (1u32 << 24) as f32 * 520.0 - 260.0));
            }
            x.retain(|v| v.is_finite());
            for (ty, zp) in [(ActType::AsymmetricU8, 128), (ActType::AsymmetricU8, 3), (ActType::SymmetricI8, 128)] {
                let mut want = vec![0u8; x.len()];
                definition(&x, s, zp, ty, &mut want);
                let mut got = vec![0u8; x.len()];
                quantize_row(&x, s, zp, ty, &mut got);
                if let Some(i) = (0..x.len()).find(|&i| got[i] != want[i]) {
                    panic!("scale {s:e} x {:e} ({ty:?}, zp {zp}): got {} want {}", x[i], got[i], want[i]);
                }
                checked += x.len();
            }
        }
        assert!(checked > 1_000_000, "{checked}");
    }

    /// Checks a SIMD `quantize_row` against the definition on every f32 whose quotient by the
    /// scale lies in [1/4, 256] (below 1/4 everything rounds to 0; above, the clamp), positive
    /// and negative, for the scale with the worst-rounded reciprocal among 20,000 candidates
    /// (`|1 - s * RN(1/s)|` largest: the reciprocal-and-correction quotient's hardest case) and
    /// for 1/255: about 170 million values each. (Offline, the quotients themselves were
    /// compared bit for bit on every such value for 4,006 scales, half of them chosen this way
    /// from 2 million candidates: 336 billion quotients, no difference.)
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn check_every_quotient_like_the_division(quantize_row: impl Fn(&[f32], f32, i32, ActType, &mut [u8])) {
        use crate::quant::activations::quantize_row as definition;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut worst = (0f64, 1f32);
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let s = (1.0 + (seed >> 40) as f32 / (1u64 << 24) as f32) * 2f32.powi((seed % 24) as i32 - 16);
            let err = (1.0 - s as f64 * (1.0 / s) as f64).abs();
            if err > worst.0 {
                worst = (err, s);
            }
        }
        const CHUNK: usize = 1 << 20;
        let (mut x, mut want, mut got) = (Vec::with_capacity(CHUNK), vec![0u8; CHUNK], vec![0u8; CHUNK]);
        for s in [worst.1, 1.0 / 255.0] {
            // Asymmetric u8 with zero point 0 (positive x) or 255 (negative x): no clamp inside
            // the range, so every rounding shows.
            for (sign, zp) in [(1.0f32, 0), (-1.0, 255)] {
                let (lo, hi) = ((0.25 * s).to_bits(), (256.0 * s).to_bits());
                let mut bits = lo;
                while bits <= hi {
                    x.clear();
                    x.extend((bits..=hi).take(CHUNK).map(|b| sign * f32::from_bits(b)));
                    bits += x.len() as u32;
                    let n = x.len();
                    definition(&x, s, zp, ActType::AsymmetricU8, &mut want[..n]);
                    quantize_row(&x, s, zp, ActType::AsymmetricU8, &mut got[..n]);
                    if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                        panic!("scale {s:e} x {:e}: got {} want {}", x[i], got[i], want[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn pack_unpack_round_trip_all_kernels() {
        for kern in KERNELS {
            for (n, k) in [(1, 1), (3, 5), (17, 33), (kern.nr + 1, kern.kr * 2 + 1)] {
                let q: Vec<i8> = (0..n * k).map(|i| (i * 37 % 255) as i8).collect();
                let mut packed = vec![0i8; kern.packed_len(n, k).unwrap()];
                (kern.pack)(&q, n, k, &mut packed);
                let mut back = vec![0i8; n * k];
                (kern.unpack)(&packed, n, k, &mut back);
                assert_eq!(q, back, "{} n={n} k={k}", kern.name);
            }
        }
    }

    /// Every kernel's scaled row operations (`RowOps::scaled`, where the CPU has the ISA) give
    /// what its plain ones give on the products `x[i] * s[i]` computed apart in f32: ranges,
    /// non-finite products (a finite value whose product overflows too) wherever they are, and
    /// the bytes in the kernel's activation format, for lengths around the vector widths.
    #[test]
    fn scaled_row_ops_equal_the_plain_ones_on_the_products() {
        use crate::quant::activations::asymmetric_params;
        let mut tested = 0;
        for kern in KERNELS {
            let Some(scaled) = kern.ops.scaled else { continue };
            if !kern.isa.is_supported() {
                eprintln!("SKIPPED: scaled row operations of {}: this CPU lacks {}", kern.name, kern.isa);
                continue;
            }
            let mut seed = 0x2545_F491u32;
            let mut rnd = || {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed >> 8) as f32 / (1u32 << 24) as f32
            };
            for len in (0..140usize).chain([383, 384, 385, 1536]) {
                let x: Vec<f32> = (0..len).map(|_| (rnd() - 0.3) * 20.0).collect();
                let f: Vec<f32> = (0..len).map(|_| 10f32.powf(rnd() * 2.0 - 1.0)).collect();
                let prod: Vec<f32> = x.iter().zip(&f).map(|(a, b)| a * b).collect();
                // SAFETY (all calls): the CPU has the kernel's ISA (checked above); equal lengths.
                let (got, want) = unsafe { ((scaled.row_stats)(&x, &f), (kern.ops.row_stats)(&prod)) };
                assert_eq!(got, want, "{} len {len}", kern.name);
                if let Some((lo, hi)) = want {
                    let p = asymmetric_params(lo, hi);
                    if p.scale > 0.0 {
                        for ty in [ActType::AsymmetricU8, ActType::SymmetricI8] {
                            let (mut a, mut b) = (vec![0u8; len * kern.a_bytes], vec![0u8; len * kern.a_bytes]);
                            unsafe {
                                (scaled.quantize_row)(&x, &f, p.scale, p.zero_point, ty, &mut a);
                                (kern.ops.quantize_row)(&prod, p.scale, p.zero_point, ty, &mut b);
                            }
                            assert_eq!(a, b, "{} len {len} {ty:?}", kern.name);
                        }
                    }
                }
                for pos in [0, len / 2, len.saturating_sub(1)] {
                    if pos < len {
                        for (bad, fac) in [(f32::NAN, 1.0), (f32::INFINITY, 1.0), (3e38, 4.0)] {
                            let (mut y, mut g) = (x.clone(), f.clone());
                            y[pos] = bad;
                            g[pos] = fac;
                            let got = unsafe { (scaled.row_stats)(&y, &g) };
                            assert_eq!(got, None, "{} len {len} {bad} * {fac} at {pos}", kern.name);
                        }
                    }
                }
            }
            tested += 1;
        }
        eprintln!("scaled row operations checked for {tested} kernels");
    }
}
