//! The same inputs give the same output bits on every CPU, not only on every kernel of one CPU:
//! a digest of the outputs of a fixed set of calls (every activation mode, weight granularity,
//! epilogue, smoothing, residual, layer norm, f16 and bf16), computed with every ISA this CPU
//! runs, must equal the digest recorded here. `tests/gemm.rs` proves the ISAs of one machine
//! agree; this test ties the machines together: the recorded values were computed on an AMD
//! Zen 3 (AVX2, scalar; for weights of at most 64 in magnitude, AVX2 with its narrow-weight
//! kernel), and CI runs it on x86 CPUs with AVX-512 VNNI, under qemu-aarch64 on three NEON
//! models and under qemu-s390x (big-endian, scalar kernels). A change that alters results anywhere (a rounding step, a reordered sum, a
//! different erf) changes a digest and must update it on purpose.

mod common;

use common::isas_under_test;
use dynq::{
    gemm_fused, ActGranularity, ActType, Element, Epilogue, Fused, GemmOptions, Isa, LayerNorm, PackOptions,
    PackedWeights, Residual, WeightGranularity, WeightLayout,
};
use half::{bf16, f16};

/// The digest of every call below, for every ISA, with 8-bit weights.
const RECORDED: u64 = 0x32c8112773d59ca5;
/// The same with weights quantized to at most 64 in magnitude (`weight_qmax` 64: the AVX2
/// narrow-weight kernel's weights).
const RECORDED_QMAX64: u64 = 0x0574b76b7ed2c274;

/// Values that are exact in f32 on every platform (multiples of 2^-8 in [-4, 4]), from a 64-bit
/// linear congruential generator.
struct Exact(u64);
impl Exact {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % 2049) as f32 / 256.0 - 4.0
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| self.next() * scale).collect()
    }
}

/// FNV-1a over 32-bit words.
struct Digest(u64);
impl Digest {
    fn add(&mut self, word: u32) {
        for b in word.to_le_bytes() {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

fn bits<Y: Element>(v: Y) -> u32 {
    // f16 and bf16 widen to f32 exactly, so the f32 bits name the value.
    v.to_f32().to_bits()
}

/// The call with activations and outputs of type `T` (A rounded to `T`, bias only), folded in.
fn typed<T: Element>(pw: &PackedWeights, a: &[f32], m: usize, bias: &[f32], opts: &GemmOptions, d: &mut Digest) {
    let (n, k) = (pw.n(), pw.k());
    let at: Vec<T> = a.iter().map(|&v| T::from_f32(v)).collect();
    let mut y = vec![T::from_f32(0.0); m * n];
    gemm_fused(pw, &at, m, k, &Fused { bias: Some(bias), ..Default::default() }, &mut y, n, opts).unwrap();
    y.iter().for_each(|&v| d.add(bits(v)));
}

/// All calls with the weights quantized to [-qmax, qmax] and packed for `isa`, folded into one
/// digest.
fn digest(isa: Isa, qmax: u8) -> u64 {
    let mut d = Digest(0xcbf2_9ce4_8422_2325);
    let mut x = Exact(2026);
    for &(m, n, k) in &[(1, 37, 300), (7, 100, 129), (13, 48, 777), (30, 64, 64)] {
        let a = x.vec(m * k, 1.0);
        let w = x.vec(n * k, 0.05);
        let bias = x.vec(n, 0.5);
        let smooth: Vec<f32> = x.vec(k, 0.1).iter().map(|v| v.abs() + 0.25).collect();
        let residual = x.vec(m * n, 1.0);
        let gamma = x.vec(n, 0.5);
        let beta = x.vec(n, 0.5);
        for wg in [WeightGranularity::PerChannel, WeightGranularity::PerTensor] {
            let pw = PackedWeights::from_f32(
                &w,
                n,
                k,
                WeightLayout::NK,
                PackOptions { granularity: wg, isa: Some(isa), weight_qmax: qmax },
            )
            .unwrap();
            for g in [ActGranularity::PerRow, ActGranularity::PerTensor] {
                for t in [ActType::AsymmetricU8, ActType::SymmetricI8] {
                    for (e, ep) in Epilogue::ALL.into_iter().enumerate() {
                        let opts = GemmOptions { act_granularity: g, act_type: t, epilogue: ep, num_threads: 1 };
                        // Each call adds one fused input more, cycling with the epilogue (the
                        // epilogues added later, the tanh GELU, SiLU and QuickGELU, with the
                        // smoothing only).
                        let mut y = vec![0f32; m * n];
                        let fused = Fused {
                            bias: Some(&bias),
                            smooth: (e >= 1).then_some(&smooth[..]),
                            residual: (e == 2).then_some(Residual { data: &residual[..], ld: n }),
                            layer_norm: (e == 2).then_some(LayerNorm {
                                gamma: &gamma,
                                beta: Some(&beta),
                                epsilon: 1e-5,
                            }),
                            a_heads: None,
                        };
                        gemm_fused(&pw, &a, m, k, &fused, &mut y, n, &opts).unwrap();
                        y.iter().for_each(|&v| d.add(bits(v)));
                        // Half-precision activations and outputs.
                        typed::<f16>(&pw, &a, m, &bias, &opts, &mut d);
                        typed::<bf16>(&pw, &a, m, &bias, &opts, &mut d);
                    }
                }
            }
        }
    }
    d.0
}

#[test]
fn outputs_are_the_recorded_bits_on_every_cpu() {
    for isa in isas_under_test() {
        for (qmax, recorded) in [(127, RECORDED), (64, RECORDED_QMAX64)] {
            let got = digest(isa, qmax);
            assert_eq!(
                got,
                recorded,
                "{isa}, weight_qmax {qmax}: output digest {got:#018x}, recorded {recorded:#018x} (on {}): \
                 results differ from the machine that recorded them",
                std::env::consts::ARCH
            );
        }
    }
}
