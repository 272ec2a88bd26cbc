//! Naive references, always compiled: the definitions the kernels and the driver are tested
//! against, and the baseline the benchmarks use for accuracy.
//!
//! They are deliberately the plainest possible loops over canonical data, sharing nothing
//! with the kernels but the quantization functions of [`crate::quant`] (which define the
//! integers every path must produce).

/// Exact integer product: `out[i][j] = sum_k (qa[i][k] - za[i]) * qw[j][k]` in `i64`.
/// `qa` is `m x k` at stride `lda`, `qw` is canonical `[N][K]`.
pub fn gemm_i64(qa: &[u8], m: usize, k: usize, lda: usize, za: &[i32], qw: &[i8], n: usize) -> Vec<i64> {
    let mut out = vec![0i64; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|kk| (qa[i * lda + kk] as i64 - za[i] as i64) * qw[j * k + kk] as i64).sum();
        }
    }
    out
}

/// The dequantized product in f64: `sa[i] * sw[j] * int[i][j] + bias[j]`, no epilogue
/// activation. This is what the f32 output approximates to within a few roundings.
#[allow(clippy::too_many_arguments)]
pub fn dequantized_f64(int: &[i64], m: usize, n: usize, sa: &[f32], sw: &[f32], bias: Option<&[f32]>) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let b = bias.map_or(0.0, |b| b[j] as f64);
            out[i * n + j] = sa[i] as f64 * sw[j] as f64 * int[i * n + j] as f64 + b;
        }
    }
    out
}

/// Unquantized product in f64: `y[i][j] = sum_k a[i][k] * w[j][k] + bias[j]`, `w` in `[N][K]`.
pub fn gemm_f64(a: &[f32], m: usize, k: usize, lda: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|kk| a[i * lda + kk] as f64 * w[j * k + kk] as f64).sum();
            out[i * n + j] = s + bias.map_or(0.0, |b| b[j] as f64);
        }
    }
    out
}
