//! The scalar core, the serialization code and the C ABI shell on small inputs: fast enough
//! for Miri, which checks every access of this code for undefined behaviour (out of bounds,
//! use after free, invalid values, misalignment, and the aliasing rules of references, also
//! across the GEMM's worker threads). Runs in plain `cargo test` too.
//!
//! `scripts/miri.sh` runs it with `cargo miri test`, together with the library's unit tests.
//! Under Miri no SIMD ISA is detected, so everything below runs the scalar kernel; the weights
//! are packed for `Isa::Scalar` explicitly so that the test means the same natively.

use dynq::ffi::*;
use dynq::gemm::dequantize_row;
use dynq::kernels::DequantRow;
use dynq::quant::activations::quantize_activations;
use dynq::{
    gemm, gemm_i32, gemm_typed, reference, ActGranularity, ActType, Epilogue, GemmOptions, Isa, PackOptions,
    PackedWeights, Status, WeightGranularity, WeightLayout,
};
use std::ptr::{null, null_mut};

const SCALAR: PackOptions =
    PackOptions { granularity: WeightGranularity::PerChannel, isa: Some(Isa::Scalar), weight_qmax: 127 };

fn values(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1 << 23) as f32 - 1.0
        })
        .collect()
}

/// The documented definition on the reference integers.
#[allow(clippy::too_many_arguments)]
fn definition(
    pw: &PackedWeights,
    a: &[f32],
    m: usize,
    lda: usize,
    bias: Option<&[f32]>,
    g: ActGranularity,
    t: ActType,
    act: Epilogue,
) -> Vec<f32> {
    let (n, k) = (pw.n(), pw.k());
    let q = quantize_activations(a, m, k, lda, g, t, k, m).unwrap();
    let raw = reference::gemm_i64(&q.data, m, k, k, &vec![0; m], &pw.quantized_weights(), n);
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        let row = DequantRow {
            za: q.zero_points[i],
            sa: q.scales[i],
            col_sums: pw.col_sums(),
            scales: pw.scales(),
            bias,
            act,
        };
        let acc: Vec<i32> = raw[i * n..(i + 1) * n].iter().map(|&v| v as i32).collect();
        dequantize_row(&row, &acc, &mut y[i * n..(i + 1) * n]);
    }
    y
}

#[test]
fn scalar_gemm_matches_definition_around_tile_edges() {
    // Scalar tile: MR = 4, NR = 8, KR = 4.
    let shapes = [(1, 1, 1), (3, 7, 3), (4, 8, 4), (5, 9, 5), (2, 17, 9)];
    for (si, &(m, n, k)) in shapes.iter().enumerate() {
        let lda = k + si % 2;
        let ldy = n + 1;
        let a = values((m - 1) * lda + k, si as u32 + 1);
        let w = values(n * k, si as u32 + 100);
        let bias = values(n, si as u32 + 200);
        let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, SCALAR).unwrap();
        for (mi, (g, t, act)) in [
            (ActGranularity::PerRow, ActType::AsymmetricU8, Epilogue::None),
            (ActGranularity::PerTensor, ActType::SymmetricI8, Epilogue::Relu),
            (ActGranularity::PerRow, ActType::SymmetricI8, Epilogue::Gelu),
        ]
        .into_iter()
        .enumerate()
        {
            let with_bias = mi != 1;
            let b = with_bias.then_some(&bias[..]);
            let want = definition(&pw, &a, m, lda, b, g, t, act);
            // Two threads: tiles of one call written from two workers (n > NR gives several).
            let threads = if n > 8 { 2 } else { 1 };
            let opts = GemmOptions { act_granularity: g, act_type: t, epilogue: act, num_threads: threads };
            let mut y = vec![f32::from_bits(0x7fc0_dead); (m - 1) * ldy + n];
            gemm(&pw, &a, m, lda, b, &mut y, ldy, &opts).unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert_eq!(y[i * ldy + j].to_bits(), want[i * n + j].to_bits(), "{m}x{n}x{k} ({i},{j})");
                }
                if i + 1 < m {
                    assert_eq!(y[i * ldy + n].to_bits(), 0x7fc0_dead, "stride padding written");
                }
            }
            // f16 activations, bf16 output: widened exactly, rounded once.
            let a16: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
            let wide: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
            let want16 = definition(&pw, &wide, m, lda, b, g, t, act);
            let mut yb = vec![half::bf16::ZERO; m * n];
            gemm_typed(&pw, &a16, m, lda, b, &mut yb, n, &opts).unwrap();
            for (got, w) in yb.iter().zip(&want16) {
                assert_eq!(got.to_bits(), half::bf16::from_f32(*w).to_bits());
            }
        }
    }
}

/// The residual and the split outputs, under Miri: the residual rows read beside the tiles,
/// segments written straight and through the scratch tile (a tile across a boundary), from two
/// workers, f32 and bf16 outputs.
#[test]
fn residual_and_split_outputs() {
    use dynq::{Fused, Residual, SplitOut};
    let (m, n, k) = (5, 19, 6);
    let a = values(m * k, 7);
    let w = values(n * k, 8);
    let bias = values(n, 9);
    let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, SCALAR).unwrap();
    let opts = GemmOptions { num_threads: 2, ..GemmOptions::default() };
    let mut base = vec![0f32; m * n];
    gemm(&pw, &a, m, k, Some(&bias), &mut base, n, &opts).unwrap();
    // Residual at a stride above n.
    let ldr = n + 2;
    let res = values((m - 1) * ldr + n, 10);
    let mut y = vec![0f32; m * n];
    let f = Fused {
        smooth: None,
        bias: Some(&bias),
        residual: Some(Residual { data: &res, ld: ldr }),
        layer_norm: None,
        a_heads: None,
    };
    dynq::gemm::gemm_fused(&pw, &a, m, k, &f, &mut y, n, &opts).unwrap();
    for i in 0..m {
        for j in 0..n {
            assert_eq!(y[i * n + j].to_bits(), (base[i * n + j] + res[i * ldr + j]).to_bits());
        }
    }
    let res16: Vec<half::bf16> = res.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let mut yb = vec![half::bf16::ZERO; m * n];
    let f = Fused {
        smooth: None,
        bias: Some(&bias),
        residual: Some(Residual { data: &res16, ld: ldr }),
        layer_norm: None,
        a_heads: None,
    };
    dynq::gemm::gemm_fused(&pw, &a, m, k, &f, &mut yb, n, &opts).unwrap();
    for i in 0..m {
        for j in 0..n {
            let want = half::bf16::from_f32(base[i * n + j] + res16[i * ldr + j].to_f32());
            assert_eq!(yb[i * n + j].to_bits(), want.to_bits());
        }
    }
    // Split 3 + 10 + 6: with NR = 8 the first two tiles of a row straddle the boundaries.
    let widths = [3usize, 10, 6];
    let mut bufs: Vec<Vec<f32>> = widths.iter().map(|&c| vec![0f32; m * c]).collect();
    let mut outs: Vec<SplitOut<'_, f32>> =
        bufs.iter_mut().zip(widths).map(|(y, cols)| SplitOut::rows(y, cols, cols)).collect();
    dynq::gemm_split(&pw, &a, m, k, None, Some(&bias), &mut outs, &opts).unwrap();
    let mut j0 = 0;
    for (buf, cols) in bufs.iter().zip(widths) {
        for i in 0..m {
            for j in 0..cols {
                assert_eq!(buf[i * cols + j].to_bits(), base[i * n + j0 + j].to_bits());
            }
        }
        j0 += cols;
    }
    // Head layouts (m = 6: two sequences of 3; n = 18: 3 heads of 6, or 2 of 9), plain and
    // transposed, from two workers: every element at its place, none written twice.
    let (m, n) = (6, 18);
    let a = values(m * k, 11);
    let pw = PackedWeights::from_f32(&values(n * k, 12), n, k, WeightLayout::NK, SCALAR).unwrap();
    let mut base = vec![0f32; m * n];
    gemm(&pw, &a, m, k, None, &mut base, n, &opts).unwrap();
    // (1 head of 18: the first two 8-column tiles of a 3-row sequence are written straight.)
    for (heads, transposed) in [(3, false), (2, true), (1, false)] {
        let mut y = vec![f32::NAN; m * n];
        let mut outs =
            [SplitOut { y: &mut y, ldy: n, cols: n, heads: Some(dynq::Heads { heads, seq: 3, transposed }) }];
        dynq::gemm_split(&pw, &a, m, k, None, None, &mut outs, &opts).unwrap();
        let d = n / heads;
        for i in 0..m {
            for j in 0..n {
                let (b, s, h, e) = (i / 3, i % 3, j / d, j % d);
                let p = if transposed { ((b * heads + h) * d + e) * 3 + s } else { ((b * heads + h) * 3 + s) * d + e };
                assert_eq!(y[p].to_bits(), base[i * n + j].to_bits());
            }
        }
    }
}

#[test]
fn scalar_integer_gemm_matches_reference() {
    for &(m, n, k) in &[(1, 1, 1), (5, 9, 7), (4, 16, 8)] {
        let qa: Vec<u8> = (0..m * k).map(|i| (i * 37 % 256) as u8).collect();
        let qw: Vec<i8> = (0..n * k).map(|i| (i * 91 % 256) as u8 as i8).collect();
        let za: Vec<i32> = (0..m).map(|i| [0, 1, 127, 128, 255][i % 5]).collect();
        let pw = PackedWeights::from_quantized(&qw, n, k, WeightLayout::NK, &[0.5], SCALAR).unwrap();
        let mut out = vec![0i32; m * n];
        gemm_i32(&pw, &qa, m, k, &za, &mut out, n, 1).unwrap();
        let want = reference::gemm_i64(&qa, m, k, k, &za, &qw, n);
        assert!(out.iter().zip(&want).all(|(a, b)| *a as i64 == *b));
    }
}

#[test]
fn serialization_round_trip_and_damage() {
    for (n, k, per_tensor) in [(1, 1, true), (3, 5, false), (9, 4, true)] {
        let w = values(n * k, (n * k) as u32);
        let gran = if per_tensor { WeightGranularity::PerTensor } else { WeightGranularity::PerChannel };
        let pw =
            PackedWeights::from_f32(&w, n, k, WeightLayout::KN, PackOptions { granularity: gran, ..SCALAR }).unwrap();
        let blob = pw.serialize();
        let back = PackedWeights::deserialize(&blob, SCALAR).unwrap();
        assert_eq!(back.serialize(), blob, "n={n} k={k} per_tensor={per_tensor}");
        assert_eq!(back.granularity(), gran);
        // A sample of damage (the library's unit test flips every bit of a small blob).
        for byte in (0..blob.len()).step_by(7) {
            let mut b = blob.clone();
            b[byte] ^= 0x10;
            assert_eq!(PackedWeights::deserialize(&b, SCALAR).unwrap_err().status(), Status::CorruptData);
        }
        for len in [0, 1, 27, 28, 48, blob.len() - 1] {
            assert_eq!(PackedWeights::deserialize(&blob[..len], SCALAR).unwrap_err().status(), Status::CorruptData);
        }
    }
}

/// The C ABI shell: raw pointers turned into slices, handles boxed and freed, configs read
/// through `struct_size`, messages copied into caller buffers.
#[test]
fn c_abi_calls() {
    unsafe {
        let (n, k, m) = (9usize, 6usize, 5usize);
        let w = values(n * k, 7);
        let mut cfg = std::mem::zeroed::<dynq_pack_config>();
        assert_eq!(dynq_pack_config_init_sized(&mut cfg, std::mem::size_of::<dynq_pack_config>()), Status::Ok);
        cfg.isa = Isa::Scalar.to_raw();
        let mut p = null_mut();
        assert_eq!(dynq_pack_weights(w.as_ptr(), n, k, 1, &cfg, &mut p), Status::Ok);

        let mut info = std::mem::zeroed::<dynq_packed_weights_info>();
        info.struct_size = std::mem::size_of::<dynq_packed_weights_info>() as u32;
        assert_eq!(dynq_packed_weights_get_info(p, &mut info), Status::Ok);
        assert_eq!((info.n, info.k, info.isa), (n, k, Isa::Scalar.to_raw()));

        // GEMM, f32 and f16 -> f32, with a bias, on two threads.
        let mut gc = std::mem::zeroed::<dynq_gemm_config>();
        assert_eq!(dynq_gemm_config_init(&mut gc), Status::Ok);
        gc.num_threads = 2;
        gc.epilogue = 2;
        let a = values(m * k, 8);
        let bias = values(n, 9);
        let mut y = vec![0f32; m * n];
        assert_eq!(dynq_gemm(p, a.as_ptr(), m, k, bias.as_ptr(), y.as_mut_ptr(), n, &gc), Status::Ok);
        let a16: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
        let mut y2 = vec![0f32; m * n];
        let st =
            dynq_gemm_ex(p, a16.as_ptr() as *const _, 1, m, k, bias.as_ptr(), y2.as_mut_ptr() as *mut _, 0, n, &gc);
        assert_eq!(st, Status::Ok);

        // Serialize (size query, too small, exact), deserialize, compare.
        let mut need = 0usize;
        assert_eq!(dynq_packed_weights_serialize(p, null_mut(), 0, &mut need), Status::Ok);
        let mut blob = vec![0u8; need];
        let mut written = 0usize;
        assert_eq!(dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need - 1, &mut written), Status::BufferTooSmall);
        assert_eq!(dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need, &mut written), Status::Ok);
        let mut p2 = null_mut();
        assert_eq!(dynq_packed_weights_deserialize(blob.as_ptr(), need, &cfg, &mut p2), Status::Ok);
        let mut y3 = vec![0f32; m * n];
        assert_eq!(dynq_gemm(p2, a.as_ptr(), m, k, bias.as_ptr(), y3.as_mut_ptr(), n, &gc), Status::Ok);
        assert!(y.iter().zip(&y3).all(|(a, b)| a.to_bits() == b.to_bits()));

        // Refusals, and the message copied into small buffers.
        let mis = (a.as_ptr() as *const u8).add(1) as *const f32;
        assert_eq!(dynq_gemm(p, mis, m, k, null(), y.as_mut_ptr(), n, &gc), Status::InvalidArgument);
        let overlap = y.as_mut_ptr();
        assert_eq!(dynq_gemm(p, overlap, 1, k, null(), overlap.add(2), n, &gc), Status::InvalidArgument);
        blob[20] ^= 1;
        let mut p3 = std::ptr::dangling_mut::<dynq_packed_weights>();
        assert_eq!(dynq_packed_weights_deserialize(blob.as_ptr(), need, null(), &mut p3), Status::CorruptData);
        assert!(p3.is_null());
        let len = dynq_last_error_message(null_mut(), 0);
        let mut small = [0x55 as std::ffi::c_char; 6];
        assert_eq!(dynq_last_error_message(small.as_mut_ptr(), 4), len);
        assert_eq!(small[3], 0);
        assert_eq!(small[4], 0x55);
        assert!(!dynq_status_str(99).is_null());

        dynq_packed_weights_free(p2);
        dynq_packed_weights_free(p);
        dynq_packed_weights_free(null_mut());
    }
}
