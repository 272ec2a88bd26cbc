//! GELU (the exact, erf-based form used by BERT-style models) applied to the op's output rows,
//! while they are still in cache.
//!
//! `gelu(x) = 0.5 * x * (1 + erf(x / sqrt(2)))`, with `erf` evaluated in f32 by a rational
//! approximation (odd degree-13 numerator over even degree-8 denominator on [-4, 4], +-1
//! outside), branch-free so that the loop vectorizes. Maximum absolute error of `erf` is below
//! 3e-7 (checked against a f64 series in the tests), far below the int8 quantization error of the
//! matrix product it follows.

/// `erf(x)` in f32.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
}

/// `0.5 * x * (1 + erf(x / sqrt(2)))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Applies [`gelu`] to every element.
pub fn gelu_in_place(v: &mut [f32]) {
    for x in v {
        *x = gelu(*x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in f64 (accurate to ~1e-11 on [-5, 5]).
    fn erf_ref(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-18 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_accuracy() {
        let mut worst = 0.0f64;
        for i in -5000..=5000 {
            let x = i as f32 / 1000.0;
            let e = (erf(x) as f64 - erf_ref(x as f64)).abs();
            worst = worst.max(e);
        }
        assert!(worst < 3e-7, "max |erf error| = {worst}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(100.0), erf(4.0));
        assert!((erf(4.0) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn gelu_values() {
        assert_eq!(gelu(0.0), 0.0);
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-1.0) + 0.158_655_3).abs() < 1e-6);
        assert!((gelu(10.0) - 10.0).abs() < 1e-6);
        assert!(gelu(-10.0).abs() < 1e-6);
    }
}
