//! Guard pages on both sides of every buffer dynq reads or writes, at the tile edges of every
//! kernel: an over-read or over-write past the end, or an under-read before the start, faults.
//!
//! Complements tests/kernels.rs (micro-kernels on buffers that end at a guard page: A, the
//! packed panel, the i32 and f32 outputs) and tests/gemm.rs (a few driver shapes):
//! - micro-kernels with A, the panel and Y *starting* right after a guard page (under-reads);
//! - the driver (`gemm`, `gemm_typed`, `gemm_i32`) on every m in 1..=MR+1 and n, k around NR
//!   and KR, dense and strided, every epilogue and activation mode, with A, bias and Y (f32,
//!   f16, bf16) ending at a guard page, and a sample starting after one;
//! - packing and loading from guarded inputs (f32 in both layouts, int8 with scales, blobs).
//!
//! The packed weights of the driver live in dynq's own allocation; the panels the micro-kernels
//! read are guarded by the micro-kernel tests here and in tests/kernels.rs.

mod common;

use common::{isas_under_test, Rng};
use dynq::kernels::{kernel_for, F32Tile, Kernel, TileOut};
use dynq::{
    gemm, gemm_i32, gemm_typed, reference, ActGranularity, ActType, Epilogue, GemmOptions, PackOptions, PackedWeights,
    WeightGranularity, WeightLayout,
};
use half::{bf16, f16};

/// `len` elements between two inaccessible pages, touching the front one (`front`) or the
/// back one.
struct Guarded<T: Copy> {
    base: *mut libc::c_void,
    map_len: usize,
    ptr: *mut T,
    len: usize,
}

impl<T: Copy> Guarded<T> {
    fn new(len: usize, fill: T, front: bool) -> Self {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = len * std::mem::size_of::<T>();
        let data_pages = bytes.div_ceil(page).max(1);
        let map_len = (data_pages + 2) * page;
        // SAFETY: an anonymous private mapping, checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let b = base as *mut u8;
        // SAFETY: both guard pages lie inside the mapping.
        unsafe {
            assert_eq!(libc::mprotect(b as *mut libc::c_void, page, libc::PROT_NONE), 0);
            assert_eq!(libc::mprotect(b.add((data_pages + 1) * page) as *mut libc::c_void, page, libc::PROT_NONE), 0);
        }
        assert_eq!(bytes % std::mem::align_of::<T>(), 0);
        // SAFETY: inside the data pages.
        let ptr = unsafe {
            if front {
                b.add(page)
            } else {
                b.add((data_pages + 1) * page - bytes)
            }
        } as *mut T;
        let mut g = Guarded { base, map_len, ptr, len };
        g.as_mut_slice().fill(fill);
        g
    }
    fn from_slice(v: &[T], front: bool) -> Self {
        let mut g = Self::new(v.len(), v.first().copied().unwrap_or_else(|| unsafe { std::mem::zeroed() }), front);
        g.as_mut_slice().copy_from_slice(v);
        g
    }
    fn as_slice(&self) -> &[T] {
        // SAFETY: mapped read-write, owned.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy> Drop for Guarded<T> {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

fn micro_kernels() -> Vec<Kernel> {
    #[allow(unused_mut)]
    // Each ISA's kernel and its narrow-weight entry (if any).
    let mut v: Vec<Kernel> = isas_under_test()
        .into_iter()
        .map(|i| kernel_for(i).unwrap())
        .flat_map(|k| std::iter::once(*k).chain(k.narrow.copied()))
        .collect();
    #[cfg(target_arch = "x86_64")]
    {
        let twin = dynq::kernels::avx_vnni::evex_twin();
        if dynq::isa::resolve(twin.isa).is_ok() {
            v.push(twin);
        }
    }
    v
}

#[test]
fn micro_kernels_with_buffers_starting_after_a_guard_page() {
    let mut rng = Rng(21);
    for kern in micro_kernels() {
        // Every row count a call may take (see `Kernel::stream_mr`); 130 groups cross a tall
        // tile's K chunk.
        let (mr, nr, kr, ab) = (kern.stream_mr, kern.nr, kern.kr, kern.a_bytes);
        for groups in [1, 2, 5, 17, 130] {
            let kp = groups * kr;
            for rows in 1..=mr {
                let stride = (kp + kr) * ab;
                let mut a = Guarded::<u8>::new((rows - 1) * stride + kp * ab, 0, true);
                a.as_mut_slice().chunks_exact_mut(ab).for_each(|v| v[0] = rng.u8());
                let mut b = Guarded::<i8>::new(kp * nr, 0, true);
                // Weights within a narrow-weight kernel's limit for it: |w| <= 64.
                let narrow = kern.weight_pair_limit.is_some();
                b.as_mut_slice()
                    .iter_mut()
                    .for_each(|v| *v = if narrow { (rng.i8() as i32 / 2) as i8 } else { rng.i8() });
                let mut qw = vec![0i8; nr * kp];
                (kern.unpack)(b.as_slice(), nr, kp, &mut qw);
                let qa: Vec<u8> = (0..rows)
                    .flat_map(|i| {
                        a.as_slice()[i * stride..i * stride + kp * ab].iter().step_by(ab).copied().collect::<Vec<_>>()
                    })
                    .collect();
                let want = reference::gemm_i64(&qa, rows, kp, kp, &vec![kern.a_shift; rows], &qw, nr);
                let mut c = Guarded::<i32>::new(mr * nr, 0, true);
                // SAFETY: buffers of exactly the sizes of the micro-kernel contract; ISA resolved.
                unsafe {
                    (kern.ukernel)(
                        rows,
                        kp,
                        a.as_slice().as_ptr(),
                        stride,
                        b.as_slice().as_ptr(),
                        &TileOut::I32(c.as_mut_slice().as_mut_ptr()),
                    )
                };
                let got: Vec<i64> = c.as_slice()[..rows * nr].iter().map(|&v| v as i64).collect();
                assert_eq!(got, want, "{} kp={kp} rows={rows}", kern.name);
                for cols in [1, nr - 1, nr] {
                    let ldy = cols + 1;
                    let za: Vec<i32> = (0..rows).map(|_| rng.u8() as i32).collect();
                    let sa: Vec<f32> = (0..rows).map(|_| rng.f32().abs() * 0.01).collect();
                    let cs: Vec<i32> = (0..cols).map(|_| rng.below(2000) as i32 - 1000).collect();
                    let sw: Vec<f32> = (0..cols).map(|_| rng.f32().abs() * 0.02).collect();
                    let bias = Guarded::from_slice(&(0..cols).map(|_| rng.f32()).collect::<Vec<f32>>(), true);
                    let mut y = Guarded::<f32>::new((rows - 1) * ldy + cols, 0.0, true);
                    // The residual's last row ends at a guard page.
                    let res = Guarded::from_slice(
                        &(0..(rows - 1) * ldy + cols).map(|_| rng.f32()).collect::<Vec<f32>>(),
                        true,
                    );
                    let ft = F32Tile {
                        za: &za,
                        sa: &sa,
                        col_sums: &cs,
                        scales: &sw,
                        bias: Some(bias.as_slice()),
                        act: Epilogue::Gelu,
                        y: y.as_mut_slice().as_mut_ptr(),
                        ldy,
                        blocks16: None,
                        residual: Some((res.as_slice().as_ptr(), ldy)),
                        prefetch_l2: &[],
                        // The far L2 prefetch runs past the panel's guard page (a hint: it
                        // must not fault).
                        stream_l2: true,
                    };
                    // SAFETY: as above; y holds rows x cols at stride ldy.
                    unsafe {
                        (kern.ukernel)(
                            rows,
                            kp,
                            a.as_slice().as_ptr(),
                            stride,
                            b.as_slice().as_ptr(),
                            &TileOut::F32(&ft),
                        )
                    };
                    for i in 0..rows {
                        let acc: Vec<i32> = want[i * nr..i * nr + cols].iter().map(|&v| v as i32).collect();
                        let mut expect = vec![0f32; cols];
                        dynq::gemm::dequantize_row(&ft.row(i), &acc, &mut expect);
                        let r = &res.as_slice()[i * ldy..i * ldy + cols];
                        expect.iter_mut().zip(r).for_each(|(e, r)| *e += *r);
                        let got = &y.as_slice()[i * ldy..i * ldy + cols];
                        assert!(
                            got.iter().zip(&expect).all(|(g, e)| g.to_bits() == e.to_bits()),
                            "{} f32 row {i}",
                            kern.name
                        );
                    }
                }
            }
        }
    }
}

fn dims(edge: usize, extra: &[usize]) -> Vec<usize> {
    let mut v: Vec<usize> =
        [1, edge.saturating_sub(1), edge, edge + 1, 2 * edge + 1].into_iter().filter(|&d| d >= 1).collect();
    v.extend_from_slice(extra);
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn driver_at_tile_edges_with_guarded_inputs_and_outputs() {
    let mut rng = Rng(22);
    let modes = [
        (ActGranularity::PerRow, ActType::AsymmetricU8, Epilogue::None),
        (ActGranularity::PerTensor, ActType::SymmetricI8, Epilogue::Relu),
        (ActGranularity::PerRow, ActType::SymmetricI8, Epilogue::Gelu),
        (ActGranularity::PerTensor, ActType::AsymmetricU8, Epilogue::Gelu),
    ];
    let mut calls = 0;
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        for m in (1..=kern.mr + 1).chain([kern.stream_mr, kern.stream_mr + 1]) {
            for &n in &dims(kern.nr, &[]) {
                for &k in &dims(kern.kr, &[61]) {
                    let case = calls;
                    let (lda, ldy) = if case % 2 == 0 { (k, n) } else { (k + 3, n + 2) };
                    let front = case % 5 == 0;
                    let (g, t, act) = modes[case % modes.len()];
                    let opts =
                        GemmOptions { act_granularity: g, act_type: t, epilogue: act, num_threads: 1 + case % 2 };
                    // Weights packed from a guarded buffer, NK or KN.
                    let layout = if case % 3 == 0 { WeightLayout::KN } else { WeightLayout::NK };
                    let wv: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
                    let wg = Guarded::from_slice(&wv, front);
                    let pw = PackedWeights::from_f32(
                        wg.as_slice(),
                        n,
                        k,
                        layout,
                        PackOptions { isa: Some(isa), ..Default::default() },
                    )
                    .unwrap();
                    let av: Vec<f32> = (0..(m - 1) * lda + k).map(|_| rng.f32() * 3.0).collect();
                    let a = Guarded::from_slice(&av, front);
                    let bias = Guarded::from_slice(&(0..n).map(|_| rng.f32()).collect::<Vec<f32>>(), front);
                    let b = (case % 4 != 3).then(|| bias.as_slice());
                    let mut y = Guarded::<f32>::new((m - 1) * ldy + n, 0.0, front);
                    gemm(&pw, a.as_slice(), m, lda, b, y.as_mut_slice(), ldy, &opts).unwrap();
                    // The same through a plain Vec on the scalar path: the guarded run computed the same.
                    let scalar = pw.repack(dynq::Isa::Scalar).unwrap();
                    let mut yv = vec![0f32; (m - 1) * ldy + n];
                    gemm(&scalar, &av, m, lda, b, &mut yv, ldy, &opts).unwrap();
                    assert!(
                        y.as_slice().iter().zip(&yv).all(|(p, q)| p.to_bits() == q.to_bits()),
                        "{isa} m={m} n={n} k={k} lda={lda} ldy={ldy}"
                    );
                    // f16 activations -> bf16 output, and bf16 -> f16, guarded too.
                    let a16 = Guarded::from_slice(&av.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), front);
                    let mut yb = Guarded::<bf16>::new((m - 1) * ldy + n, bf16::ZERO, front);
                    gemm_typed(&pw, a16.as_slice(), m, lda, b, yb.as_mut_slice(), ldy, &opts).unwrap();
                    let ab = Guarded::from_slice(&av.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), !front);
                    let mut yh = Guarded::<f16>::new((m - 1) * ldy + n, f16::ZERO, !front);
                    gemm_typed(&pw, ab.as_slice(), m, lda, b, yh.as_mut_slice(), ldy, &opts).unwrap();
                    // The integer path: quantized activations and i32 output guarded.
                    let qa = Guarded::from_slice(&(0..(m - 1) * lda + k).map(|_| rng.u8()).collect::<Vec<u8>>(), front);
                    let za: Vec<i32> = (0..m).map(|i| [0, 1, 127, 128, 255][(i + case) % 5]).collect();
                    let mut out = Guarded::<i32>::new((m - 1) * ldy + n, 0, front);
                    gemm_i32(&pw, qa.as_slice(), m, lda, &za, out.as_mut_slice(), ldy, 1 + case % 2).unwrap();
                    let want = reference::gemm_i64(qa.as_slice(), m, k, lda, &za, &pw.quantized_weights(), n);
                    for i in 0..m {
                        for j in 0..n {
                            assert_eq!(
                                out.as_slice()[i * ldy + j] as i64,
                                want[i * n + j],
                                "{isa} gemm_i32 m={m} n={n} k={k}"
                            );
                        }
                    }
                    calls += 1;
                }
            }
        }
    }
    // At least m in 1..=MR+1 x 5 widths x 5 depths per ISA (the scalar kernel alone: 150).
    assert!(calls >= 125 * isas_under_test().len(), "only {calls} shapes");
}

#[test]
fn packing_and_loading_from_guarded_inputs() {
    let mut rng = Rng(23);
    for isa in isas_under_test() {
        let kern = kernel_for(isa).unwrap();
        for &(n, k) in &[(1, 1), (kern.nr + 1, kern.kr + 1), (2 * kern.nr - 1, 3 * kern.kr - 1), (3, 65536)] {
            for front in [false, true] {
                let q = Guarded::from_slice(&(0..n * k).map(|_| rng.i8()).collect::<Vec<i8>>(), front);
                let scales = Guarded::from_slice(&(0..n).map(|i| 0.01 * (i % 7) as f32).collect::<Vec<f32>>(), front);
                let one = Guarded::from_slice(&[0.25f32], front);
                for layout in [WeightLayout::NK, WeightLayout::KN] {
                    let o = PackOptions {
                        isa: Some(isa),
                        granularity: WeightGranularity::PerChannel,
                        ..Default::default()
                    };
                    let pw = PackedWeights::from_quantized(q.as_slice(), n, k, layout, scales.as_slice(), o).unwrap();
                    let pt = PackedWeights::from_quantized(q.as_slice(), n, k, layout, one.as_slice(), o).unwrap();
                    let blob = Guarded::from_slice(&pw.serialize(), front);
                    let back = PackedWeights::deserialize(blob.as_slice(), o).unwrap();
                    assert_eq!(back.quantized_weights(), pw.quantized_weights());
                    let blob = Guarded::from_slice(&pt.serialize(), !front);
                    assert_eq!(PackedWeights::deserialize(blob.as_slice(), o).unwrap().scales(), pt.scales());
                }
            }
        }
    }
}
