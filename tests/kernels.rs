//! The integer part of every kernel of every ISA this CPU has equals the plain reference
//! exactly: micro-kernels called directly on guard-page buffers, and the whole integer GEMM
//! over shapes around every tile edge, zero points {0, 1, 127, 128, 255} and extreme values.

mod common;

use common::{isas_under_test, GuardBuf, Rng};
use dynq::kernels::{kernel_for, F32Tile, TileOut};
use dynq::{gemm_i32, reference, PackOptions, PackedWeights, WeightLayout, MAX_K};

fn pack_q(q: &[i8], n: usize, k: usize, isa: dynq::Isa) -> PackedWeights {
    PackedWeights::from_quantized(
        q,
        n,
        k,
        WeightLayout::NK,
        &[1.0],
        PackOptions { isa: Some(isa), ..Default::default() },
    )
    .unwrap()
}

/// Every table kernel this CPU runs (with the narrow-weight entries), plus test-only twins (the
/// AVX-VNNI kernel's logic compiled with the AVX-512 VL encoding) when their instructions are
/// available.
fn micro_kernels_under_test() -> Vec<dynq::kernels::Kernel> {
    #[allow(unused_mut)]
    let mut v: Vec<dynq::kernels::Kernel> = isas_under_test()
        .into_iter()
        .map(|isa| kernel_for(isa).unwrap())
        .flat_map(|k| std::iter::once(*k).chain(k.narrow.copied()))
        .collect();
    #[cfg(target_arch = "x86_64")]
    {
        let twin = dynq::kernels::avx_vnni::evex_twin();
        if dynq::isa::resolve(twin.isa).is_ok() {
            v.push(twin);
        } else {
            eprintln!("SKIPPED: {} (needs {})", twin.name, twin.isa);
        }
    }
    v
}

#[test]
fn micro_kernels_exact_on_guard_pages() {
    let mut rng = Rng(1);
    for kern in micro_kernels_under_test() {
        // Every row count a call may take (`stream_mr`: up to 2 * MR for AVX-512's tall
        // tiles, whose K chunks of 128 groups 200 and 257 groups cross).
        let (mr, nr, kr, ab) = (kern.stream_mr, kern.nr, kern.kr, kern.a_bytes);
        for groups in [1, 2, 3, 7, 16, 33, 200, 257] {
            let kp = groups * kr;
            for mr_eff in 1..=mr {
                for stride_pad in [0, 1, kr] {
                    let stride = (kp + stride_pad) * ab;
                    let mut a = GuardBuf::<u8>::new((mr_eff - 1) * stride + kp * ab, 0);
                    // Activations are u8 values, stored in `ab` bytes each (little-endian).
                    a.as_mut_slice().chunks_exact_mut(ab).for_each(|v| v[0] = rng.u8());
                    let mut b = GuardBuf::<i8>::new(kp * nr, 0);
                    match kern.weight_pair_limit {
                        None => b.as_mut_slice().iter_mut().for_each(|v| *v = rng.i8()),
                        // Pairs (adjacent in every panel layout) within the kernel's limit.
                        Some(limit) => b.as_mut_slice().chunks_mut(2).for_each(|p| {
                            let (x, y) = narrow_pair(&mut rng, limit);
                            p[0] = x;
                            if p.len() > 1 {
                                p[1] = y;
                            }
                        }),
                    }
                    let mut c = GuardBuf::<i32>::new(mr * nr, 0x5555_5555);
                    // SAFETY: buffers of exactly the sizes the contract requires; ISA resolved.
                    unsafe {
                        (kern.ukernel)(mr_eff, kp, a.as_ptr(), stride, b.as_ptr(), &TileOut::I32(c.as_mut_ptr()))
                    };
                    // Unpack the panel to canonical [NR][kp] and compare with the reference.
                    let mut qw = vec![0i8; nr * kp];
                    (kern.unpack)(b.as_slice(), nr, kp, &mut qw);
                    let rows: Vec<u8> = (0..mr_eff)
                        .flat_map(|i| {
                            a.as_slice()[i * stride..i * stride + kp * ab]
                                .iter()
                                .step_by(ab)
                                .copied()
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    // The raw accumulators are sum (a - a_shift) * w (see Kernel::a_shift).
                    let want = reference::gemm_i64(&rows, mr_eff, kp, kp, &vec![kern.a_shift; mr_eff], &qw, nr);
                    let got: Vec<i64> = c.as_slice()[..mr_eff * nr].iter().map(|&v| v as i64).collect();
                    assert_eq!(got, want, "{} kp={kp} rows={mr_eff} stride={stride}", kern.name);
                    assert!(c.as_slice()[mr_eff * nr..].iter().all(|&v| v == 0x5555_5555), "rows past mr written");

                    // The fused f32 epilogue, for full and partial panels, equals the scalar
                    // definition applied to the reference integers, bit for bit; y ends at a
                    // guard page and its stride padding is untouched.
                    for cols in [nr, nr - 1, 1 + rng.below(nr)] {
                        let ldy = cols + rng.below(3);
                        let za: Vec<i32> = (0..mr_eff).map(|_| rng.u8() as i32).collect();
                        let sa: Vec<f32> = (0..mr_eff).map(|_| rng.f32().abs() * 0.01).collect();
                        let cs: Vec<i32> = (0..cols).map(|_| rng.below(20000) as i32 - 10000).collect();
                        let sw: Vec<f32> = (0..cols).map(|_| rng.f32().abs() * 0.02).collect();
                        let bias: Vec<f32> = (0..cols).map(|_| rng.f32()).collect();
                        use dynq::Epilogue::{Gelu, GeluTanh, None as Plain, QuickGelu, Relu, Silu};
                        // The residual ends at a guard page too: the kernels' masked loads must
                        // not read past a partial panel's columns.
                        let ldr = cols + rng.below(3);
                        let mut res = GuardBuf::<f32>::new((mr_eff - 1) * ldr + cols, 0.0);
                        for v in res.as_mut_slice() {
                            *v = rng.f32() * 4.0;
                        }
                        for (use_bias, act, use_res) in [
                            (false, Plain, false),
                            (true, Plain, false),
                            (true, Relu, false),
                            (false, Relu, false),
                            (true, Gelu, false),
                            (false, Gelu, false),
                            (true, Plain, true),
                            (false, Relu, true),
                            (true, Gelu, true),
                            (true, GeluTanh, false),
                            (false, GeluTanh, true),
                            (true, Silu, false),
                            (false, QuickGelu, true),
                        ] {
                            let mut y = GuardBuf::<f32>::new((mr_eff - 1) * ldy + cols, f32::from_bits(0x7fc0_dead));
                            let ft = F32Tile {
                                za: &za,
                                sa: &sa,
                                col_sums: &cs,
                                scales: &sw,
                                bias: use_bias.then_some(&bias[..]),
                                act,
                                y: y.as_mut_ptr(),
                                ldy,
                                blocks16: None,
                                residual: use_res.then(|| (res.as_slice().as_ptr(), ldr)),
                                prefetch_l2: &[],
                                // A hint only: the results are the same either way.
                                stream_l2: use_bias,
                            };
                            // SAFETY: as above; y holds mr_eff rows of cols at stride ldy.
                            unsafe { (kern.ukernel)(mr_eff, kp, a.as_ptr(), stride, b.as_ptr(), &TileOut::F32(&ft)) };
                            for i in 0..mr_eff {
                                let acc: Vec<i32> = want[i * nr..i * nr + cols].iter().map(|&v| v as i32).collect();
                                let mut expect = vec![0f32; cols];
                                dynq::gemm::dequantize_row(&ft.row(i), &acc, &mut expect);
                                if use_res {
                                    // One f32 addition after the activation.
                                    let r = &res.as_slice()[i * ldr..i * ldr + cols];
                                    expect.iter_mut().zip(r).for_each(|(e, r)| *e += *r);
                                }
                                let row = &y.as_slice()[i * ldy..(i * ldy + ldy).min(y.as_slice().len())];
                                for (j, v) in row.iter().enumerate() {
                                    let got = v.to_bits();
                                    if j < cols {
                                        assert_eq!(
                                            got,
                                            expect[j].to_bits(),
                                            "{} f32 row {i} col {j} cols={cols}",
                                            kern.name
                                        );
                                    } else {
                                        assert_eq!(got, 0x7fc0_dead, "{} wrote stride padding", kern.name);
                                    }
                                }
                            }
                            if use_res || cols > 16 * dynq::kernels::MAX_BLOCKS16 {
                                continue;
                            }
                            // The same tile with each run of 16 columns at its own place (the
                            // head layout): the same bits there, each run ending at a guard page.
                            let ldb = 16 + rng.below(3);
                            let runs = cols.div_ceil(16);
                            let mut blocks: Vec<GuardBuf<f32>> = (0..runs)
                                .map(|b| {
                                    GuardBuf::new(
                                        (mr_eff - 1) * ldb + (cols - 16 * b).min(16),
                                        f32::from_bits(0x7fc0_dead),
                                    )
                                })
                                .collect();
                            let mut ptrs = [std::ptr::null_mut(); dynq::kernels::MAX_BLOCKS16];
                            for (p, blk) in ptrs.iter_mut().zip(blocks.iter_mut()) {
                                *p = blk.as_mut_ptr();
                            }
                            let ft = F32Tile { y: ptrs[0], ldy: ldb, blocks16: Some(ptrs), residual: None, ..ft };
                            // SAFETY: each run's buffer holds mr_eff rows of its columns at stride ldb.
                            unsafe { (kern.ukernel)(mr_eff, kp, a.as_ptr(), stride, b.as_ptr(), &TileOut::F32(&ft)) };
                            for (bk, blk) in blocks.iter().enumerate() {
                                let len = (cols - 16 * bk).min(16);
                                for (p, v) in blk.as_slice().iter().enumerate() {
                                    let (i, j) = (p / ldb, p % ldb);
                                    let want = if j < len {
                                        y.as_slice()[i * ldy + 16 * bk + j].to_bits()
                                    } else {
                                        0x7fc0_dead
                                    };
                                    assert_eq!(
                                        v.to_bits(),
                                        want,
                                        "{} blocks16 run {bk} row {i} col {j} cols={cols}",
                                        kern.name
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A weight pair with `|x| + |y| <= limit`: half of them on the limit itself (both signs,
/// lopsided or even, `-128` included), the others random within it.
fn narrow_pair(rng: &mut Rng, limit: u32) -> (i8, i8) {
    let limit = limit.min(256) as usize;
    let x = rng.below(limit + 1);
    let y = if rng.u8() & 1 == 0 { limit - x } else { rng.below(limit - x + 1) };
    // int8 reaches -128 but only +127: a magnitude of 128 is negative.
    let mut signed = |v: usize| if v >= 128 || rng.u8() & 1 == 1 { -(v.min(128) as i32) } else { v as i32 };
    (signed(x) as i8, signed(y) as i8)
}

/// Weights whose K pairs `(2j, 2j + 1)` of each row are all within `limit`, so that an ISA's
/// narrow-weight kernel takes them (`n` rows of `k`).
fn narrow_weights(rng: &mut Rng, n: usize, k: usize, limit: u32) -> Vec<i8> {
    let mut q = vec![0i8; n * k];
    for row in q.chunks_mut(k) {
        for p in row.chunks_mut(2) {
            let (x, y) = narrow_pair(rng, limit);
            p[0] = x;
            if p.len() > 1 {
                p[1] = y;
            }
        }
    }
    q
}

/// Weights within 128 per K pair (e.g. quantized to at most 64 in magnitude) run each ISA's
/// narrow-weight kernel where it has one (AVX2), picked by packing, and the integer GEMM equals
/// the reference exactly around every tile edge and at the extremes: every activation 255
/// with every pair on the limit (`vpmaddubsw` pair sums of +-32640, one step from saturation).
#[test]
fn integer_gemm_exact_with_narrow_weights() {
    let mut rng = Rng(5);
    let limit = 128;
    let mut narrow_ran = 0;
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        let expect_kernel = kern.narrow.unwrap_or(kern).name;
        for m in [1, 2, 5, 6, 7, 13] {
            for n in [1, 15, 16, 17, 33] {
                for k in [1, 2, 3, 4, 5, 7, 8, 9, 64, 257] {
                    let qa: Vec<u8> = (0..m * k).map(|i| if i % 3 == 0 { 255 } else { rng.u8() }).collect();
                    let za: Vec<i32> = (0..m).map(|i| [0, 1, 127, 128, 255][(i + n + k) % 5]).collect();
                    let qw = narrow_weights(&mut rng, n, k, limit);
                    let w = pack_q(&qw, n, k, isa);
                    assert_eq!(w.kernel().name, expect_kernel, "{isa} {m}x{n}x{k}");
                    let mut out = vec![0i32; m * n];
                    gemm_i32(&w, &qa, m, k, &za, &mut out, n, 1).unwrap();
                    let want = reference::gemm_i64(&qa, m, k, k, &za, &qw, n);
                    assert!(out.iter().zip(&want).all(|(a, b)| *a as i64 == *b), "{isa} {m}x{n}x{k}");
                }
            }
        }
        let (n, k) = (kern.nr + 1, 4096);
        for (a_val, pair) in [
            (255u8, (64i8, 64i8)),
            (255, (-64, -64)),
            (255, (-128, 0)),
            (255, (127, 1)),
            (255, (1, 127)),
            (255, (-100, -28)),
        ] {
            let qw: Vec<i8> = (0..n * k).map(|i| if i % 2 == 0 { pair.0 } else { pair.1 }).collect();
            let w = pack_q(&qw, n, k, isa);
            assert_eq!(w.kernel().name, expect_kernel);
            let mut out = vec![0i32; 2 * n];
            gemm_i32(&w, &vec![a_val; 2 * k], 2, k, &[0, 0], &mut out, n, 1).unwrap();
            let want = a_val as i64 * (pair.0 as i64 + pair.1 as i64) * (k / 2) as i64;
            assert!(out.iter().all(|&v| v as i64 == want), "{isa} a={a_val} pair={pair:?}: {} != {want}", out[0]);
        }
        narrow_ran += (kern.narrow.is_some()) as usize;
    }
    eprintln!("narrow-weight kernels run: {narrow_ran}");
}

/// Packing picks a narrow-weight kernel only for weights it is exact for: one pair past the
/// limit anywhere keeps the ISA's own kernel (whose results are still exact); forcing the narrow kernel on such weights is
/// refused; forcing the ISA's own kernel on narrow weights is honoured; serialized and loaded
/// again, or repacked, narrow weights get the narrow kernel back.
#[test]
fn narrow_kernel_only_for_weights_within_its_limit() {
    let mut rng = Rng(6);
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        let Some(nk) = kern.narrow else { continue };
        let limit = nk.weight_pair_limit.expect("a narrow entry has a limit");
        let (n, k) = (37, 301);
        let qw = narrow_weights(&mut rng, n, k, limit);
        assert_eq!(pack_q(&qw, n, k, isa).kernel().name, nk.name);
        // One pair past the limit, at each end and in the middle (the odd K's last value
        // pairs with the padding: 129 alone is past it too).
        // One pair past the limit (100 + 29), in the first, a middle and the last full pair.
        for (row, pair) in [(0, 0), (n / 2, k / 4), (n - 1, k / 2 - 1)] {
            let mut bad = qw.clone();
            bad[row * k + 2 * pair] = 100;
            bad[row * k + 2 * pair + 1] = -(limit as i32 + 1 - 100) as i8;
            let w = pack_q(&bad, n, k, isa);
            assert_eq!(w.kernel().name, kern.name, "{isa}: row {row} pair {pair} is past the limit");
            let forced = dynq::pack::Reservation::for_kernel(n, k, nk)
                .unwrap()
                .fill_quantized(&bad, WeightLayout::NK, &[1.0])
                .unwrap_err();
            assert_eq!(forced.status(), dynq::Status::InvalidArgument, "{forced}");
            let qa: Vec<u8> = vec![255; 3 * k];
            let mut out = vec![0i32; 3 * n];
            gemm_i32(&w, &qa, 3, k, &[0, 0, 0], &mut out, n, 1).unwrap();
            let want = reference::gemm_i64(&qa, 3, k, k, &[0, 0, 0], &bad, n);
            assert!(out.iter().zip(&want).all(|(a, b)| *a as i64 == *b));
        }
        let wide = dynq::pack::Reservation::for_kernel(n, k, kern)
            .unwrap()
            .fill_quantized(&qw, WeightLayout::NK, &[0.5])
            .unwrap();
        assert_eq!(wide.kernel().name, kern.name);
        let narrow = pack_q(&qw, n, k, isa);
        let back =
            PackedWeights::deserialize(&narrow.serialize(), PackOptions { isa: Some(isa), ..Default::default() })
                .unwrap();
        assert_eq!(back.kernel().name, nk.name);
        assert_eq!(wide.repack(isa).unwrap().kernel().name, nk.name);
        assert_eq!(back.quantized_weights(), qw);
        // Copies of weights whose storage was reserved for either layout.
        assert_eq!(narrow.clone().quantized_weights(), qw);
    }
}

#[test]
fn integer_gemm_exact_around_tile_edges() {
    let mut rng = Rng(2);
    let mut cases = 0;
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        let ms: Vec<usize> =
            (1..=kern.mr + 1).chain([kern.stream_mr, kern.stream_mr + 1, 2 * kern.mr + 3, 67]).collect();
        let ns: Vec<usize> = (1..=2 * kern.nr + 1).chain([127]).collect();
        let ks: Vec<usize> = (1..=2 * kern.kr + 1).chain([61, 256, 257]).collect();
        for &m in &ms {
            for &n in &ns {
                for &k in &ks {
                    let lda = k + rng.below(3);
                    let ldo = n + rng.below(3);
                    let qa: Vec<u8> = (0..(m - 1) * lda + k).map(|_| rng.u8()).collect();
                    let za: Vec<i32> = (0..m).map(|i| [0, 1, 127, 128, 255][(i + n + k) % 5]).collect();
                    let qw: Vec<i8> = (0..n * k).map(|_| rng.i8()).collect();
                    let w = pack_q(&qw, n, k, isa);
                    let mut out = vec![i32::MIN; (m - 1) * ldo + n];
                    gemm_i32(&w, &qa, m, lda, &za, &mut out, ldo, 1).unwrap();
                    let want = reference::gemm_i64(&qa, m, k, lda, &za, &qw, n);
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(out[i * ldo + j] as i64, want[i * n + j], "{isa} m={m} n={n} k={k} ({i},{j})");
                        }
                        for j in n..ldo.min(out.len() - i * ldo) {
                            assert_eq!(out[i * ldo + j], i32::MIN, "stride padding written");
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > 1000, "only {cases} cases ran");
}

#[test]
fn integer_gemm_exact_at_the_extremes() {
    // The largest magnitudes the int32 accumulators must hold exactly: K = MAX_K with every
    // product at its extreme, in both signs.
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        let (n, k) = (kern.nr + 1, MAX_K);
        for (a_val, za, w_val) in
            [(255u8, 0, -128i8), (0, 255, -128), (255, 0, 127), (0, 255, 127), (255, 128, -128), (1, 1, 127)]
        {
            let qa = vec![a_val; 2 * k];
            let qw = vec![w_val; n * k];
            let w = pack_q(&qw, n, k, isa);
            let mut out = vec![0i32; 2 * n];
            gemm_i32(&w, &qa, 2, k, &[za, za], &mut out, n, 2).unwrap();
            let want = (a_val as i64 - za as i64) * w_val as i64 * k as i64;
            assert!(out.iter().all(|&v| v as i64 == want), "{isa} a={a_val} za={za} w={w_val}: {} != {want}", out[0]);
        }
    }
}

#[test]
fn integer_gemm_long_k_random() {
    let mut rng = Rng(3);
    for isa in isas_under_test() {
        for &(m, n, k) in &[(5, 33, 4099), (1, 64, 16384), (9, 17, 65536)] {
            let qa: Vec<u8> = (0..m * k).map(|_| rng.u8()).collect();
            let qw: Vec<i8> = (0..n * k).map(|_| rng.i8()).collect();
            let za: Vec<i32> = (0..m).map(|i| (i * 37 % 256) as i32).collect();
            let w = pack_q(&qw, n, k, isa);
            let mut out = vec![0i32; m * n];
            gemm_i32(&w, &qa, m, k, &za, &mut out, n, 0).unwrap();
            let want = reference::gemm_i64(&qa, m, k, k, &za, &qw, n);
            assert!(out.iter().zip(&want).all(|(a, b)| *a as i64 == *b), "{isa} {m}x{n}x{k}");
        }
    }
}

#[test]
#[ignore = "exhaustive sweep; run with --ignored before releases"]
fn integer_gemm_exhaustive_sweep() {
    let mut rng = Rng(4);
    for isa in isas_under_test() {
        for m in 1..=20 {
            for n in 1..=70 {
                for k in 1..=70 {
                    let qa: Vec<u8> = (0..m * k).map(|_| rng.u8()).collect();
                    let qw: Vec<i8> = (0..n * k).map(|_| rng.i8()).collect();
                    let za: Vec<i32> = (0..m).map(|_| rng.u8() as i32).collect();
                    let w = pack_q(&qw, n, k, isa);
                    let mut out = vec![0i32; m * n];
                    gemm_i32(&w, &qa, m, k, &za, &mut out, n, 1).unwrap();
                    let want = reference::gemm_i64(&qa, m, k, k, &za, &qw, n);
                    assert!(out.iter().zip(&want).all(|(a, b)| *a as i64 == *b), "{isa} {m}x{n}x{k}");
                }
            }
        }
    }
}
