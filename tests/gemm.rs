//! The f32 GEMM: bit-identical across ISAs and thread counts, within a stated bound of the f64
//! reference, within the quantization error bound of the unquantized product, and correct on
//! strides, epilogues and bad input.

mod common;

use common::{isas_under_test, GuardBuf, Rng};
use dynq::quant::activations::quantize_activations;
use dynq::{
    gemm, reference, ActGranularity, ActType, Epilogue, GemmOptions, Isa, PackOptions, PackedWeights, Status,
    WeightGranularity, WeightLayout,
};

fn random(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.f32() * scale).collect()
}

fn all_modes() -> Vec<(ActGranularity, ActType)> {
    let mut v = Vec::new();
    for g in [ActGranularity::PerRow, ActGranularity::PerTensor] {
        for t in [ActType::AsymmetricU8, ActType::SymmetricI8] {
            v.push((g, t));
        }
    }
    v
}

fn opts(g: ActGranularity, t: ActType, threads: usize) -> GemmOptions {
    GemmOptions { act_granularity: g, act_type: t, epilogue: Epilogue::None, num_threads: threads }
}

/// erf in f64 by its Taylor series (accurate to ~1e-9 on [-4, 4], enough to judge an f32
/// approximation), and 1 beyond.
fn erf_f64(x: f64) -> f64 {
    if x.abs() > 4.5 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0f64);
    while term.abs() > 1e-17 * sum.abs().max(1e-300) {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn erf_and_gelu_accuracy() {
    let mut max_erf = 0f64;
    for i in -100_000..=100_000 {
        let x = i as f32 * 1e-4 * 6.0;
        let e = dynq::gemm::erf(x) as f64;
        max_erf = max_erf.max((e - erf_f64(x as f64)).abs());
        let g = dynq::gemm::gelu(x) as f64;
        let want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / std::f64::consts::SQRT_2));
        assert!((g - want).abs() <= 4e-7 * (x.abs() as f64).max(1.0), "gelu({x}) = {g}, exact {want}");
    }
    assert!(max_erf <= 3.5e-7, "erf max error {max_erf}");
    assert!((dynq::gemm::erf(10.0) - 1.0).abs() <= 1.2e-7);
    assert!((dynq::gemm::erf(-10.0) + 1.0).abs() <= 1.2e-7);
    assert_eq!(dynq::gemm::gelu(0.0), 0.0);
}

/// The tanh GELU (GPT-2's `gelu_new`, ONNX Runtime's FastGelu), SiLU and QuickGELU against their
/// formulas in f64.
#[test]
fn tanh_gelu_tanh_silu_and_quick_gelu_accuracy() {
    let (mut max_tanh, mut max_gelu) = (0f64, 0f64);
    for i in -200_000..=200_000 {
        let x = i as f32 * 6e-5;
        let t = dynq::gemm::tanh(x) as f64;
        max_tanh = max_tanh.max((t - (x as f64).tanh()).abs());
        let xd = x as f64;
        let want = 0.5 * xd * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd * xd * xd)).tanh());
        let g = dynq::gemm::gelu_tanh(x) as f64;
        max_gelu = max_gelu.max((g - want).abs() / xd.abs().max(1.0));
    }
    assert!(max_tanh <= 3.5e-7, "tanh max error {max_tanh}");
    assert!(max_gelu <= 2.5e-7, "gelu_tanh max error / max(|x|, 1): {max_gelu}");
    // Saturation is exact: 1 from the clamp on, so a large negative input gives exactly zero
    // (not a tiny multiple of it) and a large positive one itself.
    for x in [10.0f32, 11.5, 1e3, 1e30, f32::MAX, f32::INFINITY] {
        assert_eq!(dynq::gemm::tanh(x), 1.0, "tanh({x})");
        assert_eq!(dynq::gemm::tanh(-x), -1.0, "tanh(-{x})");
    }
    for x in [6.0f32, 100.0, 1e20, 3e38] {
        assert_eq!(dynq::gemm::gelu_tanh(-x), 0.0, "gelu_tanh(-{x})");
        assert_eq!(dynq::gemm::gelu_tanh(x), x, "gelu_tanh({x})");
    }
    assert_eq!(dynq::gemm::gelu_tanh(0.0), 0.0);
    assert!(dynq::gemm::gelu_tanh(f32::NAN).is_nan());
    // SiLU and QuickGELU, the same tanh: against x * sigmoid(a x) in f64.
    let (mut max_silu, mut max_quick) = (0f64, 0f64);
    for i in -400_000..=400_000 {
        let x = i as f32 * 6e-5;
        let xd = x as f64;
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        max_silu = max_silu.max((dynq::gemm::silu(x) as f64 - xd * sig(xd)).abs() / xd.abs().max(1.0));
        max_quick = max_quick.max((dynq::gemm::quick_gelu(x) as f64 - xd * sig(1.702 * xd)).abs() / xd.abs().max(1.0));
    }
    assert!(max_silu <= 2.5e-7, "silu max error / max(|x|, 1): {max_silu}");
    assert!(max_quick <= 2.5e-7, "quick_gelu max error / max(|x|, 1): {max_quick}");
    for x in [21.0f32, 1e3, 1e30, 3e38] {
        assert_eq!(dynq::gemm::silu(-x), 0.0, "silu(-{x})");
        assert_eq!(dynq::gemm::silu(x), x, "silu({x})");
        assert_eq!(dynq::gemm::quick_gelu(-x), 0.0, "quick_gelu(-{x})");
        assert_eq!(dynq::gemm::quick_gelu(x), x, "quick_gelu({x})");
    }
    // Distinct from the erf form (they differ by up to 4.7e-4, at |x| = 2.7).
    assert!((dynq::gemm::gelu_tanh(2.7) - dynq::gemm::gelu(2.7)).abs() > 4e-4);
}

/// Every ISA's SIMD epilogue gives the scalar definition's bits over a dense sweep of its input,
/// including saturation and huge magnitudes: the bias sets each output's value (the products are
/// small), so the activations see every value the sweep lists, in every lane position.
#[test]
fn epilogue_activations_match_the_definition_on_a_dense_sweep() {
    let (m, k) = (3, 8);
    let mut sweep: Vec<f32> = (-24_000..=24_000).map(|i| i as f32 * 5e-4).collect();
    for e in -30..=38 {
        let v = 10f32.powi(e);
        sweep.extend([v, -v, v * 3.3, -v * 3.3]);
    }
    sweep.extend([f32::MAX, -f32::MAX, f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 0.0, -0.0]);
    let n = sweep.len();
    let mut rng = Rng(91);
    let w = random(&mut rng, n * k, 1e-3);
    let a = random(&mut rng, m * k, 1e-3);
    for isa in isas_under_test() {
        let pw =
            PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions { isa: Some(isa), ..Default::default() })
                .unwrap();
        let plain = run(&pw, &a, m, Some(&sweep), &opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1));
        for (ep, f) in [
            (Epilogue::Relu, dynq::gemm::relu as fn(f32) -> f32),
            (Epilogue::Gelu, dynq::gemm::gelu),
            (Epilogue::GeluTanh, dynq::gemm::gelu_tanh),
            (Epilogue::Silu, dynq::gemm::silu),
            (Epilogue::QuickGelu, dynq::gemm::quick_gelu),
        ] {
            let o = GemmOptions { epilogue: ep, ..opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1) };
            let got = run(&pw, &a, m, Some(&sweep), &o);
            for (idx, (g, p)) in got.iter().zip(&plain).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    f(*p).to_bits(),
                    "{isa} {ep:?}: input {p} gives {g}, defined as {} (column {})",
                    f(*p),
                    idx % n
                );
            }
        }
    }
}

fn run(w: &PackedWeights, a: &[f32], m: usize, bias: Option<&[f32]>, o: &GemmOptions) -> Vec<f32> {
    let mut y = vec![0f32; m * w.n()];
    gemm(w, a, m, w.k(), bias, &mut y, w.n(), o).unwrap();
    y
}

#[test]
fn bit_identical_across_isas_and_threads() {
    let mut rng = Rng(10);
    let isas = isas_under_test();
    // Long K as well: (14, 70, 1000) and (5, 45, 3500) run many K groups per tile.
    for &(m, n, k) in
        &[(1, 1, 1), (3, 17, 9), (17, 67, 131), (64, 96, 300), (130, 40, 77), (14, 70, 1000), (5, 45, 3500)]
    {
        let a = random(&mut rng, m * k, 3.0);
        let w = random(&mut rng, n * k, 0.5);
        let bias = random(&mut rng, n, 1.0);
        // 8-bit weights, and weights of at most 64 in magnitude (which AVX2 runs with its
        // narrow-weight kernel).
        for ((g, t), qmax) in all_modes().into_iter().flat_map(|mode| [(mode, 127), (mode, 64)]) {
            let base = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(Isa::Scalar), weight_qmax: qmax, ..Default::default() },
            )
            .unwrap();
            let want = run(&base, &a, m, Some(&bias), &opts(g, t, 1));
            for &isa in &isas {
                let pw = base.repack(isa).unwrap();
                let kern = dynq::kernels::kernel_for(isa).unwrap();
                if qmax <= 64 {
                    assert_eq!(pw.kernel().name, kern.narrow.unwrap_or(kern).name);
                }
                for threads in [1, 2, 3, 0] {
                    let got = run(&pw, &a, m, Some(&bias), &opts(g, t, threads));
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{isa} threads={threads} {m}x{n}x{k} {g:?} {t:?} qmax={qmax} differs from scalar");
                }
                for ep in &Epilogue::ALL[1..] {
                    let o = GemmOptions { epilogue: *ep, ..opts(g, t, 2) };
                    let want = run(&base, &a, m, Some(&bias), &GemmOptions { num_threads: 1, ..o });
                    let got = run(&pw, &a, m, Some(&bias), &o);
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{isa} {ep:?} {m}x{n}x{k} {g:?} {t:?} differs from scalar");
                }
            }
        }
    }
}

/// Recomputes the quantized operands independently of the GEMM driver.
fn quantized_reference(
    pw: &PackedWeights,
    a: &[f32],
    m: usize,
    g: ActGranularity,
    t: ActType,
    bias: Option<&[f32]>,
) -> Vec<f64> {
    let k = pw.k();
    let qa = quantize_activations(a, m, k, k, g, t, k, m).unwrap();
    let int = reference::gemm_i64(&qa.data, m, k, k, &qa.zero_points, &pw.quantized_weights(), pw.n());
    reference::dequantized_f64(&int, m, pw.n(), &qa.scales, pw.scales(), bias)
}

#[test]
fn f32_output_within_rounding_of_f64_reference() {
    // y = fl(fl(f32(c) * fl(sa * sw)) + bias): three roundings of relative size 2^-24 on the
    // product (c converts exactly below 2^24, with one rounding above) and one on the sum.
    let mut rng = Rng(11);
    for isa in isas_under_test() {
        for &(m, n, k) in &[(7, 33, 65), (32, 64, 1000), (2, 5, 20000)] {
            let a = random(&mut rng, m * k, 10.0);
            let w = random(&mut rng, n * k, 0.2);
            let bias = random(&mut rng, n, 5.0);
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            for (g, t) in all_modes() {
                let y = run(&pw, &a, m, Some(&bias), &opts(g, t, 1));
                let r = quantized_reference(&pw, &a, m, g, t, Some(&bias));
                for (idx, (&got, &want)) in y.iter().zip(&r).enumerate() {
                    let b = bias[idx % n] as f64;
                    let bound = 4.0 * f32::EPSILON as f64 / 2.0 * ((want - b).abs() + b.abs()) + 1e-30;
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "{isa} {g:?} {t:?} {m}x{n}x{k} [{idx}] {got} vs {want} (bound {bound})"
                    );
                }
            }
        }
    }
}

#[test]
fn quantization_error_within_analytic_bound() {
    // |y - x.w| <= sum_k (|x_k| * sw/2 + |w_k| * sa/2 + sa*sw/4) (+ rounding slack), where the
    // halves come from rounding to nearest: an independent check of the quantization itself.
    let mut rng = Rng(12);
    let (m, n, k) = (9, 21, 257);
    let a: Vec<f32> = (0..m * k).map(|i| rng.f32() * if i % 50 == 0 { 20.0 } else { 1.0 } + 0.3).collect();
    let w = random(&mut rng, n * k, 0.1);
    for gran in [WeightGranularity::PerChannel, WeightGranularity::PerTensor] {
        let pw = PackedWeights::from_f32(
            &w,
            n,
            k,
            WeightLayout::NK,
            PackOptions { granularity: gran, ..Default::default() },
        )
        .unwrap();
        for (g, t) in all_modes() {
            let y = run(&pw, &a, m, None, &opts(g, t, 0));
            let exact = reference::gemm_f64(&a, m, k, k, &w, n, None);
            let qa = quantize_activations(&a, m, k, k, g, t, k, m).unwrap();
            for i in 0..m {
                let sa = qa.scales[i] as f64;
                for j in 0..n {
                    let sw = pw.scales()[j] as f64;
                    let bound: f64 = (0..k)
                        .map(|kk| {
                            a[i * k + kk].abs() as f64 * sw / 2.0
                                + w[j * k + kk].abs() as f64 * sa / 2.0
                                + sa * sw / 4.0
                        })
                        .sum::<f64>()
                        * 1.001
                        + 1e-6;
                    let err = (y[i * n + j] as f64 - exact[i * n + j]).abs();
                    assert!(err <= bound, "{gran:?} {g:?} {t:?} ({i},{j}): error {err} > bound {bound}");
                }
            }
        }
    }
}

#[test]
fn accuracy_on_typical_data() {
    // Per-row asymmetric activations and per-channel weights on normal-like data: relative
    // Frobenius error of a BERT-sized layer stays around 1%.
    let mut rng = Rng(13);
    let (m, n, k) = (32, 256, 768);
    let a: Vec<f32> = (0..m * k).map(|_| (0..4).map(|_| rng.f32()).sum::<f32>()).collect();
    let w: Vec<f32> = (0..n * k).map(|_| (0..4).map(|_| rng.f32()).sum::<f32>() * 0.03).collect();
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let y = run(&pw, &a, m, None, &GemmOptions::default());
    let exact = reference::gemm_f64(&a, m, k, k, &w, n, None);
    let num: f64 = y.iter().zip(&exact).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    let den: f64 = exact.iter().map(|b| b * b).sum();
    let rel = (num / den).sqrt();
    assert!(rel < 0.02, "relative error {rel}");
}

#[test]
fn strides_epilogue_and_untouched_padding() {
    let mut rng = Rng(14);
    let (m, n, k, lda, ldy) = (5, 11, 13, 20, 16);
    let a = random(&mut rng, (m - 1) * lda + k, 2.0);
    let w = random(&mut rng, k * n, 1.0);
    let bias = random(&mut rng, n, 1.0);
    for isa in isas_under_test() {
        let pw =
            PackedWeights::from_f32(&w, n, k, WeightLayout::KN, PackOptions { isa: Some(isa), ..Default::default() })
                .unwrap();
        let mut y = vec![f32::from_bits(0x7fc0_1234); (m - 1) * ldy + n];
        gemm(&pw, &a, m, lda, Some(&bias), &mut y, ldy, &GemmOptions::default()).unwrap();
        let mut relu = y.clone();
        let o = GemmOptions { epilogue: Epilogue::Relu, ..Default::default() };
        gemm(&pw, &a, m, lda, Some(&bias), &mut relu, ldy, &o).unwrap();
        // The same rows packed densely give the same numbers.
        let dense: Vec<f32> = (0..m).flat_map(|i| a[i * lda..i * lda + k].to_vec()).collect();
        let yd = run(&pw, &dense, m, Some(&bias), &GemmOptions::default());
        for i in 0..m {
            for j in 0..ldy.min(y.len() - i * ldy) {
                let v = y[i * ldy + j];
                if j < n {
                    assert_eq!(v.to_bits(), yd[i * n + j].to_bits());
                    assert_eq!(relu[i * ldy + j].to_bits(), v.max(0.0).to_bits());
                } else {
                    assert_eq!(v.to_bits(), 0x7fc0_1234, "padding ({i},{j}) was written");
                }
            }
        }
        // No bias equals bias of zeros.
        let zeros = vec![0f32; n];
        let nb = run(&pw, &dense, m, None, &GemmOptions::default());
        let zb = run(&pw, &dense, m, Some(&zeros), &GemmOptions::default());
        assert!(nb.iter().zip(&zb).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn guard_pages_around_inputs_and_outputs() {
    let mut rng = Rng(15);
    for isa in isas_under_test() {
        let kern = dynq::kernels::kernel_for(isa).unwrap();
        for &(m, n, k) in
            &[(1, 1, 1), (kern.mr + 1, kern.nr + 1, kern.kr + 1), (2 * kern.mr - 1, 2 * kern.nr - 1, 2 * kern.kr - 1)]
        {
            let mut a = GuardBuf::<f32>::new(m * k, 0.0);
            a.as_mut_slice().iter_mut().for_each(|v| *v = rng.f32());
            let mut wb = GuardBuf::<f32>::new(n * k, 0.0);
            wb.as_mut_slice().iter_mut().for_each(|v| *v = rng.f32());
            let mut bias = GuardBuf::<f32>::new(n, 0.5);
            bias.as_mut_slice()[0] = -0.5;
            let pw = PackedWeights::from_f32(
                wb.as_slice(),
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let mut y = GuardBuf::<f32>::new(m * n, 0.0);
            gemm(&pw, a.as_slice(), m, k, Some(bias.as_slice()), y.as_mut_slice(), n, &GemmOptions::default()).unwrap();
            let blob = pw.serialize();
            let mut gb = GuardBuf::<u8>::new(blob.len(), 0);
            gb.as_mut_slice().copy_from_slice(&blob);
            let back = PackedWeights::deserialize(gb.as_slice(), PackOptions { isa: Some(isa), ..Default::default() })
                .unwrap();
            assert_eq!(back.quantized_weights(), pw.quantized_weights());
        }
    }
}

#[test]
fn non_finite_activations_and_bias_are_refused_and_y_untouched() {
    let (m, n, k) = (3, 4, 5);
    let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.1).collect();
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut a = vec![1.0f32; m * k];
        a[2 * k + 3] = bad;
        let mut y = vec![7.0f32; m * n];
        let e = gemm(&pw, &a, m, k, None, &mut y, n, &GemmOptions::default()).unwrap_err();
        assert_eq!(e.status(), Status::NonFinite);
        assert!(e.message().contains("A[2][3]"), "{e}");
        assert!(y.iter().all(|&v| v == 7.0));
        let a = vec![1.0f32; m * k];
        let mut bias = vec![0.0f32; n];
        bias[1] = bad;
        let e = gemm(&pw, &a, m, k, Some(&bias), &mut y, n, &GemmOptions::default()).unwrap_err();
        assert_eq!(e.status(), Status::NonFinite);
        assert!(e.message().contains("bias[1]"), "{e}");
        assert!(y.iter().all(|&v| v == 7.0));
    }
}

#[test]
fn argument_errors() {
    let pw = PackedWeights::from_f32(&[1.0; 12], 3, 4, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = [1.0f32; 8];
    let mut y = [0.0f32; 6];
    let d = GemmOptions::default();
    let st = |r: dynq::Result<()>| r.unwrap_err().status();
    assert_eq!(st(gemm(&pw, &a, 2, 3, None, &mut y, 3, &d)), Status::InvalidArgument); // lda < k
    assert_eq!(st(gemm(&pw, &a, 2, 4, None, &mut y, 2, &d)), Status::InvalidArgument); // ldy < n
    assert_eq!(st(gemm(&pw, &a, 3, 4, None, &mut y, 3, &d)), Status::InvalidArgument); // a too short
    assert_eq!(st(gemm(&pw, &a, 2, 4, Some(&[1.0]), &mut y, 3, &d)), Status::InvalidArgument); // bias length
    assert_eq!(st(gemm(&pw, &a, usize::MAX, 4, None, &mut y, 3, &d)), Status::SizeOverflow);
    let many = GemmOptions { num_threads: 100_000, ..d };
    assert_eq!(st(gemm(&pw, &a, 2, 4, None, &mut y, 3, &many)), Status::InvalidArgument);
    gemm(&pw, &[], 0, 4, None, &mut [], 3, &d).unwrap(); // empty batch
}

#[test]
fn concurrent_calls_on_one_handle() {
    let mut rng = Rng(16);
    let (m, n, k) = (16, 48, 96);
    let a = random(&mut rng, m * k, 1.0);
    let w = random(&mut rng, n * k, 1.0);
    let pw = std::sync::Arc::new(PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap());
    let want = run(&pw, &a, m, None, &opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (pw, a, want) = (pw.clone(), a.clone(), want.clone());
            std::thread::spawn(move || {
                for r in 0..50 {
                    let y =
                        run(&pw, &a, m, None, &opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1 + (t + r) % 3));
                    assert!(y.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn f16_and_bf16_inputs_and_outputs() {
    use half::{bf16, f16};
    let mut rng = Rng(17);
    for (m, n, k) in [(13, 37, 70), (5, 40, 1800)] {
        let a32: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
        let a16: Vec<f16> = a32.iter().map(|&v| f16::from_f32(v)).collect();
        let ab16: Vec<bf16> = a32.iter().map(|&v| bf16::from_f32(v)).collect();
        let w = random(&mut rng, n * k, 0.3);
        let bias = random(&mut rng, n, 1.0);
        for isa in isas_under_test() {
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            for ep in [Epilogue::None, Epilogue::Gelu] {
                let o = GemmOptions { epilogue: ep, num_threads: 2, ..Default::default() };
                // Widened input through the f32 path is the definition.
                let wide16: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
                let want = run(&pw, &wide16, m, Some(&bias), &o);
                let mut y32 = vec![0f32; m * n];
                dynq::gemm_typed(&pw, &a16, m, k, Some(&bias), &mut y32, n, &o).unwrap();
                assert!(y32.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{isa} f16 -> f32");
                let mut y16 = vec![f16::ZERO; m * n];
                dynq::gemm_typed(&pw, &a16, m, k, Some(&bias), &mut y16, n, &o).unwrap();
                assert!(
                    y16.iter().zip(&want).all(|(a, b)| a.to_bits() == f16::from_f32(*b).to_bits()),
                    "{isa} f16 -> f16"
                );
                let wideb: Vec<f32> = ab16.iter().map(|v| v.to_f32()).collect();
                let want = run(&pw, &wideb, m, Some(&bias), &o);
                let mut yb = vec![bf16::ZERO; (m - 1) * (n + 3) + n];
                dynq::gemm_typed(&pw, &ab16, m, k, Some(&bias), &mut yb, n + 3, &o).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        assert_eq!(
                            yb[i * (n + 3) + j].to_bits(),
                            bf16::from_f32(want[i * n + j]).to_bits(),
                            "{isa} bf16"
                        );
                    }
                }
            }
            let mut bad = a16.clone();
            bad[5] = f16::INFINITY;
            let mut y16 = vec![f16::ZERO; m * n];
            let e = dynq::gemm_typed(&pw, &bad, m, k, None, &mut y16, n, &GemmOptions::default()).unwrap_err();
            assert_eq!(e.status(), Status::NonFinite);
        }
    }
}

#[test]
fn parallel_quantization_reports_the_first_bad_row_and_matches_serial() {
    // Large enough for the activation quantization to be split between workers.
    let (m, n, k) = (64, 8, 2048);
    let mut rng = Rng(18);
    let w = random(&mut rng, n * k, 0.5);
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = random(&mut rng, m * k, 2.0);
    for (g, t) in all_modes() {
        let one = run(&pw, &a, m, None, &opts(g, t, 1));
        let two = run(&pw, &a, m, None, &opts(g, t, 2));
        assert!(one.iter().zip(&two).all(|(x, y)| x.to_bits() == y.to_bits()), "{g:?} {t:?}");
    }
    let mut bad = a.clone();
    bad[50 * k + 7] = f32::NAN;
    bad[10 * k + 3] = f32::INFINITY;
    for threads in [1, 2] {
        let mut y = vec![0f32; m * n];
        let e = gemm(&pw, &bad, m, k, None, &mut y, n, &opts(ActGranularity::PerRow, ActType::AsymmetricU8, threads))
            .unwrap_err();
        assert!(e.message().contains("A[10][3]"), "threads={threads}: {e}");
    }
}

/// A caller-owned executor for `gemm_typed_on`: runs the tasks on scoped threads in a scrambled
/// order (reverse, interleaved), or refuses. The result must be the bits of the pool's result
/// whatever the order and the worker count it claims, and a refusal must surface as an error
/// with `y` untouched.
struct Scrambled {
    workers: usize,
    refuse: bool,
    calls: std::sync::atomic::AtomicUsize,
}

impl dynq::Parallel for Scrambled {
    fn workers(&self) -> usize {
        self.workers
    }
    fn run(&self, _max: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> dynq::Result<()> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.refuse {
            return Err(dynq::Error::Internal("the test executor refuses".into()));
        }
        std::thread::scope(|s| {
            s.spawn(|| (0..tasks).rev().step_by(2).for_each(task));
            s.spawn(|| (0..tasks).rev().skip(1).step_by(2).for_each(task));
        });
        Ok(())
    }
}

#[test]
fn caller_owned_executor_gives_the_same_bits() {
    let mut rng = Rng(41);
    for isa in isas_under_test() {
        // All above 1M multiply-adds per worker, so that 2 workers are used.
        for &(m, n, k) in &[(1, 700, 3000), (64, 200, 300), (130, 96, 177)] {
            let a = random(&mut rng, m * k, 2.0);
            let w = random(&mut rng, n * k, 0.3);
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            for (g, t) in all_modes() {
                let o = opts(g, t, 1);
                let want = run(&pw, &a, m, None, &o);
                for workers in [1, 2, 7] {
                    let par = Scrambled { workers, refuse: false, calls: Default::default() };
                    let mut y = vec![0f32; m * n];
                    dynq::gemm_typed_on(&pw, &a, m, k, None, &mut y, n, &o, &par).unwrap();
                    assert!(y == want, "{isa} {m}x{n}x{k} {g:?} {t:?} workers {workers}");
                    if workers > 1 {
                        assert!(par.calls.into_inner() > 0, "the executor was used ({isa} {m}x{n}x{k})");
                    }
                }
                let par = Scrambled { workers: 2, refuse: true, calls: Default::default() };
                let mut y = vec![7f32; m * n];
                let e = dynq::gemm_typed_on(&pw, &a, m, k, None, &mut y, n, &o, &par).unwrap_err();
                assert_eq!(e.status(), Status::Internal, "{e:?}");
                assert!(y.iter().all(|&v| v == 7.0), "y written after a refusal");
            }
        }
    }
}

/// Smoothing factors: the product with `smooth` is, bit for bit, the product on A multiplied by
/// them beforehand (one f32 multiplication per element), on every ISA, mode, input type and
/// worker count; and bad factors are refused with y untouched.
#[test]
fn smoothing_factors_equal_premultiplied_activations() {
    let mut rng = Rng(77);
    for isa in isas_under_test() {
        for &(m, n, k) in &[(1, 96, 300), (37, 130, 257), (64, 200, 300)] {
            let a = random(&mut rng, m * k, 2.0);
            let w = random(&mut rng, n * k, 0.3);
            // Factors over four orders of magnitude, as SmoothQuant produces for outlier channels.
            let s: Vec<f32> = (0..k).map(|_| 10f32.powf(rng.f32() * 2.0)).collect();
            let pre: Vec<f32> = a.iter().enumerate().map(|(i, v)| v * s[i % k]).collect();
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let bias = random(&mut rng, n, 1.0);
            for (g, t) in all_modes() {
                let mut o = opts(g, t, 1);
                o.epilogue = Epilogue::Gelu;
                let want = run(&pw, &pre, m, Some(&bias), &o);
                for workers in [1, 2] {
                    let par = Scrambled { workers, refuse: false, calls: Default::default() };
                    let mut y = vec![0f32; m * n];
                    dynq::gemm_smoothed_on(&pw, &a, m, k, Some(&s), Some(&bias), &mut y, n, &o, &par).unwrap();
                    assert!(y == want, "{isa} {m}x{n}x{k} {g:?} {t:?} workers {workers}");
                }
                // f16 activations are widened exactly, then multiplied.
                let a16: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
                let pre16: Vec<f32> = a16.iter().enumerate().map(|(i, v)| v.to_f32() * s[i % k]).collect();
                let want16 = run(&pw, &pre16, m, Some(&bias), &o);
                let par = Scrambled { workers: 2, refuse: false, calls: Default::default() };
                let mut y = vec![0f32; m * n];
                dynq::gemm_smoothed_on(&pw, &a16, m, k, Some(&s), Some(&bias), &mut y, n, &o, &par).unwrap();
                assert!(y == want16, "f16 {isa} {m}x{n}x{k} {g:?} {t:?}");
            }
        }
    }
    // Refused: wrong length, zero, negative, NaN, infinite; and a product that overflows.
    let (m, n, k) = (3, 16, 8);
    let pw = PackedWeights::from_f32(&vec![0.5f32; n * k], n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = vec![1.0f32; m * k];
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    let pool = Scrambled { workers: 1, refuse: false, calls: Default::default() };
    let cases: Vec<(Vec<f32>, Status, &str)> = vec![
        (vec![1.0; k - 1], Status::InvalidArgument, "expected k = 8"),
        (vec![1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], Status::InvalidArgument, "[1] is 0"),
        (vec![1.0, 1.0, -2.0, 1.0, 1.0, 1.0, 1.0, 1.0], Status::InvalidArgument, "[2] is -2"),
        (vec![1.0, 1.0, 1.0, f32::NAN, 1.0, 1.0, 1.0, 1.0], Status::InvalidArgument, "[3] is NaN"),
        (vec![1.0, 1.0, 1.0, 1.0, f32::INFINITY, 1.0, 1.0, 1.0], Status::InvalidArgument, "[4] is inf"),
    ];
    for (s, status, msg) in cases {
        let mut y = vec![7f32; m * n];
        let e = dynq::gemm_smoothed_on(&pw, &a, m, k, Some(&s), None, &mut y, n, &o, &pool).unwrap_err();
        assert_eq!(e.status(), status, "{e}");
        assert!(e.message().contains(msg), "{e}");
        assert!(y.iter().all(|&v| v == 7.0), "y written after an error");
    }
    let mut big = a.clone();
    big[k + 5] = 3e38;
    let s = vec![2.0f32; k];
    let mut y = vec![7f32; m * n];
    let e = dynq::gemm_smoothed_on(&pw, &big, m, k, Some(&s), None, &mut y, n, &o, &pool).unwrap_err();
    assert_eq!(e.status(), Status::NonFinite, "{e}");
    assert!(e.message().contains("A[1][5]") && e.message().contains("overflows"), "{e}");
    assert!(y.iter().all(|&v| v == 7.0), "y written after an error");
}

/// All-ones smoothing factors are the identity: the same bits as no factors.
#[test]
fn all_ones_smoothing_equals_none() {
    let mut rng = Rng(78);
    let (m, n, k) = (9, 40, 70);
    let a = random(&mut rng, m * k, 2.0);
    let pw =
        PackedWeights::from_f32(&random(&mut rng, n * k, 0.3), n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    for (g, t) in all_modes() {
        let o = opts(g, t, 1);
        let want = run(&pw, &a, m, None, &o);
        let mut y = vec![0f32; m * n];
        dynq::gemm_smoothed_on(&pw, &a, m, k, Some(&vec![1.0; k]), None, &mut y, n, &o, &Scrambled::new(1)).unwrap();
        assert!(y == want, "{g:?} {t:?}");
    }
}

impl Scrambled {
    fn new(workers: usize) -> Self {
        Scrambled { workers, refuse: false, calls: Default::default() }
    }
}

/// A residual: `y = act(product + bias) + residual` is, bit for bit, the product without it
/// followed by one f32 addition per element; on every ISA, mode, epilogue, worker count, output
/// type and residual stride; partial tiles included. Non-finite residual values propagate to
/// their own element only; a short residual is refused with y untouched.
#[test]
fn residual_equals_product_then_addition() {
    use dynq::{Element, Fused, Residual};
    let mut rng = Rng(79);
    #[allow(clippy::too_many_arguments)]
    fn check<Y: Element>(
        pw: &PackedWeights,
        a: &[f32],
        m: usize,
        bias: &[f32],
        res32: &[f32],
        ldr: usize,
        o: &GemmOptions,
        what: &str,
    ) {
        let n = pw.n();
        let res: Vec<Y> = res32.iter().map(|&v| Y::from_f32(v)).collect();
        // Expected: the f32 result of the call without the residual, plus the widened residual,
        // then rounded to Y.
        let mut base = vec![0f32; m * n];
        gemm(pw, a, m, pw.k(), Some(bias), &mut base, n, o).unwrap();
        let want: Vec<Y> = (0..m * n).map(|e| Y::from_f32(base[e] + res[(e / n) * ldr + e % n].to_f32())).collect();
        for workers in [1, 2] {
            let ldy = n + 3;
            let mut y = vec![Y::from_f32(-9.0); m * ldy];
            let f = Fused {
                smooth: None,
                bias: Some(bias),
                residual: Some(Residual { data: &res, ld: ldr }),
                layer_norm: None,
                a_heads: None,
            };
            dynq::gemm_fused_on(pw, a, m, pw.k(), &f, &mut y, ldy, o, &Scrambled::new(workers)).unwrap();
            for i in 0..m {
                for j in 0..ldy {
                    let got = y[i * ldy + j].to_f32();
                    if j < n {
                        let w = want[i * n + j].to_f32();
                        assert!(got.to_bits() == w.to_bits(), "{what} workers {workers} [{i}][{j}]: {got} != {w}");
                    } else {
                        assert_eq!(got, -9.0, "{what}: padding written");
                    }
                }
            }
        }
    }
    for isa in isas_under_test() {
        for &(m, n, k) in &[(1, 16, 64), (13, 37, 100), (64, 200, 300)] {
            let a = random(&mut rng, m * k, 2.0);
            let pw = PackedWeights::from_f32(
                &random(&mut rng, n * k, 0.3),
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let bias = random(&mut rng, n, 1.0);
            for ldr in [n, n + 5] {
                let res = random(&mut rng, (m - 1) * ldr + n, 4.0);
                for (g, t) in all_modes() {
                    for ep in [Epilogue::None, Epilogue::Gelu] {
                        let o = GemmOptions { epilogue: ep, ..opts(g, t, 1) };
                        let what = format!("{isa} {m}x{n}x{k} ldr {ldr} {g:?} {t:?} {ep:?}");
                        check::<f32>(&pw, &a, m, &bias, &res, ldr, &o, &format!("f32 {what}"));
                        check::<half::f16>(&pw, &a, m, &bias, &res, ldr, &o, &format!("f16 {what}"));
                        check::<half::bf16>(&pw, &a, m, &bias, &res, ldr, &o, &format!("bf16 {what}"));
                    }
                }
            }
        }
    }
    // Non-finite residual values: IEEE addition, element by element.
    let (m, n, k) = (3, 20, 8);
    let pw = PackedWeights::from_f32(&vec![0.5f32; n * k], n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = vec![1.0f32; m * k];
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    let mut res = vec![1.0f32; m * n];
    res[n + 3] = f32::NAN;
    res[2 * n + 7] = f32::INFINITY;
    let mut y = vec![0f32; m * n];
    let f = Fused {
        smooth: None,
        bias: None,
        residual: Some(Residual { data: &res, ld: n }),
        layer_norm: None,
        a_heads: None,
    };
    dynq::gemm_fused_on(&pw, &a, m, k, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap();
    let base = run(&pw, &a, m, None, &o);
    for e in 0..m * n {
        match e {
            e if e == n + 3 => assert!(y[e].is_nan()),
            e if e == 2 * n + 7 => assert_eq!(y[e], f32::INFINITY),
            _ => assert_eq!(y[e], base[e] + 1.0),
        }
    }
    // Too short for m rows at stride ld: refused, y untouched.
    let mut y = vec![7f32; m * n];
    let f = Fused {
        smooth: None,
        bias: None,
        residual: Some(Residual { data: &res[..m * n - 1], ld: n }),
        layer_norm: None,
        a_heads: None,
    };
    let e = dynq::gemm_fused_on(&pw, &a, m, k, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
    assert!(e.message().contains("residual"), "{e}");
    assert!(y.iter().all(|&v| v == 7.0), "y written after an error");
    // A stride below n is refused too.
    let f = Fused {
        smooth: None,
        bias: None,
        residual: Some(Residual { data: &res, ld: n - 1 }),
        layer_norm: None,
        a_heads: None,
    };
    let e = dynq::gemm_fused_on(&pw, &a, m, k, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap_err();
    assert_eq!(e.status(), Status::InvalidArgument, "{e}");
}

/// A layer norm: `y = LayerNorm(act(product + bias) + residual)` is, bit for bit, the call
/// without it followed by `layer_norm_reference` on each stored row (widened to f32, rounded
/// back to the output type); on every ISA, mode, worker count and output type, with the rows
/// normalized inside the tile loop (blocks spanning all panels) or in a pass after it (wide N,
/// or N split over workers); stride padding is left alone; bad parameters are refused with y
/// untouched.
#[test]
fn layer_norm_equals_product_then_reference_normalization() {
    use dynq::{layer_norm_reference, Element, Fused, LayerNorm, Residual};
    let mut rng = Rng(83);
    #[allow(clippy::too_many_arguments)]
    fn check<Y: Element>(
        pw: &PackedWeights,
        a: &[f32],
        m: usize,
        bias: &[f32],
        res32: &[f32],
        ln: &LayerNorm<'_>,
        o: &GemmOptions,
        what: &str,
    ) {
        let n = pw.n();
        let res: Vec<Y> = res32.iter().map(|&v| Y::from_f32(v)).collect();
        let mut base = vec![Y::from_f32(0.0); m * n];
        let f = Fused { bias: Some(bias), residual: Some(Residual { data: &res, ld: n }), ..Default::default() };
        dynq::gemm_fused_on(pw, a, m, pw.k(), &f, &mut base, n, o, &Scrambled::new(1)).unwrap();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            let mut row: Vec<f32> = base[i * n..(i + 1) * n].iter().map(|v| v.to_f32()).collect();
            layer_norm_reference(&mut row, ln);
            for j in 0..n {
                want[i * n + j] = Y::from_f32(row[j]).to_f32();
            }
        }
        for workers in [1, 2, 3] {
            let ldy = n + 3;
            let mut y = vec![Y::from_f32(-9.0); m * ldy];
            let f = Fused {
                bias: Some(bias),
                residual: Some(Residual { data: &res, ld: n }),
                layer_norm: Some(*ln),
                ..Default::default()
            };
            dynq::gemm_fused_on(pw, a, m, pw.k(), &f, &mut y, ldy, o, &Scrambled::new(workers)).unwrap();
            for i in 0..m {
                for j in 0..ldy {
                    let got = y[i * ldy + j].to_f32();
                    if j < n {
                        let w = want[i * n + j];
                        assert!(got.to_bits() == w.to_bits(), "{what} workers {workers} [{i}][{j}]: {got} != {w}");
                    } else {
                        assert_eq!(got, -9.0, "{what}: padding written");
                    }
                }
            }
        }
    }
    for isa in isas_under_test() {
        for &(m, n, k) in &[(1, 16, 64), (13, 37, 100), (64, 200, 300), (40, 500, 64)] {
            let a = random(&mut rng, m * k, 2.0);
            let pw = PackedWeights::from_f32(
                &random(&mut rng, n * k, 0.3),
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let bias = random(&mut rng, n, 1.0);
            let res = random(&mut rng, m * n, 4.0);
            let gamma = random(&mut rng, n, 2.0);
            let beta = random(&mut rng, n, 1.0);
            for (g, t) in all_modes() {
                for (ep, b) in [(Epilogue::None, Some(&beta[..])), (Epilogue::Gelu, None)] {
                    let ln = LayerNorm { gamma: &gamma, beta: b, epsilon: 1e-5 };
                    let o = GemmOptions { epilogue: ep, ..opts(g, t, 1) };
                    let what = format!("{isa} {m}x{n}x{k} {g:?} {t:?} {ep:?} beta {}", b.is_some());
                    check::<f32>(&pw, &a, m, &bias, &res, &ln, &o, &format!("f32 {what}"));
                    check::<half::f16>(&pw, &a, m, &bias, &res, &ln, &o, &format!("f16 {what}"));
                    check::<half::bf16>(&pw, &a, m, &bias, &res, &ln, &o, &format!("bf16 {what}"));
                }
            }
        }
    }
    // The rows come out normalized: mean ~ 0 and variance ~ 1 with gamma 1 and no beta.
    let (m, n, k) = (5, 96, 32);
    let pw =
        PackedWeights::from_f32(&random(&mut rng, n * k, 0.5), n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = random(&mut rng, m * k, 3.0);
    let ones = vec![1.0f32; n];
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    let mut y = vec![0f32; m * n];
    let f =
        Fused::<f32> { layer_norm: Some(LayerNorm { gamma: &ones, beta: None, epsilon: 0.0 }), ..Default::default() };
    dynq::gemm_fused_on(&pw, &a, m, k, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap();
    for row in y.chunks(n) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "mean {mean} var {var}");
    }
    // Bad parameters: refused, y untouched.
    let short = vec![1.0f32; n - 1];
    let mut nan = ones.clone();
    nan[7] = f32::NAN;
    for (ln, status) in [
        (LayerNorm { gamma: &short, beta: None, epsilon: 1e-5 }, Status::InvalidArgument),
        (LayerNorm { gamma: &ones, beta: Some(&short), epsilon: 1e-5 }, Status::InvalidArgument),
        (LayerNorm { gamma: &nan, beta: None, epsilon: 1e-5 }, Status::NonFinite),
        (LayerNorm { gamma: &ones, beta: Some(&nan), epsilon: 1e-5 }, Status::NonFinite),
        (LayerNorm { gamma: &ones, beta: None, epsilon: -1.0 }, Status::InvalidArgument),
        (LayerNorm { gamma: &ones, beta: None, epsilon: f32::NAN }, Status::InvalidArgument),
    ] {
        let mut y = vec![7f32; m * n];
        let f = Fused::<f32> { layer_norm: Some(ln), ..Default::default() };
        let e = dynq::gemm_fused_on(&pw, &a, m, k, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap_err();
        assert_eq!(e.status(), status, "{e}");
        assert!(e.message().contains("layer norm"), "{e}");
        assert!(y.iter().all(|&v| v == 7.0), "y written after an error");
    }
}

/// A in the attention-head layout (`Fused::a_heads`): bit for bit the call on the transposed
/// copy `[batch, seq, heads * d]`, on every ISA, mode, worker count and A type, with smoothing
/// factors, a residual and a layer norm too; bad layouts refused with y untouched.
#[test]
fn a_in_head_layout_equals_the_transposed_copy() {
    use dynq::{Element, Fused, Heads, LayerNorm, Residual};
    let mut rng = Rng(84);
    #[allow(clippy::too_many_arguments)]
    fn check<A: Element>(
        pw: &PackedWeights,
        ctx32: &[f32],
        (b, h, s): (usize, usize, usize),
        smooth: Option<&[f32]>,
        res: &[f32],
        gamma: &[f32],
        o: &GemmOptions,
        what: &str,
    ) {
        let (k, n) = (pw.k(), pw.n());
        let d = k / h;
        let m = b * s;
        let ctx: Vec<A> = ctx32.iter().map(|&v| A::from_f32(v)).collect();
        // The transposed copy: row b * s + t = ctx[b][0][t][..] ++ ctx[b][1][t][..] ++ ...
        let mut plain = Vec::with_capacity(m * k);
        for bb in 0..b {
            for t in 0..s {
                for hh in 0..h {
                    let at = ((bb * h + hh) * s + t) * d;
                    plain.extend_from_slice(&ctx[at..at + d]);
                }
            }
        }
        let ln = LayerNorm { gamma, beta: None, epsilon: 1e-5 };
        for (with_res, with_ln) in [(false, false), (true, false), (true, true)] {
            let f = |heads| Fused::<f32> {
                smooth,
                residual: with_res.then_some(Residual { data: res, ld: n }),
                layer_norm: with_ln.then_some(ln),
                a_heads: heads,
                ..Default::default()
            };
            let mut want = vec![0f32; m * n];
            dynq::gemm_fused_on(pw, &plain, m, k, &f(None), &mut want, n, o, &Scrambled::new(1)).unwrap();
            for workers in [1, 2, 3] {
                let mut y = vec![-9f32; m * n];
                let heads = Some(Heads { heads: h, seq: s, transposed: false });
                dynq::gemm_fused_on(pw, &ctx, m, 0, &f(heads), &mut y, n, o, &Scrambled::new(workers)).unwrap();
                let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{what} residual {with_res} ln {with_ln} workers {workers}: differs from the transposed copy"
                );
            }
        }
    }
    for isa in isas_under_test() {
        for &(b, h, s, d, n) in &[(1, 1, 1, 8, 16), (2, 12, 9, 32, 40), (3, 4, 13, 24, 100)] {
            let k = h * d;
            let pw = PackedWeights::from_f32(
                &random(&mut rng, n * k, 0.3),
                n,
                k,
                WeightLayout::NK,
                PackOptions { isa: Some(isa), ..Default::default() },
            )
            .unwrap();
            let ctx = random(&mut rng, b * h * s * d, 2.0);
            let smooth: Vec<f32> = (0..k).map(|j| 0.5 + (j % 7) as f32 * 0.25).collect();
            let res = random(&mut rng, b * s * n, 3.0);
            let gamma = random(&mut rng, n, 1.0);
            for (g, t) in all_modes() {
                let o = opts(g, t, 1);
                for sm in [None, Some(&smooth[..])] {
                    let what = format!("{isa} {b}x{h}x{s}x{d} n {n} {g:?} {t:?} smooth {}", sm.is_some());
                    check::<f32>(&pw, &ctx, (b, h, s), sm, &res, &gamma, &o, &format!("f32 {what}"));
                    check::<half::f16>(&pw, &ctx, (b, h, s), sm, &res, &gamma, &o, &format!("f16 {what}"));
                }
            }
        }
    }
    // Bad layouts: refused, y untouched.
    let (h, s, d, n) = (4, 5, 8, 16);
    let k = h * d;
    let pw =
        PackedWeights::from_f32(&random(&mut rng, n * k, 0.3), n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let ctx = random(&mut rng, 2 * s * k, 1.0);
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    for (heads, m, len, needle) in [
        (Heads { heads: h, seq: s, transposed: true }, 2 * s, ctx.len(), "transposed = false"),
        (Heads { heads: 3, seq: s, transposed: false }, 2 * s, ctx.len(), "do not split into 3 heads"),
        (Heads { heads: h, seq: 3, transposed: false }, 2 * s, ctx.len(), "not whole sequences of 3"),
        (Heads { heads: h, seq: s, transposed: false }, 2 * s, ctx.len() - 1, "needs"),
        (Heads { heads: 0, seq: s, transposed: false }, 2 * s, ctx.len(), "must be positive"),
    ] {
        let mut y = vec![7f32; m * n];
        let f = Fused::<f32> { a_heads: Some(heads), ..Default::default() };
        let e = dynq::gemm_fused_on(&pw, &ctx[..len], m, 0, &f, &mut y, n, &o, &Scrambled::new(1)).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{e}");
        assert!(e.message().contains(needle) && e.message().contains("activations A"), "{e}");
        assert!(y.iter().all(|&v| v == 7.0), "y written after an error");
    }
}

/// Several outputs: each segment of columns is, bit for bit, those columns of the single-output
/// call, whatever the widths (not multiples of the kernel's panel width, straddling panels, a
/// single column), the output type, the strides and the worker count; stride padding is left
/// alone; bad widths and a residual are refused with every output untouched.
#[test]
fn split_outputs_equal_column_slices_of_one_output() {
    use dynq::{Element, SplitOut};
    let mut rng = Rng(81);
    fn check<Y: Element>(pw: &PackedWeights, a: &[f32], m: usize, bias: &[f32], widths: &[usize], o: &GemmOptions) {
        let n = pw.n();
        let mut whole = vec![Y::from_f32(0.0); m * n];
        dynq::gemm_typed(pw, a, m, pw.k(), Some(bias), &mut whole, n, o).unwrap();
        for workers in [1, 2] {
            let mut bufs: Vec<(Vec<Y>, usize)> =
                widths.iter().map(|&c| (vec![Y::from_f32(-9.0); m * (c + 2)], c + 2)).collect();
            let mut outs: Vec<SplitOut<'_, Y>> =
                bufs.iter_mut().zip(widths).map(|((y, ld), &cols)| SplitOut::rows(y, *ld, cols)).collect();
            dynq::gemm_split_on(pw, a, m, pw.k(), None, Some(bias), &mut outs, o, &Scrambled::new(workers)).unwrap();
            let mut j0 = 0;
            for ((y, ld), &cols) in bufs.iter().zip(widths) {
                for i in 0..m {
                    for j in 0..*ld {
                        let got = y[i * ld + j].to_f32();
                        if j < cols {
                            let want = whole[i * n + j0 + j].to_f32();
                            assert!(
                                got.to_bits() == want.to_bits(),
                                "widths {widths:?} [{i}][{}]: {got} != {want}",
                                j0 + j
                            );
                        } else {
                            assert_eq!(got, -9.0, "widths {widths:?}: padding written");
                        }
                    }
                }
                j0 += cols;
            }
        }
    }
    for isa in isas_under_test() {
        let (m, k) = (37, 70);
        let n = 150;
        let a = random(&mut rng, m * k, 2.0);
        let pw = PackedWeights::from_f32(
            &random(&mut rng, n * k, 0.3),
            n,
            k,
            WeightLayout::NK,
            PackOptions { isa: Some(isa), ..Default::default() },
        )
        .unwrap();
        let bias = random(&mut rng, n, 1.0);
        for widths in [vec![150], vec![50, 50, 50], vec![5, 40, 105], vec![1, 149], vec![48, 48, 48, 6], vec![149, 1]] {
            for (g, t) in all_modes() {
                let o = GemmOptions { epilogue: Epilogue::Gelu, ..opts(g, t, 1) };
                check::<f32>(&pw, &a, m, &bias, &widths, &o);
                check::<half::f16>(&pw, &a, m, &bias, &widths, &o);
            }
        }
    }
    // Refused, outputs untouched.
    let (m, n, k) = (3, 20, 8);
    let pw = PackedWeights::from_f32(&vec![0.5f32; n * k], n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = vec![1.0f32; m * k];
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    for (widths, msg) in
        [(vec![10, 9], "add up to n = 20"), (vec![20, 0], "must be positive"), (vec![10, 11], "add up")]
    {
        let mut bufs: Vec<Vec<f32>> = widths.iter().map(|&c| vec![7f32; m * c.max(1)]).collect();
        let mut outs: Vec<SplitOut<'_, f32>> =
            bufs.iter_mut().zip(&widths).map(|(y, &cols)| SplitOut::rows(y, cols.max(1), cols)).collect();
        let e = dynq::gemm_split_on(&pw, &a, m, k, None, None, &mut outs, &o, &Scrambled::new(1)).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{e}");
        assert!(e.message().contains(msg), "{e}");
        assert!(bufs.iter().flatten().all(|&v| v == 7.0), "output written after an error");
    }
    let mut y0 = vec![7f32; m * 10];
    let mut y1 = vec![7f32; m * 10 - 1];
    let mut outs = [SplitOut::rows(&mut y0, 10, 10), SplitOut::rows(&mut y1, 10, 10)];
    let e = dynq::gemm_split_on(&pw, &a, m, k, None, None, &mut outs, &o, &Scrambled::new(1)).unwrap_err();
    assert!(e.message().contains("output 1"), "{e}");
    assert!(y0.iter().chain(&y1).all(|&v| v == 7.0), "output written after an error");
}

/// The attention-head layouts: every element of the product lands, bit for bit, where the
/// reshape to [batch, seq, heads, d] and the transpose to [batch, heads, seq, d] (or [batch,
/// heads, d, seq]) would put it; for sequences that do not fill whole row tiles, heads narrower
/// or wider than a panel or not a multiple of a vector, f32 and f16, 1 and 2 workers, a single
/// output and several (Q, K and V side by side with their own layouts, or next to a plain one);
/// bad layouts are refused with the output untouched.
#[test]
fn head_layouts_equal_the_transposed_product() {
    use dynq::{Element, Heads, SplitOut};
    let mut rng = Rng(83);
    // Where row i, column j (of a segment of `cols` columns) goes.
    fn place(h: &Heads, cols: usize, i: usize, j: usize) -> usize {
        let dh = cols / h.heads;
        let (b, s, hh, e) = (i / h.seq, i % h.seq, j / dh, j % dh);
        if h.transposed {
            ((b * h.heads + hh) * dh + e) * h.seq + s
        } else {
            ((b * h.heads + hh) * h.seq + s) * dh + e
        }
    }
    #[allow(clippy::too_many_arguments)]
    fn check<Y: Element>(
        pw: &PackedWeights,
        a: &[f32],
        m: usize,
        bias: &[f32],
        widths: &[usize],
        layouts: &[Option<Heads>],
        o: &GemmOptions,
    ) {
        let n = pw.n();
        let mut whole = vec![Y::from_f32(0.0); m * n];
        dynq::gemm_typed(pw, a, m, pw.k(), Some(bias), &mut whole, n, o).unwrap();
        for workers in [1, 2] {
            let mut bufs: Vec<Vec<Y>> = widths.iter().map(|&c| vec![Y::from_f32(-9.0); m * c]).collect();
            let mut outs: Vec<SplitOut<'_, Y>> = bufs
                .iter_mut()
                .zip(widths.iter().zip(layouts))
                .map(|(y, (&cols, h))| SplitOut { y, ldy: cols, cols, heads: *h })
                .collect();
            dynq::gemm_split_on(pw, a, m, pw.k(), None, Some(bias), &mut outs, o, &Scrambled::new(workers)).unwrap();
            let mut j0 = 0;
            for ((y, &cols), h) in bufs.iter().zip(widths).zip(layouts) {
                let mut seen = vec![false; m * cols];
                for i in 0..m {
                    for j in 0..cols {
                        let p = h.as_ref().map_or(i * cols + j, |h| place(h, cols, i, j));
                        assert!(!seen[p], "{h:?}: two elements at {p}");
                        seen[p] = true;
                        let (got, want) = (y[p].to_f32(), whole[i * n + j0 + j].to_f32());
                        assert!(
                            got.to_bits() == want.to_bits(),
                            "{h:?} widths {widths:?} [{i}][{}]: {got} != {want}",
                            j0 + j
                        );
                    }
                }
                j0 += cols;
            }
        }
    }
    for isa in isas_under_test() {
        let k = 70;
        for (m, seq) in [(26, 13), (24, 8), (5, 5), (36, 4), (7, 1)] {
            let a = random(&mut rng, m * k, 2.0);
            for (widths, heads) in [
                (vec![96], vec![3]),
                (vec![60], vec![5]),
                (vec![128], vec![2]),
                (vec![36, 36, 36], vec![3, 3, 3]),
                (vec![64, 64, 64], vec![2, 4, 1]),
                // Heads of 16 and 32 beside a segment that starts off the 16-column grid, and
                // a last panel with fewer columns.
                (vec![40, 64, 96], vec![5, 2, 6]),
                (vec![96, 32], vec![3, 2]),
            ] {
                let n: usize = widths.iter().sum();
                let pw = PackedWeights::from_f32(
                    &random(&mut rng, n * k, 0.3),
                    n,
                    k,
                    WeightLayout::NK,
                    PackOptions { isa: Some(isa), ..Default::default() },
                )
                .unwrap();
                let bias = random(&mut rng, n, 1.0);
                for pattern in 0..3usize {
                    // All [b, h, s, d]; all [b, h, d, s]; mixed with a plain output.
                    let layouts: Vec<Option<Heads>> = heads
                        .iter()
                        .enumerate()
                        .map(|(g, &hd)| match pattern {
                            0 => Some(Heads { heads: hd, seq, transposed: false }),
                            1 => Some(Heads { heads: hd, seq, transposed: true }),
                            _ if g == 1 => None,
                            _ => Some(Heads { heads: hd, seq, transposed: g % 2 == 0 }),
                        })
                        .collect();
                    for (g, t) in all_modes() {
                        let o = GemmOptions { epilogue: Epilogue::Gelu, ..opts(g, t, 1) };
                        check::<f32>(&pw, &a, m, &bias, &widths, &layouts, &o);
                        check::<half::f16>(&pw, &a, m, &bias, &widths, &layouts, &o);
                    }
                }
            }
        }
    }
    // Refused, output untouched.
    let (m, n, k) = (6, 12, 8);
    let pw = PackedWeights::from_f32(&vec![0.5f32; n * k], n, k, WeightLayout::NK, PackOptions::default()).unwrap();
    let a = vec![1.0f32; m * k];
    let o = opts(ActGranularity::PerRow, ActType::AsymmetricU8, 1);
    for (heads, seq, len, msg) in [
        (0, 3, m * n, "must be positive"),
        (2, 0, m * n, "must be positive"),
        (5, 3, m * n, "do not split into 5 heads"),
        (2, 4, m * n, "not whole sequences of 4"),
        (2, 3, m * n - 1, "needs 72"),
    ] {
        let mut y = vec![7f32; len];
        let mut outs = [SplitOut { y: &mut y, ldy: n, cols: n, heads: Some(Heads { heads, seq, transposed: false }) }];
        let e = dynq::gemm_split_on(&pw, &a, m, k, None, None, &mut outs, &o, &Scrambled::new(1)).unwrap_err();
        assert_eq!(e.status(), Status::InvalidArgument, "{e}");
        assert!(e.message().contains(msg), "{msg}: {e}");
        assert!(y.iter().all(|&v| v == 7.0), "output written after an error");
    }
}

/// On AVX-512 VNNI CPUs without AVX-VNNI, the AVX-VNNI kernel's code runs as its EVEX twin
/// (`kernels::stand_in_for`, what `dynq bench --isa avx_vnni` measures there): through the
/// whole GEMM (its 16-column panels, the AVX2 `u8` row operations and their pipelined
/// quantization), every mode, epilogue and thread count gives the scalar kernel's bits.
#[test]
fn avx_vnni_stand_in_gemm_is_bit_identical() {
    let Some(twin) = dynq::kernels::stand_in_for(Isa::AvxVnni) else {
        eprintln!("SKIPPED: no stand-in for avx_vnni here (the CPU has AVX-VNNI itself, or lacks AVX-512 VNNI)");
        return;
    };
    // The real AVX-VNNI entry is refused on this CPU; the twin is accepted.
    let err = dynq::pack::Reservation::for_kernel(4, 4, dynq::kernels::kernel_for(Isa::AvxVnni).unwrap()).err();
    assert_eq!(err.map(|e| e.status()), Some(Status::Unsupported));
    let mut rng = Rng(77);
    for &(m, n, k) in &[(1, 1, 1), (7, 33, 65), (13, 50, 300), (130, 40, 77), (6, 16, 1000)] {
        let a = random(&mut rng, m * k, 3.0);
        let w = random(&mut rng, n * k, 0.5);
        let bias = random(&mut rng, n, 1.0);
        let scalar = PackedWeights::from_f32(
            &w,
            n,
            k,
            WeightLayout::NK,
            PackOptions { isa: Some(Isa::Scalar), ..Default::default() },
        )
        .unwrap();
        let pw = dynq::pack::Reservation::for_kernel(n, k, twin)
            .unwrap()
            .fill_f32(&w, WeightLayout::NK, WeightGranularity::PerChannel, 127)
            .unwrap();
        assert_eq!(pw.kernel().name, twin.name);
        assert_eq!(pw.quantized_weights(), scalar.quantized_weights());
        for (g, t) in all_modes() {
            for ep in Epilogue::ALL {
                let o = GemmOptions { epilogue: ep, ..opts(g, t, 1) };
                let want = run(&scalar, &a, m, Some(&bias), &o);
                for threads in [1, 2, 3] {
                    let got = run(&pw, &a, m, Some(&bias), &GemmOptions { num_threads: threads, ..o });
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{} threads={threads} {m}x{n}x{k} {g:?} {t:?} {ep:?} differs from scalar", twin.name);
                }
            }
        }
    }
}
