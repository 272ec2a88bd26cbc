//! Scale and zero-point math: the definition of every number dynq quantizes.
//!
//! Weights are quantized once (offline) to symmetric int8; activations are quantized inside
//! each GEMM call from the range seen in that call. Everything here is plain safe Rust and is
//! the single definition every kernel and test relies on: the kernels only consume the
//! integers produced here, so they cannot disagree about quantization.
//!
//! Rounding is IEEE round-half-to-even everywhere (`f32::round_ties_even`, which is also what
//! the SIMD conversion instructions do under the default rounding mode), as ONNX specifies.

pub mod activations;
pub mod weights;

pub use activations::{ActGranularity, ActType, QuantizedActivations};
pub use weights::WeightGranularity;

/// Largest reduction length K that dynq accepts.
///
/// Exactness argument: the integer part of one output is
/// `sum_k (qa_k - za) * qw_k` with `|qa_k - za| <= 255` and `|qw_k| <= 128`, so its magnitude
/// is at most `255 * 128 * K`. For `K <= 65536` that is `2_139_095_040 < 2^31 - 1`: the true
/// value always fits an `i32`, so wrapping `i32` arithmetic in the kernels (which may compute
/// `sum qa*qw` and `za * colsum` separately and subtract) yields it exactly.
pub const MAX_K: usize = 65536;

/// Rounds half to even and converts to `i32`, saturating (NaN never reaches here).
#[inline(always)]
pub(crate) fn round_i32(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The smallest positive `f32` (a subnormal). Used when a non-zero range would give a scale
/// that underflows to zero, so that `x / scale` never divides by zero.
pub(crate) const TINY_SCALE: f32 = 1.0e-45;
