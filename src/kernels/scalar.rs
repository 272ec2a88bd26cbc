//! Portable kernel: plain Rust, runs on every CPU, and the baseline the SIMD kernels are
//! tested against (beside the naive reference in `crate::reference`).

use super::{pack_panels, unpack_panels, DequantRow, Kernel, RowOps, TileOut};
use crate::isa::Isa;
use crate::quant::ActType;

const MR: usize = 4;
const NR: usize = 8;
const KR: usize = 4;

/// The scalar table entry.
pub const KERNEL: Kernel = Kernel {
    isa: Isa::Scalar,
    name: "gemm_u8s8_i32_4x8c4__scalar",
    mr: MR,
    nr: NR,
    kr: KR,
    a_bytes: 1,
    a_shift: 0,
    layout_version: 1,
    ukernel: gemm_u8s8_i32_4x8c4__scalar,
    pack: pack_panels::<NR, KR>,
    unpack: unpack_panels::<NR, KR>,
    ops: &OPS,
    weight_pair_limit: None,
    narrow: None,
    full_tiles: false,
    stream_mr: MR,
    thread_state: None,
};

/// The scalar row operations: the definitions themselves.
pub static OPS: RowOps = RowOps { row_stats, quantize_row, dequantize_row, scaled: None, quantize_and_stats: None };

unsafe fn row_stats(x: &[f32]) -> Option<(f32, f32)> {
    crate::quant::activations::row_stats(x)
}
unsafe fn quantize_row(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    crate::quant::activations::quantize_row(x, scale, zero_point, ty, out)
}
pub(crate) unsafe fn dequantize_row(row: &DequantRow<'_>, acc: &[i32], out: &mut [f32]) {
    crate::gemm::dequantize_row(row, acc, out)
}

/// `u8 x s8 -> i32`, 4 rows x 8 columns, K in groups of 4, portable.
///
/// # Safety
/// The contract of [`super::MicroKernel`]: `a` has `MR` rows of `kp` bytes at stride
/// `a_stride`, `b` has `kp * NR` bytes, `out` as documented on `TileOut`, `kp % KR == 0`.
/// No ISA requirement.
#[allow(non_snake_case)]
unsafe fn gemm_u8s8_i32_4x8c4__scalar(
    mr: usize,
    kp: usize,
    a: *const u8,
    a_stride: usize,
    b: *const i8,
    out: &TileOut<'_>,
) {
    // SAFETY: lengths as promised by the caller (see above).
    let b = unsafe { std::slice::from_raw_parts(b, kp * NR) };
    // Rows past `mr` alias the last valid row and are never used.
    let rows: [&[u8]; MR] =
        std::array::from_fn(|i| unsafe { std::slice::from_raw_parts(a.add(i.min(mr - 1) * a_stride), kp) });
    let mut acc = [[0i32; NR]; MR];
    for (g, bg) in b.chunks_exact(NR * KR).enumerate() {
        for (i, row) in rows.iter().enumerate().take(mr) {
            let ag = &row[g * KR..g * KR + KR];
            for (j, bj) in bg.chunks_exact(KR).enumerate() {
                let mut s = 0i32;
                for r in 0..KR {
                    s += ag[r] as i32 * bj[r] as i32;
                }
                acc[i][j] = acc[i][j].wrapping_add(s);
            }
        }
    }
    match out {
        TileOut::I32(c) => {
            // SAFETY: room for MR * NR values (TileOut contract).
            let c = unsafe { std::slice::from_raw_parts_mut(*c, mr * NR) };
            for (i, row) in acc.iter().enumerate().take(mr) {
                c[i * NR..(i + 1) * NR].copy_from_slice(row);
            }
        }
        TileOut::F32(t) => {
            for (i, row) in acc.iter().enumerate().take(mr) {
                // SAFETY: TileOut contract; the scalar ops run everywhere.
                unsafe { t.write_row(&OPS, i, row) };
            }
            // SAFETY: TileOut contract (mr rows written above).
            unsafe { t.add_residual(mr) };
        }
    }
}
