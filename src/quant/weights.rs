//! Weight quantization: symmetric int8 in [-qmax, qmax] (`qmax` = 127 by default), one scale
//! per output channel or one per tensor.
//!
//! For a channel (or the whole tensor) with `amax = max |w|`:
//!
//! ```text
//! scale = amax / qmax           (f32; 0 when amax == 0; the smallest subnormal if it underflows)
//! q     = clamp(round_half_even(w / scale), -qmax, qmax)
//! w    ~= scale * q
//! ```
//!
//! A smaller `qmax` trades resolution for speed on some CPUs: with `qmax <= 64` (ONNX Runtime's
//! `reduce_range`), AVX2 CPUs without VNNI run a faster kernel (`kernels::avx2::KERNEL_NARROW`)
//! with the same results as every other kernel.
//!
//! Symmetric weights have no zero point, which is what lets the GEMM fold the activation zero
//! point into one precomputed column sum per output channel.

use super::{round_i32, TINY_SCALE};
use crate::error::{Error, Result};

/// How many weight scales there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightGranularity {
    /// One scale per output channel (column of Y). The default: real layers have channels
    /// whose ranges differ by 10x or more, and a shared scale wastes their resolution.
    PerChannel,
    /// One scale for the whole matrix.
    PerTensor,
}

impl WeightGranularity {
    /// The C ABI value (`dynq_weight_granularity`).
    pub fn to_raw(self) -> u32 {
        match self {
            WeightGranularity::PerChannel => 0,
            WeightGranularity::PerTensor => 1,
        }
    }

    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(WeightGranularity::PerChannel),
            1 => Some(WeightGranularity::PerTensor),
            _ => None,
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            WeightGranularity::PerChannel => "per_channel",
            WeightGranularity::PerTensor => "per_tensor",
        }
    }
}

/// The default and largest weight `qmax`.
pub const WEIGHT_QMAX: u8 = 127;

/// The symmetric scale for a range whose largest magnitude is `amax` (finite, `>= 0`), mapped
/// to 127.
pub fn symmetric_scale(amax: f32) -> f32 {
    symmetric_scale_to(amax, 127)
}

/// The symmetric scale for a range whose largest magnitude is `amax` (finite, `>= 0`), mapped
/// to `qmax` (1..=127).
pub fn symmetric_scale_to(amax: f32, qmax: u8) -> f32 {
    if amax == 0.0 {
        return 0.0;
    }
    let s = amax / qmax as f32;
    if s == 0.0 {
        TINY_SCALE
    } else {
        s
    }
}

/// Quantizes one value with a symmetric scale to [-qmax, qmax].
#[inline(always)]
pub fn quantize_symmetric(w: f32, scale: f32, qmax: u8) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    let qmax = qmax as i32;
    round_i32(w / scale).clamp(-qmax, qmax) as i8
}

/// Checks a requested weight `qmax`.
pub(crate) fn check_qmax(qmax: u8) -> Result<()> {
    if qmax == 0 || qmax > WEIGHT_QMAX {
        return Err(Error::InvalidArgument(format!(
            "weight_qmax={qmax}: the largest quantized weight magnitude must be 1..=127 (127: \
             8-bit weights, the default; 64: ONNX Runtime's reduce_range)"
        )));
    }
    Ok(())
}

/// Checks that every weight is finite; the error names the first offending position in
/// `[n][k]` terms whatever the source layout.
pub(crate) fn check_finite(w: &[f32], n: usize, k: usize, idx: impl Fn(usize, usize) -> usize) -> Result<()> {
    if w.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    for nn in 0..n {
        for kk in 0..k {
            let v = w[idx(nn, kk)];
            if !v.is_finite() {
                return Err(Error::NonFinite(format!(
                    "weight at output channel {nn}, input {kk} is {v}; weights must be finite \
                     (fix or clip the model's weights before quantizing)"
                )));
            }
        }
    }
    unreachable!("a non-finite value was seen but not located")
}

/// Quantizes f32 weights into canonical `[N, K]` row-major int8 in [-qmax, qmax] plus scales
/// (len `n` for per-channel, 1 for per-tensor). `get(nn, kk)` returns the index of `W[nn][kk]`
/// in `w`. The weights must already be known finite; `qmax` is 1..=127.
pub(crate) fn quantize_weights(
    w: &[f32],
    n: usize,
    k: usize,
    idx: impl Fn(usize, usize) -> usize,
    granularity: WeightGranularity,
    qmax: u8,
    q: &mut [i8],
) -> Vec<f32> {
    debug_assert_eq!(q.len(), n * k);
    let channel_amax = |nn: usize| (0..k).fold(0.0f32, |m, kk| m.max(w[idx(nn, kk)].abs()));
    let scales: Vec<f32> = match granularity {
        WeightGranularity::PerChannel => (0..n).map(|nn| symmetric_scale_to(channel_amax(nn), qmax)).collect(),
        WeightGranularity::PerTensor => {
            vec![symmetric_scale_to((0..n).fold(0.0f32, |m, nn| m.max(channel_amax(nn))), qmax)]
        }
    };
    for nn in 0..n {
        let s = if scales.len() == 1 { scales[0] } else { scales[nn] };
        let row = &mut q[nn * k..(nn + 1) * k];
        for (kk, out) in row.iter_mut().enumerate() {
            *out = quantize_symmetric(w[idx(nn, kk)], s, qmax);
        }
    }
    scales
}

/// Validates caller-provided weight scales: finite and non-negative.
pub(crate) fn check_scales(scales: &[f32]) -> Result<()> {
    for (i, &s) in scales.iter().enumerate() {
        if !s.is_finite() {
            return Err(Error::NonFinite(format!("weight scale {i} is {s}; scales must be finite")));
        }
        if s < 0.0 {
            return Err(Error::InvalidArgument(format!(
                "weight scale {i} is {s}; scales must be >= 0 (fold a negative sign into the \
                 int8 values)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_extremes() {
        let w = [1.0f32, -1.0, 0.5, 0.0, -0.25];
        let mut q = [0i8; 5];
        let s = quantize_weights(&w, 1, 5, |_, k| k, WeightGranularity::PerChannel, 127, &mut q);
        assert_eq!(s, vec![1.0 / 127.0]);
        // 0.5 * 127 = 63.5 -> 64 (ties to even); -0.25 * 127 = -31.75 -> -32
        assert_eq!(q, [127, -127, 64, 0, -32]);
    }

    #[test]
    fn zero_and_tiny_channels() {
        let w = [0.0f32, 0.0, 1.0e-44, -1.0e-44];
        let mut q = [0i8; 4];
        let s = quantize_weights(&w, 2, 2, |n, k| n * 2 + k, WeightGranularity::PerChannel, 127, &mut q);
        assert_eq!(s[0], 0.0);
        assert!(s[1] > 0.0);
        assert_eq!(&q[..2], &[0, 0]);
        assert!(q[2] > 0 && q[3] < 0, "{q:?}");
    }

    #[test]
    fn per_tensor_shares_one_scale() {
        let w = [2.0f32, 1.0, -0.5, 0.25];
        let mut q = [0i8; 4];
        let s = quantize_weights(&w, 2, 2, |n, k| n * 2 + k, WeightGranularity::PerTensor, 127, &mut q);
        assert_eq!(s, vec![2.0 / 127.0]);
        assert_eq!(q[0], 127);
        assert_eq!(q[2], -32); // -0.5 / (2/127) = -31.75 -> -32
    }

    #[test]
    fn narrower_qmax() {
        let w = [1.0f32, -1.0, 0.5, 0.0, -0.25, 0.3];
        let mut q = [0i8; 6];
        let s = quantize_weights(&w, 1, 6, |_, k| k, WeightGranularity::PerChannel, 64, &mut q);
        assert_eq!(s, vec![1.0 / 64.0]);
        // 0.3 * 64 = 19.2 -> 19
        assert_eq!(q, [64, -64, 32, 0, -16, 19]);
        assert!(check_qmax(0).is_err() && check_qmax(128).is_err() && check_qmax(1).is_ok() && check_qmax(127).is_ok());
    }

    #[test]
    fn scales_checked() {
        assert!(check_scales(&[0.0, 1.0]).is_ok());
        assert_eq!(check_scales(&[f32::NAN]).unwrap_err().status(), crate::Status::NonFinite);
        assert_eq!(check_scales(&[-1.0]).unwrap_err().status(), crate::Status::InvalidArgument);
    }
}
