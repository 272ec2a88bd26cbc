//! Differential GEMM: the same product on every ISA path this CPU has, against the plain
//! reference, with identical results required.
//!
//! The fuzzer chooses the shape (biased to tile edges), strides, zero points, value
//! distributions (extremes, constants, outliers, tiny and huge magnitudes), scales, options
//! and thread counts; the bulk values come from a generator seeded by the input.
//!
//! For every ISA that `dynq::isa::resolve` accepts, the weights are `PackedWeights::repack`ed
//! and:
//! - `dynq::gemm_i32` must equal `dynq::reference::gemm_i64` exactly (stride padding untouched);
//! - `dynq::gemm` (and `gemm_typed` with f16/bf16) must equal, bit for bit, the documented
//!   definition evaluated on the reference integers: activations quantized by the scalar
//!   definitions, `gemm_i64`, then `dynq::gemm::dequantize_row`;
//! - serialize + deserialize for that ISA must give the same weights.

#![no_main]

use dynq::gemm::dequantize_row;
use dynq::kernels::DequantRow;
use dynq::quant::activations::quantize_activations;
use dynq::{
    gemm, gemm_i32, gemm_typed, reference, ActGranularity, ActType, Epilogue, GemmOptions, Isa, PackOptions,
    PackedWeights, WeightLayout,
};
use half::{bf16, f16};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A dimension biased towards the tile edges of the kernels (MR, NR, KR are 4..32).
fn dim(u: &mut Unstructured, max: usize) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => u.int_in_range(1..=8)?,
        1 => [1, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65][u.choose_index(21)?].min(max),
        2 => u.int_in_range(1..=max.min(70))?,
        _ => u.int_in_range(1..=max)?,
    })
}

fn f32_values(u: &mut Unstructured, rng: &mut Rng, len: usize) -> Result<Vec<f32>> {
    let scale = [1e-30f32, 1e-6, 1e-3, 1.0, 1.0, 3.0, 1e3, 1e20, 1e38, f32::MAX][u.choose_index(10)?];
    let kind = u.int_in_range(0u8..=6)?;
    let mut v: Vec<f32> = (0..len)
        .map(|_| match kind {
            0 => rng.unit() * scale,
            1 => rng.unit().abs() * scale,                    // one-sided (after ReLU)
            2 => -(rng.unit().abs() * scale),                 // one-sided negative
            3 => [0.0, scale, -scale][rng.below(3) as usize], // extremes and zeros
            4 => scale,                                       // constant
            5 => {
                if rng.below(8) == 0 {
                    rng.unit() * scale
                } else {
                    0.0
                }
            } // sparse
            _ => f32::from_bits(rng.below(1 << 23) as u32) * if rng.below(2) == 0 { 1.0 } else { -1.0 }, // subnormal
        })
        .collect();
    if len > 0 && u.arbitrary::<bool>()? {
        let i = u.choose_index(len)?;
        v[i] = [f32::MAX, -f32::MAX, 1e30, -1e-38, f32::MIN_POSITIVE][u.choose_index(5)?];
    }
    Ok(v)
}

fn run(u: &mut Unstructured) -> Result<()> {
    let isas: Vec<Isa> = Isa::ALL.iter().copied().filter(|i| dynq::isa::resolve(*i).is_ok()).collect();
    let m = dim(u, 40)?;
    let n = dim(u, 80)?;
    // Mostly short K (the tile edges are at KR = 2 or 4); sometimes a long one on a small tile.
    let long_k = u.int_in_range(0u8..=15)? == 15;
    let k = if long_k { u.int_in_range(1..=4100)? } else { dim(u, 200)? };
    let (m, n) = if long_k { (m.min(5), n.min(40)) } else { (m, n) };
    let lda = k + u.int_in_range(0..=3)?;
    let ldo = n + u.int_in_range(0..=3)?;
    let mut rng = Rng(u.arbitrary::<u64>()? | 1);
    let threads = [1usize, 2, 3, 0][u.choose_index(4)?];

    // ---- integer part ----
    // (The kind is matched outside the loops: comparisons in hot loops cost libFuzzer time.)
    let qa_len = (m - 1) * lda + k;
    let qa: Vec<u8> = match u.int_in_range(0u8..=3)? {
        0 => (0..qa_len).map(|_| rng.next() as u8).collect(),
        1 => (0..qa_len).map(|_| ((rng.next() & 1) * 255) as u8).collect(),
        2 => vec![255; qa_len],
        _ => vec![0; qa_len],
    };
    let qw: Vec<i8> = match u.int_in_range(0u8..=5)? {
        0 => (0..n * k).map(|_| rng.next() as i8).collect(),
        1 => (0..n * k).map(|_| ((rng.next() & 1) * 255) as u8 as i8 ^ -128).collect(), // -128 or 127
        2 => vec![-128; n * k],
        3 => vec![127; n * k],
        // Narrow weights (|w| <= 64, every K pair within 128), which AVX2 runs with its
        // narrow-weight kernel: random, or +-64 (pair sums of +-32640 against activations 255).
        4 => (0..n * k).map(|_| (rng.below(129) as i32 - 64) as i8).collect(),
        _ => (0..n * k).map(|_| if rng.next() & 1 == 0 { 64 } else { -64 }).collect(),
    };
    let za: Vec<i32> = (0..m)
        .map(|_| match rng.below(6) {
            0 => 0,
            1 => 1,
            2 => 127,
            3 => 128,
            4 => 255,
            _ => rng.below(256) as i32,
        })
        .collect();
    let per_tensor = u.arbitrary::<bool>()?;
    let scales: Vec<f32> = f32_values(u, &mut rng, if per_tensor { 1 } else { n })?.iter().map(|s| s.abs()).collect();
    let scalar = PackedWeights::from_quantized(
        &qw,
        n,
        k,
        WeightLayout::NK,
        &scales,
        PackOptions { isa: Some(Isa::Scalar), ..Default::default() },
    )
    .expect("valid quantized weights");
    let want_i = reference::gemm_i64(&qa, m, k, lda, &za, &qw, n);
    let packed: Vec<PackedWeights> = isas.iter().map(|&isa| scalar.repack(isa).expect("resolved ISA")).collect();
    // The expected output buffer, stride padding included (untouched).
    let mut want_out = vec![i32::MIN; (m - 1) * ldo + n];
    for i in 0..m {
        for j in 0..n {
            want_out[i * ldo + j] = want_i[i * n + j] as i32;
        }
    }
    for pw in &packed {
        let mut out = vec![i32::MIN; (m - 1) * ldo + n];
        gemm_i32(pw, &qa, m, lda, &za, &mut out, ldo, threads).expect("gemm_i32");
        if out != want_out {
            let i = out.iter().zip(&want_out).position(|(a, b)| a != b).unwrap();
            panic!("{} gemm_i32 {m}x{n}x{k} ldo={ldo}: element {i} is {}, expected {}", pw.isa(), out[i], want_out[i]);
        }
        let back =
            PackedWeights::deserialize(&pw.serialize(), PackOptions { isa: Some(pw.isa()), ..Default::default() })
                .expect("round trip");
        assert_eq!(back.quantized_weights(), qw);
        assert_eq!(back.col_sums(), scalar.col_sums());
    }

    // ---- f32 path ----
    let a = f32_values(u, &mut rng, (m - 1) * lda + k)?;
    let bias = if u.arbitrary::<bool>()? { Some(f32_values(u, &mut rng, n)?) } else { None };
    let g = if u.arbitrary::<bool>()? { ActGranularity::PerRow } else { ActGranularity::PerTensor };
    let t = if u.arbitrary::<bool>()? { ActType::AsymmetricU8 } else { ActType::SymmetricI8 };
    let act = Epilogue::ALL[u.choose_index(Epilogue::ALL.len())?];
    let opts = GemmOptions { act_granularity: g, act_type: t, epilogue: act, num_threads: threads };

    // The definition, on the reference integers.
    let expect_for = |a: &[f32]| -> Vec<f32> {
        let q = quantize_activations(a, m, k, lda, g, t, k, m).expect("finite activations");
        let raw = reference::gemm_i64(&q.data, m, k, k, &vec![0; m], &qw, n);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            let row = DequantRow {
                za: q.zero_points[i],
                sa: q.scales[i],
                col_sums: scalar.col_sums(),
                scales: scalar.scales(),
                bias: bias.as_deref(),
                act,
            };
            let acc: Vec<i32> = raw[i * n..(i + 1) * n].iter().map(|&v| v as i32).collect();
            dequantize_row(&row, &acc, &mut y[i * n..(i + 1) * n]);
        }
        y
    };
    let want = expect_for(&a);
    let ldy = n + u.int_in_range(0..=2)?;
    let pad = 0x7fc0_deadu32;
    let mut want_y = vec![pad; (m - 1) * ldy + n];
    for i in 0..m {
        for j in 0..n {
            want_y[i * ldy + j] = want[i * n + j].to_bits();
        }
    }
    for pw in &packed {
        let mut y = vec![f32::from_bits(pad); (m - 1) * ldy + n];
        gemm(pw, &a, m, lda, bias.as_deref(), &mut y, ldy, &opts).expect("gemm");
        let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
        if got != want_y {
            let i = got.iter().zip(&want_y).position(|(a, b)| a != b).unwrap();
            panic!(
                "{} gemm {m}x{n}x{k} ldy={ldy} {opts:?}: element {i} is {:#x}, expected {:#x} (padding {pad:#x})",
                pw.isa(),
                got[i],
                want_y[i]
            );
        }
    }

    // ---- f16 / bf16 activations and outputs (widened exactly, rounded once) ----
    if u.arbitrary::<bool>()? {
        let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
        let a16 = if a16.iter().all(|v| v.is_finite()) {
            a16
        } else {
            a.iter().map(|&v| f16::from_f32(v.clamp(-60000.0, 60000.0))).collect()
        };
        let wide: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
        let want16 = expect_for(&wide);
        for pw in &packed {
            let mut yb = vec![bf16::ZERO; m * n];
            gemm_typed(pw, &a16, m, lda, bias.as_deref(), &mut yb, n, &opts).expect("gemm_typed f16 -> bf16");
            let got: Vec<u16> = yb.iter().map(|v| v.to_bits()).collect();
            let exp: Vec<u16> = want16.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            assert!(got == exp, "{} f16 -> bf16 differs from the definition", pw.isa());
            let ab: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            if ab.iter().all(|v| v.is_finite()) {
                let wantb = expect_for(&ab.iter().map(|v| v.to_f32()).collect::<Vec<_>>());
                let mut yh = vec![f16::ZERO; m * n];
                gemm_typed(pw, &ab, m, lda, bias.as_deref(), &mut yh, n, &opts).expect("gemm_typed bf16 -> f16");
                let got: Vec<u16> = yh.iter().map(|v| v.to_bits()).collect();
                let exp: Vec<u16> = wantb.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                assert!(got == exp, "{} bf16 -> f16 differs from the definition", pw.isa());
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
