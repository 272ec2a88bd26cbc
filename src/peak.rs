//! This machine's own limits, measured the way `dynq bench` reports against them: the
//! throughput of the integer dot-product instruction each kernel family is built on, and the
//! read bandwidth for a buffer of a given size.
//!
//! The dot-product loops use many independent accumulators with operands in registers, so
//! they measure the execution ports, not memory. The bandwidth loop reads a buffer repeatedly
//! with the widest loads available; a buffer larger than the caches measures DRAM (or the
//! host's last-level cache, which on these VMs holds 32-64 MiB).

use crate::isa::Isa;
use std::time::{Duration, Instant};

/// Median of `f`'s results over repetitions lasting at least `min_time` (at least 3).
fn median_rate(min_time: Duration, mut f: impl FnMut() -> f64) -> f64 {
    let mut v = Vec::new();
    let start = Instant::now();
    f(); // warm-up
    while v.len() < 3 || (start.elapsed() < min_time && v.len() < 50) {
        v.push(f());
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Integer multiply-add peak of an ISA's dot-product instruction in GOPS (2 operations per
/// u8*s8 multiply-add), single thread, or `None` when the CPU lacks it or nothing is
/// measured for it. AMX-INT8: `tdpbusd` on six independent accumulator tiles; AVX-512 VNNI:
/// `vpdpbusd zmm`; AVX-VNNI: `vpdpbusd ymm` (VEX);
/// on CPUs without it where the AVX-VNNI kernel's EVEX twin stands in
/// (`kernels::stand_in_for`), the EVEX encoding of the same instruction;
/// AVX2: the `vpmaddubsw + vpmaddwd + vpaddd` chain (the usual int8 route without VNNI, whose
/// int16 step can saturate; dynq's exact AVX2 kernel is measured against it).
pub fn dot_product_gops(isa: Isa, min_time: Duration) -> Option<f64> {
    let (f, macs) = dot_product_loop(isa)?;
    Some(median_rate(min_time, || {
        let t = Instant::now();
        std::hint::black_box(f(DOT_ITERS));
        (DOT_ITERS * macs * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
    }))
}

/// Iterations of a dot-product loop per timed run (a few milliseconds).
const DOT_ITERS: usize = 2_000_000;

/// The dot-product peak of [`dot_product_gops`] on 1 thread and on `threads` threads running
/// the same loop at once, as `(1 thread, all threads together)` in GOPS: medians of runs made
/// in turn. Their ratio bounds what more threads can give a kernel bound by that instruction:
/// two vCPUs that are the two hyperthreads of one core share its units (its AMX tile unit:
/// about 1.0x), two separate cores give about 2x. `None` as for [`dot_product_gops`], or when
/// `threads` is 0.
pub fn dot_product_scaling(isa: Isa, threads: usize, min_time: Duration) -> Option<(f64, f64)> {
    let (f, macs) = dot_product_loop(isa)?;
    if threads == 0 {
        return None;
    }
    let ops = (DOT_ITERS * macs * 2) as f64;
    let one = || {
        let t = Instant::now();
        std::hint::black_box(f(DOT_ITERS));
        ops / t.elapsed().as_secs_f64() / 1e9
    };
    let all = || {
        // Each thread starts its loop when all have started, so the loops overlap.
        let barrier = std::sync::Barrier::new(threads);
        let secs = std::thread::scope(|s| {
            let runs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let t = Instant::now();
                        std::hint::black_box(f(DOT_ITERS));
                        t.elapsed().as_secs_f64()
                    })
                })
                .collect();
            // The slowest thread: they ran at once for at least that long.
            runs.into_iter().map(|r| r.join().unwrap_or(f64::INFINITY)).fold(0.0, f64::max)
        });
        threads as f64 * ops / secs / 1e9
    };
    let (mut v1, mut vn) = (Vec::new(), Vec::new());
    let start = Instant::now();
    one(); // warm-up
    while v1.len() < 3 || (start.elapsed() < 2 * min_time && v1.len() < 50) {
        v1.push(one());
        vn.push(all());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Some((median(&mut v1), median(&mut vn)))
}

/// An ISA's dot-product loop (runs `iters` iterations, returns a value of the result) and its
/// multiply-adds per iteration, or `None` when the CPU lacks it or nothing is measured for it.
#[allow(clippy::type_complexity)]
fn dot_product_loop(isa: Isa) -> Option<(Box<dyn Fn(usize) -> u64 + Sync>, usize)> {
    let stand_in = crate::kernels::stand_in_for(isa).is_some();
    if crate::isa::resolve(isa).is_err() && !(isa == Isa::AvxVnni && isa.is_supported()) && !stand_in {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (each arm): the ISA was checked above.
        match isa {
            Isa::Avx512Vnni => Some((Box::new(|n| unsafe { x86::vnni_zmm(n) }), 24 * 64)),
            // 6 tiles of 16 x 16 x 64 per iteration: a 64th of the iterations of the others.
            Isa::AmxInt8 => Some((Box::new(|n| unsafe { crate::kernels::amx::tdpbusd_loop(n / 64) }), 6 * 16384 / 64)),
            // Where the AVX-VNNI kernel's EVEX twin stands in, the same instruction in its EVEX
            // encoding (AVX-512 VL + VNNI): the twin's own peak.
            Isa::AvxVnni if stand_in => Some((Box::new(|n| unsafe { x86::vnni_ymm_evex(n) }), 12 * 32)),
            Isa::AvxVnni => Some((Box::new(|n| unsafe { x86::vnni_ymm(n) }), 12 * 32)),
            Isa::Avx2 => Some((Box::new(|n| unsafe { x86::maddubs_ymm(n) }), 12 * 32)),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Throughput in GOPS of the ISA's micro-kernel alone, single thread, on one full tile
/// (MR x NR) with depth `k`, operands resident in cache (one A tile in L1, cycling over 4
/// panels, which stay in L1 or L2 depending on `k`), the f32
/// epilogue written to a small Y: the ceiling a full GEMM of that depth can approach, since
/// quantization, packing order and memory only add to it. `None` when the CPU can run neither
/// the ISA nor its stand-in (`kernels::stand_in_for`), or this build has no kernel for it.
pub fn micro_kernel_gops(isa: Isa, k: usize, min_time: Duration) -> Option<f64> {
    use crate::kernels::{kernel_for, stand_in_for};
    // The ISA's kernel, or the code that stands in for it on this CPU.
    let kern = match crate::isa::resolve(isa) {
        Ok(_) => kernel_for(isa)?,
        Err(_) => stand_in_for(isa)?,
    };
    Some(kernel_gops(kern, k, min_time))
}

/// [`micro_kernel_gops`] of a given kernel (a table entry such as a narrow-weight one, or a
/// stand-in), which the CPU must be able to run.
pub fn kernel_gops(kern: &crate::kernels::Kernel, k: usize, min_time: Duration) -> f64 {
    use crate::kernels::{F32Tile, TileOut};
    let (mr, nr) = (kern.mr, kern.nr);
    let kp = kern.padded_k(k.max(1));
    let panels = 4;
    let row_bytes = kp * kern.a_bytes;
    let a: Vec<u8> = (0..mr * row_bytes).map(|i| if i % kern.a_bytes == 0 { (i * 7 % 251) as u8 } else { 0 }).collect();
    // The panels start on a cache line, as packed weights do (see `pack::AlignedI8`).
    // Within the weight range the kernel is exact for (|w| <= 64 meets every pair limit).
    let w_max = if kern.weight_pair_limit.is_some() { 129 } else { 255 };
    let b_buf: Vec<i8> =
        (0..panels * nr * kp + 64).map(|i| ((i * 13 % w_max) as i32 - w_max as i32 / 2) as i8).collect();
    let b = &b_buf[b_buf.as_ptr().align_offset(64)..];
    let n = panels * nr;
    let (za, sa) = (vec![3i32; mr], vec![0.01f32; mr]);
    let (col_sums, scales, bias) = (vec![5i32; n], vec![0.02f32; n], vec![0.5f32; n]);
    let mut y = vec![0f32; mr * n];
    let calls = (8_000_000 / (mr * nr * kp)).max(panels) / panels * panels;
    median_rate(min_time, || {
        let t = Instant::now();
        for c in 0..calls {
            let p = c % panels;
            let ft = F32Tile {
                za: &za,
                sa: &sa,
                col_sums: &col_sums[p * nr..(p + 1) * nr],
                scales: &scales[p * nr..(p + 1) * nr],
                bias: Some(&bias[p * nr..(p + 1) * nr]),
                act: crate::Epilogue::None,
                // In bounds: row i of the tile is y[i * n + p * nr..][..nr].
                y: y[p * nr..].as_mut_ptr(),
                ldy: n,
                blocks16: None,
                residual: None,
                prefetch_l2: &[],
                stream_l2: false,
            };
            // SAFETY: the CPU runs the kernel's ISA (resolved above); `a` holds MR rows of kp
            // values at stride row_bytes, the panel kp * NR bytes, kp is a positive multiple of
            // KR, and `ft` describes MR x NR writable floats of `y` that nothing else touches.
            unsafe { (kern.ukernel)(mr, kp, a.as_ptr(), row_bytes, b[p * nr * kp..].as_ptr(), &TileOut::F32(&ft)) };
        }
        std::hint::black_box(&mut y);
        (calls * mr * nr * kp * 2) as f64 / t.elapsed().as_secs_f64() / 1e9
    })
}

/// Read bandwidth in GB/s for a buffer of `bytes` bytes (rounded up to 4 KiB), single thread,
/// the buffer advised for huge pages like large packed weights (`error::advise_huge_pages`):
/// the better of a plain streaming loop (the hardware prefetchers alone) and the same loop
/// asking for lines ahead as the kernels do (to L1 4 KiB ahead, to L2 16 KiB ahead), which
/// a kernel streaming weights from memory can otherwise beat (one thread, 1 GiB buffer from
/// DRAM: 14.8-14.9 GB/s plain, 15.6-15.9 with the prefetches; 16 MiB in L3: the same).
///
/// Errors: [`crate::Error::InvalidArgument`] for 0 bytes, [`crate::Error::OutOfMemory`] for a
/// buffer this process cannot allocate.
pub fn read_bandwidth_gbs(bytes: usize, min_time: Duration) -> crate::Result<f64> {
    if bytes == 0 {
        return Err(crate::Error::InvalidArgument("a bandwidth buffer of 0 bytes".into()));
    }
    let words = bytes
        .checked_next_multiple_of(4096)
        .map(|b| b / 8)
        .ok_or_else(|| crate::Error::OutOfMemory(format!("a bandwidth buffer of {bytes} bytes")))?;
    // In 2 MiB pages where the system allows, as dynq's large packed weights are.
    let mut buf =
        crate::error::try_zeroed_vec_advised::<u64>(words, "bandwidth buffer", crate::error::advise_huge_pages)?;
    buf.iter_mut().enumerate().for_each(|(i, w)| *w = i as u64);
    let rate = |prefetch: bool| {
        median_rate(min_time, || {
            let t = Instant::now();
            std::hint::black_box(sum_words(&buf, prefetch));
            (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
        })
    };
    Ok(rate(false).max(rate(true)))
}

/// Sums the buffer with 8 independent lanes; compiled for the widest vectors the CPU has.
/// `prefetch`: with software prefetches ahead (x86; elsewhere the plain loop).
fn sum_words(buf: &[u64], prefetch: bool) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512 F is present.
            return unsafe {
                match prefetch {
                    true => x86::sum_avx512::<true>(buf),
                    false => x86::sum_avx512::<false>(buf),
                }
            };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present.
            return unsafe {
                match prefetch {
                    true => x86::sum_avx2::<true>(buf),
                    false => x86::sum_avx2::<false>(buf),
                }
            };
        }
    }
    let _ = prefetch;
    sum_portable(buf)
}

#[inline(always)]
fn sum_portable(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for ch in buf.chunks_exact(8) {
        for i in 0..8 {
            acc[i] = acc[i].wrapping_add(ch[i]);
        }
    }
    acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512<const PREFETCH: bool>(buf: &[u64]) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 4];
        let chunks = buf.chunks_exact(32);
        let tail = super::sum_portable(chunks.remainder());
        for ch in chunks {
            if PREFETCH {
                // Hints (never fault, even past the end): the chunk's 4 lines 4 KiB ahead to
                // L1, one line 16 KiB ahead to L2 (the L2 streamer fetches its neighbours).
                let p = ch.as_ptr() as *const i8;
                for l in 0..4 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4096 + 64 * l));
                }
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(crate::kernels::STREAM_L2_AHEAD));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: the chunk holds 32 words, 8 per load.
                *a = _mm512_add_epi64(*a, unsafe { _mm512_loadu_si512(ch.as_ptr().add(8 * j) as *const __m512i) });
            }
        }
        fold512(&acc) ^ tail
    }

    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sum_avx2<const PREFETCH: bool>(buf: &[u64]) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 4];
        let chunks = buf.chunks_exact(16);
        let tail = super::sum_portable(chunks.remainder());
        for ch in chunks {
            if PREFETCH {
                // As in `sum_avx512`, for 2 lines per chunk.
                let p = ch.as_ptr() as *const i8;
                for l in 0..2 {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(4096 + 64 * l));
                }
                _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(crate::kernels::STREAM_L2_AHEAD));
            }
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: the chunk holds 16 words, 4 per load.
                *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(ch.as_ptr().add(4 * j) as *const __m256i) });
            }
        }
        fold256(&acc) ^ tail
    }

    fn fold512(acc: &[__m512i]) -> u64 {
        // SAFETY: only reached from functions requiring AVX-512 F.
        unsafe {
            let mut out = [0u64; 8];
            let s = acc.iter().fold(_mm512_setzero_si512(), |a, b| _mm512_add_epi32(a, *b));
            _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, s);
            out.iter().fold(0, |a, b| a ^ b)
        }
    }

    fn fold256(acc: &[__m256i]) -> u64 {
        // SAFETY: only reached from functions requiring AVX2.
        unsafe {
            let mut out = [0u64; 4];
            let s = acc.iter().fold(_mm256_setzero_si256(), |a, b| _mm256_add_epi32(a, *b));
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s);
            out.iter().fold(0, |a, b| a ^ b)
        }
    }

    /// 24 independent `vpdpbusd zmm` per iteration.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni_zmm(iters: usize) -> u64 {
        let mut acc = [_mm512_setzero_si512(); 24];
        let a = std::hint::black_box(_mm512_set1_epi32(0x0102_0304));
        let b = std::hint::black_box(_mm512_set1_epi32(0x0101_0101));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbusd_epi32(*x, a, b);
            }
        }
        fold512(&acc)
    }

    /// 12 independent `vpdpbusd ymm` (VEX) per iteration.
    ///
    /// # Safety
    /// The CPU has AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn vnni_ymm(iters: usize) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 12];
        let a = std::hint::black_box(_mm256_set1_epi32(0x0102_0304));
        let b = std::hint::black_box(_mm256_set1_epi32(0x0101_0101));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_avx_epi32(*x, a, b);
            }
        }
        fold256(&acc)
    }

    /// 12 independent `vpdpbusd ymm` (EVEX) per iteration: [`vnni_ymm`] as the AVX-VNNI
    /// kernel's EVEX twin runs it.
    ///
    /// # Safety
    /// The CPU has AVX-512 VL and VNNI.
    #[target_feature(enable = "avx512vl,avx512vnni")]
    pub unsafe fn vnni_ymm_evex(iters: usize) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 12];
        let a = std::hint::black_box(_mm256_set1_epi32(0x0102_0304));
        let b = std::hint::black_box(_mm256_set1_epi32(0x0101_0101));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_dpbusd_epi32(*x, a, b);
            }
        }
        fold256(&acc)
    }

    /// 12 independent `vpmaddubsw + vpmaddwd + vpaddd` chains per iteration (each chain feeds
    /// its accumulator back as the u8 operand, so nothing can be hoisted out of the loop).
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn maddubs_ymm(iters: usize) -> u64 {
        let mut acc = [_mm256_setzero_si256(); 12];
        let b = std::hint::black_box(_mm256_set1_epi32(0x0101_0101));
        let ones = _mm256_set1_epi16(1);
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_add_epi32(*x, _mm256_madd_epi16(_mm256_maddubs_epi16(*x, b), ones));
            }
        }
        fold256(&acc)
    }
}
