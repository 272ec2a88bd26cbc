//! Layer normalization of output rows, fused after the product, its activation and residual:
//! the `LayerNormalization` that follows a transformer block's residual `Add` (post-LN models
//! such as BERT), applied while the rows are still in cache instead of in another pass over
//! the output.
//!
//! ## Definition (bit-identical on every ISA and thread count)
//! For a row `x` of `n` values (the stored output values, widened to f32):
//!
//! ```text
//! s[l]  = sum of x[j] over j = l (mod 64), in increasing j      (64 lane sums, f32)
//! sum   = tree(s)            tree: s[l] += s[l + w] for w = 32, 16, ..., 1 and l < w; then s[0]
//! m0    = sum / n
//! c[l]  = sum of (x[j] - m0), the same way;                   mean = m0 + tree(c) / n
//! q[l]  = sum of (x[j] - mean) * (x[j] - mean), the same way;  var = tree(q) / n
//! inv   = 1 / sqrt(var + epsilon)
//! y[j]  = ((x[j] - mean) * inv) * gamma[j] + beta[j]           (beta omitted: no addition)
//! ```
//!
//! Every operation is one IEEE f32 operation (no fused multiply-add, `sqrt` and `/` correctly
//! rounded), and the lanes are independent, so four 16-lane vectors, eight 8-lane ones, 4-lane
//! ones and scalar code all compute the same bits. The variance is the two-pass (biased) one,
//! as ONNX's `LayerNormalization` defines it; results agree with ONNX Runtime's kernel to float
//! rounding (its summation order differs). The mean is corrected once (`c`): a mean one
//! rounding off would otherwise leave `x - mean` at a few ulps in a row of equal values, which
//! `1 / sqrt(var + epsilon)` with BERT's epsilon of 1e-12 turns into outputs far from `beta`
//! (found by a converter stress test: 0.28 off); corrected, such a row gives `beta` exactly.

use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::isa::Isa;

/// Layer normalization over each output row (the last axis, `n` values), after the epilogue
/// and the residual: `y = (x - mean) / sqrt(var + epsilon) * gamma + beta` (see the module).
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm<'a> {
    /// `n` finite values.
    pub gamma: &'a [f32],
    /// `n` finite values, or none (no addition).
    pub beta: Option<&'a [f32]>,
    /// Finite and `>= 0`.
    pub epsilon: f32,
}

impl LayerNorm<'_> {
    /// Checks the parameters for rows of `n` values.
    pub fn check(&self, n: usize) -> Result<()> {
        for (what, v) in [("gamma", Some(self.gamma)), ("beta", self.beta)] {
            let Some(v) = v else { continue };
            if v.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "layer norm {what} has {} values, expected n = {n}",
                    v.len()
                )));
            }
            if let Some(j) = v.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite(format!("layer norm {what}[{j}] is {}; it must be finite", v[j])));
            }
        }
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "layer norm epsilon is {}; it must be finite and >= 0",
                self.epsilon
            )));
        }
        Ok(())
    }
}

/// Independent partial sums: four 16-lane vectors on AVX-512 (eight on AVX2), so that the
/// additions of one pass overlap instead of waiting on each other's latency.
const LANES: usize = 64;

/// Halves `s`: lane `l` of the result is `s[l] + s[l + H]` (one vector addition of its two
/// halves, as the vectorized code does it).
#[inline(always)]
fn fold<const N: usize, const H: usize>(s: &[f32; N]) -> [f32; H] {
    std::array::from_fn(|l| s[l] + s[l + H])
}

#[inline(always)]
fn tree(s: [f32; LANES]) -> f32 {
    let s: [f32; 32] = fold(&s);
    let s: [f32; 16] = fold(&s);
    let s: [f32; 8] = fold(&s);
    let s: [f32; 4] = fold(&s);
    let s: [f32; 2] = fold(&s);
    s[0] + s[1]
}

/// What the lane sums add up: the values, their deviations from the row's mean, or the squares
/// of those.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Term {
    Value,
    Deviation,
    Square,
}

/// The portable lane sums: `tree` of the 64 lane sums of `x[j]`, `x[j] - mean` or
/// `(x[j] - mean)^2`.
#[inline(always)]
fn sums_portable(x: &[f32], mean: f32, what: Term) -> f32 {
    let mut s = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    let term = |v: f32| match what {
        Term::Value => v,
        Term::Deviation => v - mean,
        Term::Square => {
            let d = v - mean;
            d * d
        }
    };
    for c in &mut chunks {
        for l in 0..LANES {
            s[l] += term(c[l]);
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        s[l] += term(v);
    }
    tree(s)
}

/// Rows normalized together: their reductions interleave, so that one row's chain of
/// dependent additions, divisions and square root overlaps the others'.
const BATCH: usize = 4;

/// The definition (see the module), in place, for `R` rows of one length, with the lane sums
/// `sums` computes for the `R` rows (of the values, of their deviations from each row's mean,
/// or of the squared deviations). Every implementation gives the same bits.
#[inline(always)]
fn rows_with<const R: usize>(
    xs: &mut [&mut [f32]; R],
    ln: &LayerNorm<'_>,
    sums: impl Fn(&[&[f32]; R], &[f32; R], Term) -> [f32; R],
) {
    let n = xs[0].len();
    if n == 0 {
        return;
    }
    let nf = n as f32;
    let s = sums(&std::array::from_fn(|r| &*xs[r]), &[0.0; R], Term::Value);
    let m0: [f32; R] = std::array::from_fn(|r| s[r] / nf);
    let c = sums(&std::array::from_fn(|r| &*xs[r]), &m0, Term::Deviation);
    let mean: [f32; R] = std::array::from_fn(|r| m0[r] + c[r] / nf);
    let q = sums(&std::array::from_fn(|r| &*xs[r]), &mean, Term::Square);
    let g = &ln.gamma[..n];
    for (r, x) in xs.iter_mut().enumerate() {
        let (mean, inv) = (mean[r], 1.0 / (q[r] / nf + ln.epsilon).sqrt());
        match ln.beta {
            Some(b) => {
                let b = &b[..n];
                for j in 0..n {
                    x[j] = ((x[j] - mean) * inv) * g[j] + b[j];
                }
            }
            None => {
                for j in 0..n {
                    x[j] = ((x[j] - mean) * inv) * g[j];
                }
            }
        }
    }
}

#[inline(always)]
fn rows_portable<const R: usize>(xs: &mut [&mut [f32]; R], ln: &LayerNorm<'_>) {
    rows_with(xs, ln, |xs, means, what| std::array::from_fn(|r| sums_portable(xs[r], means[r], what)))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The lane sums with explicit vectors: compiled from the portable code, the 64 lane sums
    //! go through memory into a scalar tree (a stall per lane on store forwarding).
    use super::{rows_with, LayerNorm, Term, LANES};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512 F; the rows have one length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::needless_range_loop)] // acc[r][u] is indexed by row and lane group alike
    unsafe fn sums_avx512<const R: usize>(xs: &[&[f32]; R], means: &[f32; R], what: Term) -> [f32; R] {
        let z = _mm512_setzero_ps();
        // Per row, lanes 0-15, 16-31, 32-47, 48-63.
        let mut acc = [[z; 4]; R];
        let mv: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps(means[r]));
        let term = |v: __m512, r: usize| match what {
            Term::Value => v,
            Term::Deviation => _mm512_sub_ps(v, mv[r]),
            Term::Square => {
                let d = _mm512_sub_ps(v, mv[r]);
                _mm512_mul_ps(d, d)
            }
        };
        let n = xs[0].len();
        let mut j = 0;
        while j + LANES <= n {
            for u in 0..4 {
                for r in 0..R {
                    // SAFETY: j + 16 * u + 16 <= n, the length of every row.
                    let v = unsafe { _mm512_loadu_ps(xs[r].as_ptr().add(j + 16 * u)) };
                    acc[r][u] = _mm512_add_ps(acc[r][u], term(v, r));
                }
            }
            j += LANES;
        }
        // The tail: lane l of the 64 gets x[j + l] for l < n - j, nothing otherwise.
        for u in 0..4 {
            let start = j + 16 * u;
            if start >= n {
                break;
            }
            let m: __mmask16 = if n - start >= 16 { 0xffff } else { (1u16 << (n - start)) - 1 };
            for r in 0..R {
                // SAFETY: only lanes inside the row are read (masked load).
                let v = unsafe { _mm512_maskz_loadu_ps(m, xs[r].as_ptr().add(start)) };
                acc[r][u] = _mm512_mask_add_ps(acc[r][u], m, acc[r][u], term(v, r));
            }
        }
        // tree: lanes l + 32 onto l, then l + 16, 8, 4, 2, 1.
        std::array::from_fn(|r| {
            let a = &acc[r];
            let h = _mm512_add_ps(_mm512_add_ps(a[0], a[2]), _mm512_add_ps(a[1], a[3]));
            let h8 = _mm256_add_ps(
                _mm512_castps512_ps256(h),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(h))),
            );
            let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
            let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
            _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)))
        })
    }

    /// # Safety
    /// The CPU has AVX2; the rows have one length.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums_avx2<const R: usize>(xs: &[&[f32]; R], means: &[f32; R], what: Term) -> [f32; R] {
        std::array::from_fn(|r| {
            let x = xs[r];
            let z = _mm256_setzero_ps();
            let mut acc = [z; 8]; // lanes 8u..8u+8
            let mv = _mm256_set1_ps(means[r]);
            let term = |v: __m256| match what {
                Term::Value => v,
                Term::Deviation => _mm256_sub_ps(v, mv),
                Term::Square => {
                    let d = _mm256_sub_ps(v, mv);
                    _mm256_mul_ps(d, d)
                }
            };
            let n = x.len();
            let mut j = 0;
            while j + LANES <= n {
                for (u, a) in acc.iter_mut().enumerate() {
                    // SAFETY: j + 8 * u + 8 <= n.
                    *a = _mm256_add_ps(*a, term(unsafe { _mm256_loadu_ps(x.as_ptr().add(j + 8 * u)) }));
                }
                j += LANES;
            }
            for (u, a) in acc.iter_mut().enumerate() {
                let start = j + 8 * u;
                if start >= n {
                    break;
                }
                let k = (n - start).min(8);
                let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let m = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), idx);
                // SAFETY: only lanes inside x are read (masked load).
                let v = unsafe { _mm256_maskload_ps(x.as_ptr().add(start), m) };
                *a = _mm256_add_ps(*a, _mm256_and_ps(term(v), _mm256_castsi256_ps(m)));
            }
            let h = [
                _mm256_add_ps(acc[0], acc[4]),
                _mm256_add_ps(acc[1], acc[5]),
                _mm256_add_ps(acc[2], acc[6]),
                _mm256_add_ps(acc[3], acc[7]),
            ];
            let h = _mm256_add_ps(_mm256_add_ps(h[0], h[2]), _mm256_add_ps(h[1], h[3]));
            let h4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
            _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)))
        })
    }

    /// # Safety
    /// The CPU has AVX-512 F; the rows have one length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rows_avx512<const R: usize>(xs: &mut [&mut [f32]; R], ln: &LayerNorm<'_>) {
        // SAFETY: the caller's CPU has AVX-512 F; one length.
        rows_with(xs, ln, |xs, m, what| unsafe { sums_avx512(xs, m, what) })
    }

    /// # Safety
    /// The CPU has AVX2; the rows have one length.
    #[target_feature(enable = "avx2")]
    pub unsafe fn rows_avx2<const R: usize>(xs: &mut [&mut [f32]; R], ln: &LayerNorm<'_>) {
        // SAFETY: the caller's CPU has AVX2; one length.
        rows_with(xs, ln, |xs, m, what| unsafe { sums_avx2(xs, m, what) })
    }
}

/// Normalizes `R` f32 rows of one length in place with the widest vectors `isa` allows (the
/// same bits whichever is used). `ln` was checked for that length.
fn layer_norm_batch<const R: usize>(isa: Isa, xs: &mut [&mut [f32]; R], ln: &LayerNorm<'_>) {
    assert!(xs.iter().all(|x| x.len() == xs[0].len()));
    #[cfg(target_arch = "x86_64")]
    {
        match isa {
            // SAFETY: a kernel ISA is used only on a CPU that supports it (AVX-512 VNNI implies F,
            // and AMX is detected only with AVX-512 VNNI); one length (asserted).
            Isa::Avx512Vnni | Isa::AmxInt8 if isa.is_supported() => return unsafe { x86::rows_avx512(xs, ln) },
            // SAFETY: as above (both imply AVX2).
            Isa::Avx2 | Isa::AvxVnni if isa.is_supported() => return unsafe { x86::rows_avx2(xs, ln) },
            _ => {}
        }
    }
    let _ = isa;
    rows_portable(xs, ln)
}

/// Normalizes one f32 row in place (see [`layer_norm_batch`]).
pub(crate) fn layer_norm_row(isa: Isa, x: &mut [f32], ln: &LayerNorm<'_>) {
    layer_norm_batch::<1>(isa, &mut [x], ln)
}

/// Normalizes `rows` rows of `n` values of `Y` at stride `ld`, starting at `y`, in batches of
/// [`BATCH`] (f16/bf16 rows are widened to f32, normalized and rounded back to nearest-even).
///
/// # Safety
/// Those `rows * n` elements are valid, writable and accessed by no one else meanwhile.
pub(crate) unsafe fn layer_norm_rows<Y: Element>(
    isa: Isa,
    y: *mut Y,
    rows: usize,
    n: usize,
    ld: usize,
    ln: &LayerNorm<'_>,
) {
    let mut buf: Vec<f32> = Vec::new();
    let is_f32 = std::any::TypeId::of::<Y>() == std::any::TypeId::of::<f32>();
    let mut i = 0;
    while i < rows {
        let take = (rows - i).min(BATCH);
        // SAFETY: rows i..i + take of the caller's rows, distinct (ld >= n).
        let row = |r: usize| unsafe { std::slice::from_raw_parts_mut(y.add((i + r) * ld), n) };
        if is_f32 && take == BATCH {
            let mut xs: [&mut [f32]; BATCH] = std::array::from_fn(|r| Y::as_f32_mut(row(r)).expect("Y is f32"));
            layer_norm_batch(isa, &mut xs, ln);
        } else if is_f32 {
            for r in 0..take {
                layer_norm_row(isa, Y::as_f32_mut(row(r)).expect("Y is f32"), ln);
            }
        } else {
            for r in 0..take {
                let row = row(r);
                buf.clear();
                buf.extend(row.iter().map(|v| v.to_f32()));
                layer_norm_row(isa, &mut buf, ln);
                for (o, v) in row.iter_mut().zip(buf.iter()) {
                    *o = Y::from_f32(*v);
                }
            }
        }
        i += take;
    }
}

/// The definition on one row, for tests and callers (the portable code path).
pub fn layer_norm_reference(x: &mut [f32], ln: &LayerNorm<'_>) {
    rows_portable::<1>(&mut [x], ln)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.3) * 7.0 + 2.5
            })
            .collect()
    }

    #[test]
    fn every_variant_gives_the_definitions_bits_and_the_math_holds() {
        for n in [1usize, 2, 7, 15, 16, 17, 31, 32, 33, 100, 384, 385, 768, 1000] {
            let x = data(n, n as u32);
            let g = data(n, 7 + n as u32);
            let b = data(n, 11 + n as u32);
            for beta in [None, Some(&b[..])] {
                let ln = LayerNorm { gamma: &g, beta, epsilon: 1e-5 };
                let mut want = x.clone();
                layer_norm_reference(&mut want, &ln);
                for isa in [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::AmxInt8, Isa::Neon] {
                    let mut got = x.clone();
                    layer_norm_row(isa, &mut got, &ln);
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "n = {n}, {isa:?}: differs from the definition");
                    // A batch of rows: each row as alone (this one among others).
                    let others: Vec<Vec<f32>> = (0..BATCH as u32).map(|r| data(n, 100 + r)).collect();
                    let mut rows: Vec<Vec<f32>> = others.clone();
                    rows[2] = x.clone();
                    let mut xs: [&mut [f32]; BATCH] = {
                        let mut it = rows.iter_mut();
                        std::array::from_fn(|_| it.next().unwrap().as_mut_slice())
                    };
                    layer_norm_batch(isa, &mut xs, &ln);
                    for (r, row) in rows.iter().enumerate() {
                        let mut one = if r == 2 { x.clone() } else { others[r].clone() };
                        layer_norm_reference(&mut one, &ln);
                        assert!(
                            row.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "n = {n}, {isa:?}: batch row {r}"
                        );
                    }
                }
                // Against f64 arithmetic.
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
                for j in 0..n {
                    let e =
                        (x[j] as f64 - mean) / (var + 1e-5).sqrt() * g[j] as f64 + beta.map_or(0.0, |b| b[j] as f64);
                    assert!(
                        (want[j] as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "n = {n}, j = {j}: {} vs {e}",
                        want[j]
                    );
                }
            }
        }
    }

    /// Rows of equal values normalize to `beta` exactly, on every variant, also with BERT's
    /// epsilon of 1e-12 and values whose sum rounds (without the mean's correction, one rounding
    /// of the mean was multiplied by 1e6 there: outputs 0.28 away from `beta`).
    #[test]
    fn rows_of_equal_values_give_beta_exactly() {
        let mut checked = 0;
        // Miri (which runs the library's unit tests in CI) interprets every operation: a few rows
        // there, on the portable path (the only one it has).
        let (ns, isas): (&[usize], &[Isa]) = if cfg!(miri) {
            (&[3, 24, 70], &[Isa::Scalar])
        } else {
            (
                &[3, 5, 24, 64, 100, 385, 768, 3000],
                &[Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::AmxInt8, Isa::Neon],
            )
        };
        for &n in ns {
            let g = data(n, 3 + n as u32);
            let b = data(n, 5 + n as u32);
            for c in [0.1f32, -0.7, 1.0 / 3.0, 123.456, 1e-3, 7.77e4, -2.5e-6] {
                for eps in [1e-12f32, 0.0, 1e-5] {
                    let ln = LayerNorm { gamma: &g, beta: Some(&b), epsilon: eps };
                    for &isa in isas {
                        let mut x = vec![c; n];
                        layer_norm_row(isa, &mut x, &ln);
                        if eps == 0.0 {
                            // 0 / sqrt(0): NaN, as the definition and ONNX give.
                            assert!(x.iter().all(|v| v.is_nan()), "n = {n}, c = {c}, {isa:?}");
                        } else {
                            assert_eq!(x, b, "n = {n}, c = {c}, eps = {eps}, {isa:?}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 63);
    }

    #[test]
    fn constant_rows_and_bad_parameters() {
        let g = vec![2.0f32; 8];
        let ln = LayerNorm { gamma: &g, beta: None, epsilon: 1e-5 };
        let mut x = vec![3.0f32; 8];
        layer_norm_reference(&mut x, &ln);
        assert!(x.iter().all(|&v| v == 0.0));
        assert!(ln.check(8).is_ok());
        assert!(ln.check(7).is_err());
        let bad = [1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        assert!(matches!(LayerNorm { gamma: &g, beta: Some(&bad), epsilon: 0.0 }.check(8), Err(Error::NonFinite(_))));
        for eps in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(LayerNorm { gamma: &g, beta: None, epsilon: eps }.check(8).is_err());
        }
    }
}
