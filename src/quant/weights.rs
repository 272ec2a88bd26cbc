//! Weight quantization: symmetric int8 in [-127, 127], one scale per output channel or one
//! per tensor.
//!
//! For a channel (or the whole tensor) with `amax = max |w|`:
//!
//! ```text
//! scale = amax / 127            (f32; 0 when amax == 0; the smallest subnormal if it underflows)
//! q     = clamp(round_half_even(w / scale), -127, 127)
//! w    ~= scale * q
//! ```
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

/// The symmetric scale for a range whose largest magnitude is `amax` (finite, `>= 0`).
pub fn symmetric_scale(amax: f32) -> f32 {
    if amax == 0.0 {
        return 0.0;
    }
    let s = amax / 127.0;
    if s == 0.0 {
        TINY_SCALE
    } else {
        s
    }
}

/// Quantizes one value with a symmetric scale to [-127, 127].
#[inline(always)]
pub fn quantize_symmetric(w: f32, scale: f32) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    round_i32(w / scale).clamp(-127, 127) as i8
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

/// Quantizes f32 weights into canonical `[N, K]` row-major int8 plus scales (len `n` for
/// per-channel, 1 for per-tensor). `get(nn, kk)` returns the index of `W[nn][kk]` in `w`.
/// The weights must already be known finite.
pub(crate) fn quantize_weights(
    w: &[f32],
    n: usize,
    k: usize,
    idx: impl Fn(usize, usize) -> usize,
    granularity: WeightGranularity,
    q: &mut [i8],
) -> Vec<f32> {
    debug_assert_eq!(q.len(), n * k);
    let channel_amax = |nn: usize| (0..k).fold(0.0f32, |m, kk| m.max(w[idx(nn, kk)].abs()));
    let scales: Vec<f32> = match granularity {
        WeightGranularity::PerChannel => (0..n).map(|nn| symmetric_scale(channel_amax(nn))).collect(),
        WeightGranularity::PerTensor => {
            vec![symmetric_scale((0..n).fold(0.0f32, |m, nn| m.max(channel_amax(nn))))]
        }
    };
    for nn in 0..n {
        let s = if scales.len() == 1 { scales[0] } else { scales[nn] };
        let row = &mut q[nn * k..(nn + 1) * k];
        for (kk, out) in row.iter_mut().enumerate() {
            *out = quantize_symmetric(w[idx(nn, kk)], s);
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
        let s = quantize_weights(&w, 1, 5, |_, k| k, WeightGranularity::PerChannel, &mut q);
        assert_eq!(s, vec![1.0 / 127.0]);
        // 0.5 * 127 = 63.5 -> 64 (ties to even); -0.25 * 127 = -31.75 -> -32
        assert_eq!(q, [127, -127, 64, 0, -32]);
    }

    #[test]
    fn zero_and_tiny_channels() {
        let w = [0.0f32, 0.0, 1.0e-44, -1.0e-44];
        let mut q = [0i8; 4];
        let s = quantize_weights(&w, 2, 2, |n, k| n * 2 + k, WeightGranularity::PerChannel, &mut q);
        assert_eq!(s[0], 0.0);
        assert!(s[1] > 0.0);
        assert_eq!(&q[..2], &[0, 0]);
        assert!(q[2] > 0 && q[3] < 0, "{q:?}");
    }

    #[test]
    fn per_tensor_shares_one_scale() {
        let w = [2.0f32, 1.0, -0.5, 0.25];
        let mut q = [0i8; 4];
        let s = quantize_weights(&w, 2, 2, |n, k| n * 2 + k, WeightGranularity::PerTensor, &mut q);
        assert_eq!(s, vec![2.0 / 127.0]);
        assert_eq!(q[0], 127);
        assert_eq!(q[2], -32); // -0.5 / (2/127) = -31.75 -> -32
    }

    #[test]
    fn scales_checked() {
        assert!(check_scales(&[0.0, 1.0]).is_ok());
        assert_eq!(check_scales(&[f32::NAN]).unwrap_err().status(), crate::Status::NonFinite);
        assert_eq!(check_scales(&[-1.0]).unwrap_err().status(), crate::Status::InvalidArgument);
    }
}
