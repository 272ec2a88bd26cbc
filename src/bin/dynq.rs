//! The `dynq` command line: `dynq info` (what this CPU has and what dynq will run) and
//! `dynq bench` (dynamic int8 GEMM beside a competent fp32 SGEMM on typical layer shapes).

use dynq::{isa, kernels, ActGranularity, ActType, Epilogue, GemmOptions, Isa, PackOptions, WeightLayout};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: dynq <command> [options]

commands:
  info                       CPU features, the ISA dynq selects, the kernels in this build
  bench [options]            dynamic int8 GEMM vs fp32 SGEMM (matrixmultiply) on layer shapes
    --shapes MxNxK[,MxNxK]   shapes to run (default: BERT-base and LLM-like layers)
    --isa NAME               force a kernel family (default: DYNQ_ISA or the best available);
                             avx_vnni on a CPU with AVX-512 VNNI but no AVX-VNNI runs that
                             kernel's code in the EVEX encoding (its stand-in, labelled)
    --threads N[,N...]       dynq threads (default 1; the fp32 baseline is single-threaded);
                             several counts are timed call by call in turn, and a table of
                             each count's time and its speedup over the first follows
    --min-time SECONDS       minimum measuring time per shape and library, 0 to 60 (default 0.3)
    --per-tensor             per-tensor activation ranges instead of per-row
    --symmetric              symmetric int8 activations instead of asymmetric uint8
    --weight-qmax Q          quantize weights to [-Q, Q] (default 127; 64 = ONNX Runtime's
                             reduce_range, which runs a faster kernel on AVX2 without VNNI)
    --cold-bytes N           for shapes with M <= 16 and at least 1 MiB of weights also time
                             them read from memory:
                             calls cycle through copies of the packed weights, N bytes in all
                             (default: twice the last-level cache, at least 256 MiB, at most
                             4 GiB; 0: skip), beside the read bandwidth for a buffer of N bytes
    --json PATH              also write every figure as JSON (- for standard output)
  peak [--isa NAME] [--bytes N[,N...]] [--narrow] [--threads N]
                             this machine's measured limits as JSON: the dot-product peak of an
                             ISA (GOPS, 1 thread; avx_vnni: as for bench), its micro-kernel's
                             rate (--narrow: the ISA's narrow-weight kernel, if it has one) and
                             the read bandwidth for buffers of N bytes; --threads N also
                             runs the dot-product loop on N threads at once, in turn with
                             1 thread (the most N threads can give a kernel bound by it)
  help                       this text

environment: DYNQ_ISA forces the kernel family, DYNQ_NUM_THREADS the default thread count,
DYNQ_SPIN_US how long idle worker threads wait for the next call before sleeping (default 200).";

/// (label, M, N, K)
const DEFAULT_SHAPES: &[(&str, usize, usize, usize)] = &[
    ("bert-base attn proj", 128, 768, 768),
    ("bert-base ffn up", 128, 3072, 768),
    ("bert-base ffn down", 128, 768, 3072),
    ("llm decode 1 token", 1, 4096, 4096),
    ("llm decode 4 tokens", 4, 4096, 4096),
    ("llm prefill mlp up", 16, 11008, 4096),
    ("512-token ffn down", 512, 1024, 4096),
    ("small layer", 32, 256, 256),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("info") => info(),
        Some("bench") => bench(&args[1..]),
        Some("peak") => peak(&args[1..]),
        Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        None => {
            eprintln!("{USAGE}");
            Err("no command given".into())
        }
        Some(other) => Err(format!("unknown command {other:?}; see `dynq help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dynq: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info() -> Result<(), String> {
    println!("dynq {} (C ABI {})", dynq::VERSION, dynq::ffi::DYNQ_ABI_VERSION);
    println!("target: {}-{}", std::env::consts::ARCH, std::env::consts::OS);
    let feats: Vec<String> =
        isa::cpu_features().iter().map(|(n, on)| format!("{n}{}", if *on { "" } else { "(no)" })).collect();
    println!("cpu features: {}", feats.join(" "));
    let supported: Vec<&str> = Isa::ALL.iter().filter(|i| i.is_supported()).map(|i| i.name()).collect();
    println!("ISAs this CPU supports: {}", supported.join(", "));
    match isa::active() {
        Ok(a) => println!(
            "selected ISA: {a}{}",
            if std::env::var("DYNQ_ISA").is_ok() { " (forced by DYNQ_ISA)" } else { "" }
        ),
        Err(e) => println!("selected ISA: none: {e}"),
    }
    match dynq::gemm::default_threads() {
        Ok(t) => println!("default threads: {t}"),
        Err(e) => println!("default threads: {e}"),
    }
    match dynq::gemm::spin_window() {
        Ok(w) => println!("idle workers wait for the next call: {} us (DYNQ_SPIN_US)", w.as_micros()),
        Err(e) => println!("idle workers wait for the next call: {e}"),
    }
    println!("kernels in this build:");
    for k in kernels::KERNELS {
        let usable = isa::resolve(k.isa).is_ok();
        println!(
            "  {:<34} isa={:<12} MR={} NR={} KR={} layout v{}  {}",
            k.name,
            k.isa.name(),
            k.mr,
            k.nr,
            k.kr,
            k.layout_version,
            match (usable, kernels::stand_in_for(k.isa)) {
                (true, _) => "usable".to_string(),
                (false, Some(twin)) => format!(
                    "not supported by this CPU (measurable through {}: dynq bench --isa {})",
                    twin.name,
                    k.isa.name()
                ),
                (false, None) => "not supported by this CPU".to_string(),
            }
        );
    }
    Ok(())
}

fn peak(args: &[String]) -> Result<(), String> {
    let mut isa = None;
    let mut sizes = vec![16usize << 20];
    let mut narrow = false;
    let mut threads = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--isa" => {
                let v = it.next().ok_or("--isa needs a value")?;
                isa = Some(Isa::from_name(v).ok_or_else(|| format!("unknown ISA {v:?}"))?);
            }
            "--bytes" => {
                let v = it.next().ok_or("--bytes needs a value")?;
                sizes = v
                    .split(',')
                    .map(|s| s.trim().parse().map_err(|_| format!("bad size {s:?}")))
                    .collect::<Result<_, _>>()?;
            }
            "--narrow" => narrow = true,
            "--threads" => {
                let v = it.next().ok_or("--threads needs a value")?;
                threads = Some(
                    v.trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|t| (1..=256).contains(t))
                        .ok_or_else(|| format!("--threads {v:?}: a thread count from 1 to 256"))?,
                );
            }
            other => return Err(format!("unknown peak option {other:?}")),
        }
    }
    let (isa, stand_in) = select_or_stand_in(isa)?;
    let t = Duration::from_millis(300);
    let gops = dynq::peak::dot_product_gops(isa, t);
    let fmt = |g: Option<f64>| g.map_or("null".to_string(), |g| format!("{g:.1}"));
    // The kernel measured: the ISA's (or its stand-in), or with --narrow its narrow-weight entry.
    let kern = stand_in.or(dynq::kernels::kernel_for(isa)).map(|k| if narrow { k.narrow.unwrap_or(k) } else { k });
    let kernel: Vec<String> = [256usize, 768, 3072]
        .iter()
        .map(|&k| format!("\"{k}\": {}", fmt(kern.map(|kern| dynq::peak::kernel_gops(kern, k, t)))))
        .collect();
    let bw: Vec<String> = sizes
        .iter()
        .map(|&b| {
            let g = dynq::peak::read_bandwidth_gbs(b, t).map_err(|e| format!("--bytes {b}: {e}"))?;
            Ok(format!("\"{b}\": {g:.2}"))
        })
        .collect::<Result<_, String>>()?;
    // With --threads N: the loop on 1 thread and on N at once, in turn.
    let together = threads.map(|n| match dynq::peak::dot_product_scaling(isa, n, t) {
        Some((one, all)) => format!(
            ", \"dot_product_threads\": {{\"threads\": {n}, \"one_thread_gops\": {one:.1}, \"all_threads_gops\": {all:.1}, \"scaling\": {:.2}}}",
            all / one
        ),
        None => format!(", \"dot_product_threads\": {{\"threads\": {n}, \"one_thread_gops\": null, \"all_threads_gops\": null, \"scaling\": null}}"),
    });
    println!(
        "{{\"isa\": \"{isa}\", \"stand_in\": {}, \"kernel\": {}, \"dot_product_gops\": {}{}, \"micro_kernel_gops_by_k\": {{{}}}, \"read_gbs\": {{{}}}}}",
        stand_in.map_or("null".to_string(), |k| format!("\"{}\"", k.name)),
        kern.map_or("null".to_string(), |k| format!("\"{}\"", k.name)),
        fmt(gops),
        together.unwrap_or_default(),
        kernel.join(", "),
        bw.join(", ")
    );
    Ok(())
}

/// The ISA to measure: the forced one (or the active one), or, where the CPU lacks a forced
/// ISA whose kernel's code can still run in another encoding, that ISA with its stand-in
/// (`kernels::stand_in_for`: the AVX-VNNI kernel's EVEX twin on AVX-512 VNNI CPUs).
fn select_or_stand_in(forced: Option<Isa>) -> Result<(Isa, Option<&'static dynq::kernels::Kernel>), String> {
    match isa::select(forced) {
        Ok(isa) => Ok((isa, None)),
        Err(e) => match forced.and_then(|f| dynq::kernels::stand_in_for(f).map(|k| (f, k))) {
            Some((f, k)) => Ok((f, Some(k))),
            None => Err(e.to_string()),
        },
    }
}

struct BenchArgs {
    shapes: Vec<(String, usize, usize, usize)>,
    isa: Option<Isa>,
    /// Thread counts to time (at least one); the main table uses the first.
    threads: Vec<usize>,
    min_time: Duration,
    gran: ActGranularity,
    ty: ActType,
    weight_qmax: u8,
    /// Bytes of weight copies for the weights-from-memory table (`None`: from the LLC size).
    cold_bytes: Option<usize>,
    json: Option<String>,
}

fn parse_bench(args: &[String]) -> Result<BenchArgs, String> {
    let mut b = BenchArgs {
        shapes: DEFAULT_SHAPES.iter().map(|&(l, m, n, k)| (l.to_string(), m, n, k)).collect(),
        isa: None,
        threads: vec![1],
        min_time: Duration::from_millis(300),
        gran: ActGranularity::PerRow,
        ty: ActType::AsymmetricU8,
        weight_qmax: 127,
        cold_bytes: None,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--shapes" => {
                b.shapes = val("--shapes")?
                    .split(',')
                    .map(|s| {
                        let d: Vec<usize> = s
                            .split('x')
                            .map(|v| v.trim().parse::<usize>())
                            .collect::<Result<_, _>>()
                            .map_err(|_| format!("bad shape {s:?}, expected MxNxK"))?;
                        match d[..] {
                            [m, n, k] if m > 0 && n > 0 && k > 0 => Ok((s.to_string(), m, n, k)),
                            _ => Err(format!("bad shape {s:?}, expected MxNxK with positive sizes")),
                        }
                    })
                    .collect::<Result<_, String>>()?
            }
            "--isa" => {
                let v = val("--isa")?;
                b.isa = Some(Isa::from_name(&v).ok_or_else(|| format!("unknown ISA {v:?}"))?);
            }
            "--threads" => {
                b.threads = val("--threads")?
                    .split(',')
                    .map(|t| t.trim().parse::<usize>().map_err(|_| format!("bad --threads value {t:?}")))
                    .collect::<Result<_, _>>()?
            }
            "--min-time" => {
                let s: f64 = val("--min-time")?.parse().map_err(|_| "bad --min-time".to_string())?;
                if !(0.0..=60.0).contains(&s) {
                    return Err(format!("bad --min-time {s}: expected 0 to 60 seconds"));
                }
                b.min_time = Duration::from_secs_f64(s);
            }
            "--per-tensor" => b.gran = ActGranularity::PerTensor,
            "--symmetric" => b.ty = ActType::SymmetricI8,
            "--weight-qmax" => {
                b.weight_qmax = match val("--weight-qmax")?.parse::<u8>() {
                    Ok(q @ 1..=127) => q,
                    _ => return Err("bad --weight-qmax: expected 1..=127".to_string()),
                }
            }
            "--cold-bytes" => {
                let v = val("--cold-bytes")?;
                b.cold_bytes = Some(v.parse().map_err(|_| format!("bad --cold-bytes {v:?}: expected a byte count"))?);
            }
            "--json" => b.json = Some(val("--json")?),
            other => return Err(format!("unknown bench option {other:?}; see `dynq help`")),
        }
    }
    Ok(b)
}

/// A deterministic pseudo-random generator (xorshift64*), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (v >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Roughly normal with mean 0 and standard deviation 1 (sum of 4 uniforms).
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| self.next_f32()).sum::<f32>().mul_add(1.732, -3.464)
    }
}

/// Median wall time of `f` over repetitions lasting at least `min_time` (at least 3).
fn time_it(min_time: Duration, mut f: impl FnMut()) -> Duration {
    let timed = time_interleaved(min_time, 1, |_| {
        f();
        Ok::<(), std::convert::Infallible>(())
    });
    match timed {
        Ok(t) => t[0],
        Err(e) => match e {},
    }
}

/// Median wall times of `f(0)`, ..., `f(n - 1)` called in turn, one call each per round, so
/// that load from other processes falls on every variant alike; rounds continue until each
/// has 3 samples and `n * min_time` has passed (at most 1000 rounds). The first call of each
/// (a warm-up of caches and thread pools, not timed) returns the error of a refused variant.
fn time_interleaved<E>(
    min_time: Duration,
    n: usize,
    f: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<Duration>, E> {
    time_rounds(min_time, n, false, f)
}

/// [`time_interleaved`]; `warm`: each timed call follows untimed calls of the same variant,
/// at least one and at least 1 ms of them (steady state: caches, and a pool's helpers, as the
/// variant leaves them).
fn time_rounds<E>(
    min_time: Duration,
    n: usize,
    warm: bool,
    mut f: impl FnMut(usize) -> Result<(), E>,
) -> Result<Vec<Duration>, E> {
    (0..n).try_for_each(&mut f)?;
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); n];
    let start = Instant::now();
    let total = min_time * n as u32;
    while samples[0].len() < 3 || (start.elapsed() < total && samples[0].len() < 1000) {
        for (i, s) in samples.iter_mut().enumerate() {
            if warm {
                // At least 1 ms of untimed calls: a sleeping helper woken by the first may take
                // a few hundred microseconds to arrive (in a VM), longer than a short call.
                let w = Instant::now();
                f(i)?;
                while w.elapsed() < Duration::from_millis(1) {
                    f(i)?;
                }
            }
            let t = Instant::now();
            f(i)?;
            s.push(t.elapsed());
        }
    }
    Ok(samples
        .into_iter()
        .map(|mut s| {
            s.sort();
            s[s.len() / 2]
        })
        .collect())
}

/// Median wall time of `f` called after the pool's helpers have gone to sleep: each call
/// follows a pause of the spin window (`DYNQ_SPIN_US`) plus 2 ms; at least 5 calls, about
/// `min_time` of them (at most 50).
fn time_after_idle<E>(min_time: Duration, mut f: impl FnMut() -> Result<(), E>) -> Result<Duration, E> {
    let pause = dynq::gemm::spin_window().unwrap_or_default() + Duration::from_millis(2);
    let start = Instant::now();
    let mut s = Vec::new();
    while s.len() < 5 || (start.elapsed() < min_time && s.len() < 50) {
        std::thread::sleep(pause);
        let t = Instant::now();
        f()?;
        s.push(t.elapsed());
    }
    s.sort();
    Ok(s[s.len() / 2])
}

/// An `r x c` matrix of `value()`s; a size this machine cannot hold is an error naming the
/// shape's `label`, not an abort.
fn matrix(label: &str, r: usize, c: usize, what: &str, mut value: impl FnMut() -> f32) -> Result<Vec<f32>, String> {
    let len = r.checked_mul(c).filter(|l| l.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize));
    let mut v = Vec::new();
    match len.map(|l| v.try_reserve_exact(l).map(|()| l)) {
        Some(Ok(l)) => {
            v.extend((0..l).map(|_| value()));
            Ok(v)
        }
        _ => Err(format!("{label}: no memory for {what} ({r} x {c} f32)")),
    }
}

/// A JSON number (`null` for NaN and infinities, which JSON lacks).
fn jnum(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// A JSON string.
fn jstr(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The size of the last-level data cache in bytes, as Linux reports it
/// (`/sys/devices/system/cpu/cpu0/cache`), or `None` where it does not.
fn last_level_cache_bytes() -> Option<usize> {
    let dir = std::fs::read_dir("/sys/devices/system/cpu/cpu0/cache").ok()?;
    let mut best: Option<(u32, usize)> = None;
    for e in dir.flatten() {
        let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok().map(|s| s.trim().to_string());
        let (Some(level), Some(ty), Some(size)) = (read("level"), read("type"), read("size")) else {
            continue;
        };
        if ty == "Instruction" {
            continue;
        }
        let Ok(level) = level.parse::<u32>() else { continue };
        let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
        let Ok(v) = digits.parse::<usize>() else { continue };
        let bytes = match unit {
            "" => Some(v),
            "K" => v.checked_mul(1 << 10),
            "M" => v.checked_mul(1 << 20),
            "G" => v.checked_mul(1 << 30),
            _ => None,
        };
        if let Some(bytes) = bytes {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, bytes));
            }
        }
    }
    best.map(|(_, b)| b)
}

/// Bytes of weight copies for the weights-from-memory table: twice the last-level cache (so
/// that a copy is evicted before it comes round again), at least 256 MiB (caches that Linux
/// does not report, or reports per slice), at most 4 GiB.
fn default_cold_bytes() -> usize {
    last_level_cache_bytes().map_or(0, |c| c.saturating_mul(2)).clamp(256 << 20, 4 << 30)
}

/// Median wall times of calls on copies of the weights cycled through in turn (each call on
/// the copy least recently used, so from memory when the copies exceed the caches), for each
/// thread count, the counts interleaved call by call.
fn time_cold(
    copies: &[dynq::PackedWeights],
    min_time: Duration,
    threads: &[usize],
    mut call: impl FnMut(&dynq::PackedWeights, usize) -> Result<(), String>,
) -> Result<Vec<Duration>, String> {
    let mut next = 0;
    time_interleaved(min_time, threads.len(), |i| {
        next = (next + 1) % copies.len();
        call(&copies[next], threads[i])
    })
}

fn bench(args: &[String]) -> Result<(), String> {
    let b = parse_bench(args)?;
    let (isa, stand_in) = select_or_stand_in(b.isa)?;
    let kern = stand_in.or(dynq::kernels::kernel_for(isa)).ok_or("no kernel for this ISA in this build")?;
    // Weights of at most 64 in magnitude run the ISA's narrow-weight entry where it has one,
    // as packing picks it for them.
    let kern = if b.weight_qmax <= 64 { kern.narrow.unwrap_or(kern) } else { kern };
    println!(
        "dynq {} bench: isa={} kernel={} threads={} activations={:?}/{:?} weights=[-{q}, {q}]; baseline fp32 SGEMM = matrixmultiply 0.3 (1 thread)",
        dynq::VERSION,
        isa,
        kern.name,
        b.threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","),
        b.gran,
        b.ty,
        q = b.weight_qmax
    );
    if let Some(k) = stand_in {
        println!(
            "this CPU lacks {isa}: its kernel's code runs as {} (the same instructions in the EVEX \
             encoding), against the peak of that encoding; a CPU with {isa} runs the VEX form",
            k.name
        );
    }
    println!("weights reused across repetitions: figures are for weights in cache where they fit.");
    let peak = dynq::peak::dot_product_gops(isa, b.min_time);
    match peak {
        Some(p) => println!("measured {isa} dot-product peak, 1 thread: {p:.0} GOPS"),
        None => println!("no dot-product peak measured for {isa}"),
    }
    let micro_768 = {
        let kg = dynq::peak::kernel_gops(kern, 768, b.min_time);
        let pct = peak.map_or(String::new(), |p| format!(" = {:.0}% of the peak", 100.0 * kg / p));
        println!("its micro-kernel alone (one tile, K = 768, operands in L1/L2, f32 epilogue): {kg:.0} GOPS{pct}");
        kg
    };
    // One JSON object per shape, for --json.
    let mut records: Vec<String> = Vec::new();
    let mut bw_cache: Vec<(usize, f64)> = Vec::new();
    println!();
    println!(
        "{:<22} {:>16} {:>9} {:>7} {:>6} {:>7} {:>6} {:>9} {:>7} {:>8} {:>8} {:>9}",
        "layer",
        "MxNxK",
        "dynq ms",
        "GOPS",
        "%peak",
        "W GB/s",
        "%bw",
        "fp32 ms",
        "GFLOPS",
        "speedup",
        "rel.err",
        "cosine"
    );
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    // (label, shape, operations, dynq ms, activation quantization ms, tiles at the
    // micro-kernel's rate ms).
    let mut breakdown: Vec<(String, String, f64, f64, f64, Option<f64>)> = Vec::new();
    let mut micro_cache: Vec<(usize, Option<f64>)> = Vec::new();
    // (label, shape, median ms per thread count, the same after the helpers slept (counts > 1)).
    type Scaling = (String, String, Vec<f64>, Vec<Option<f64>>);
    let mut scaling: Vec<Scaling> = Vec::new();
    // Weights from memory: (label, shape, weight bytes, copies, median ms per thread count).
    let cold_bytes = b.cold_bytes.unwrap_or_else(default_cold_bytes);
    let mut cold: Vec<(String, String, usize, usize, Vec<f64>)> = Vec::new();
    for (label, m, n, k) in &b.shapes {
        let (m, n, k) = (*m, *n, *k);
        let a = matrix(label, m, k, "A", || rng.normal())?;
        let wscale = 1.0 / (k as f32).sqrt();
        let w_kn = matrix(label, k, n, "the weights", || rng.normal() * wscale)?;
        let bias: Vec<f32> = (0..n).map(|_| rng.normal() * 0.1).collect();
        // The kernel measured: the ISA's own, or its stand-in.
        let pw = dynq::pack::Reservation::for_kernel(n, k, kern)
            .and_then(|r| r.fill_f32(&w_kn, WeightLayout::KN, PackOptions::default().granularity, b.weight_qmax))
            .map_err(|e| e.to_string())?;
        let opts = |num_threads| GemmOptions {
            act_granularity: b.gran,
            act_type: b.ty,
            epilogue: Epilogue::None,
            num_threads,
        };
        let mut y = matrix(label, m, n, "Y", || 0.0)?;
        // The warm-up call of each count reports what the library refuses (say, too many threads).
        // Each timed call follows >= 1 ms of untimed ones with the same count: figures for calls
        // made back to back, as a model's layers are, with the pool's helpers awake (called in
        // turn with another count, they would have gone to sleep in between: see `idle` below).
        let mut call = |t: usize| {
            dynq::gemm(&pw, &a, m, k, Some(&bias), &mut y, n, &opts(t)).map_err(|e| format!("--threads {t}: {e}"))
        };
        let t_threads = time_rounds(b.min_time, b.threads.len(), true, |i| call(b.threads[i]))?;
        // With several counts, each also after the helpers have gone to sleep (the first call
        // after a pause).
        let t_idle: Vec<Option<Duration>> = b
            .threads
            .iter()
            .map(|&t| match b.threads.len() > 1 {
                true => time_after_idle(b.min_time, || call(t)).map(Some),
                false => Ok(None),
            })
            .collect::<Result<_, _>>()?;
        let t_q = t_threads[0];
        if b.threads.len() > 1 {
            scaling.push((
                label.clone(),
                format!("{m}x{n}x{k}"),
                t_threads.iter().map(|t| t.as_secs_f64() * 1e3).collect(),
                t_idle.iter().map(|t| t.map(|d| d.as_secs_f64() * 1e3)).collect(),
            ));
        }
        // Shapes bound by the weight stream: also with the weights read from memory, as a
        // model's layers are when each is read once per token.
        let mut cold_ms: Option<Vec<f64>> = None;
        let packed_bytes = pw.packed_data().len();
        let copies = cold_bytes / packed_bytes.max(1);
        if m <= 16 && packed_bytes >= 1 << 20 && copies >= 2 {
            let mut v = Vec::new();
            if v.try_reserve_exact(copies).is_ok() {
                v.extend((0..copies).map(|_| pw.clone()));
                let t = time_cold(&v, b.min_time, &b.threads, |w, t| {
                    dynq::gemm(w, &a, m, k, Some(&bias), &mut y, n, &opts(t)).map_err(|e| format!("--threads {t}: {e}"))
                })?;
                let ms: Vec<f64> = t.iter().map(|d| d.as_secs_f64() * 1e3).collect();
                cold.push((label.clone(), format!("{m}x{n}x{k}"), packed_bytes, copies, ms.clone()));
                cold_ms = Some(ms);
            }
        }
        let mut y_ref = matrix(label, m, n, "Y", || 0.0)?;
        let t_f = time_it(b.min_time, || {
            for row in y_ref.chunks_exact_mut(n) {
                row.copy_from_slice(&bias);
            }
            // SAFETY: the pointers and strides describe the buffers above (m x k, k x n, m x n).
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    w_kn.as_ptr(),
                    n as isize,
                    1,
                    1.0,
                    y_ref.as_mut_ptr(),
                    n as isize,
                    1,
                )
            }
        });
        let (mut dot, mut nq, mut nr, mut diff) = (0f64, 0f64, 0f64, 0f64);
        for (q, r) in y.iter().zip(&y_ref) {
            let (q, r) = (*q as f64, *r as f64);
            dot += q * r;
            nq += q * q;
            nr += r * r;
            diff += (q - r) * (q - r);
        }
        let ops = 2.0 * (m * n * k) as f64;
        let gops = ops / t_q.as_secs_f64() / 1e9;
        let wbytes = n * k;
        let bw = match bw_cache.iter().find(|(s, _)| *s == wbytes) {
            Some(&(_, bw)) => bw,
            None => {
                let bw = dynq::peak::read_bandwidth_gbs(wbytes, b.min_time).map_err(|e| format!("{label}: {e}"))?;
                bw_cache.push((wbytes, bw));
                bw
            }
        };
        let wgbs = wbytes as f64 / t_q.as_secs_f64() / 1e9;
        // (activation quantization ms, tiles at the micro-kernel's rate ms), with one thread first.
        let mut parts_ms: Option<(f64, Option<f64>)> = None;
        if b.threads[0] == 1 {
            // The activation quantization alone (the same row operations, one thread) and the
            // product at the rate the micro-kernel reaches alone for this K.
            let kp = kern.padded_k(k);
            // The buffer is reused from call to call, as the GEMM does.
            let mut buf = Vec::new();
            let t_a = time_it(b.min_time, || {
                let qa = dynq::quant::activations::quantize_activations_reusing(
                    kern.ops,
                    kern.a_bytes,
                    &a,
                    m,
                    k,
                    k,
                    b.gran,
                    b.ty,
                    kp,
                    m,
                    std::mem::take(&mut buf),
                )
                .expect("quantize");
                buf = std::hint::black_box(qa).data;
            });
            let micro = match micro_cache.iter().find(|(kk, _)| *kk == k) {
                Some(&(_, g)) => g,
                None => {
                    let g = Some(dynq::peak::kernel_gops(kern, k, b.min_time));
                    micro_cache.push((k, g));
                    g
                }
            };
            let parts = (t_a.as_secs_f64() * 1e3, micro.map(|g| ops / g / 1e6));
            breakdown.push((label.clone(), format!("{m}x{n}x{k}"), ops, t_q.as_secs_f64() * 1e3, parts.0, parts.1));
            parts_ms = Some(parts);
        }
        println!(
            "{:<22} {:>16} {:>9.3} {:>7.1} {:>6} {:>7.1} {:>5.0}% {:>9.3} {:>7.1} {:>7.2}x {:>8.2e} {:>9.6}",
            label,
            format!("{m}x{n}x{k}"),
            t_q.as_secs_f64() * 1e3,
            gops,
            peak.map_or("-".to_string(), |p| format!("{:.0}%", 100.0 * gops / p)),
            wgbs,
            100.0 * wgbs / bw,
            t_f.as_secs_f64() * 1e3,
            ops / t_f.as_secs_f64() / 1e9,
            t_f.as_secs_f64() / t_q.as_secs_f64(),
            (diff / nr).sqrt(),
            dot / (nq.sqrt() * nr.sqrt()),
        );
        if b.json.is_some() {
            let threads_ms: Vec<String> = b
                .threads
                .iter()
                .zip(&t_threads)
                .map(|(t, d)| format!("{}: {}", jstr(&t.to_string()), jnum(d.as_secs_f64() * 1e3)))
                .collect();
            let idle_ms: Vec<String> = b
                .threads
                .iter()
                .zip(&t_idle)
                .filter_map(|(t, d)| d.map(|d| format!("{}: {}", jstr(&t.to_string()), jnum(d.as_secs_f64() * 1e3))))
                .collect();
            let parts = parts_ms.map_or(String::new(), |(qa, tiles)| {
                format!(
                    ", \"quant_ms\": {}, \"tiles_at_micro_kernel_ms\": {}",
                    jnum(qa),
                    tiles.map_or("null".into(), jnum)
                )
            });
            let cold_json = cold_ms.as_ref().map_or(String::new(), |ms| {
                let per: Vec<String> =
                    b.threads.iter().zip(ms).map(|(t, v)| format!("{}: {}", jstr(&t.to_string()), jnum(*v))).collect();
                format!(", \"cold_copies\": {copies}, \"cold_threads_ms\": {{{}}}", per.join(", "))
            });
            records.push(format!(
                "{{\"layer\": {}, \"m\": {m}, \"n\": {n}, \"k\": {k}, \"dynq_ms\": {}, \"gops\": {}, \"pct_peak\": {}, \
                 \"weight_gbs\": {}, \"read_gbs\": {}, \"pct_bw\": {}, \"fp32_ms\": {}, \"fp32_gflops\": {}, \"speedup\": {}, \
                 \"rel_err\": {}, \"cosine\": {}, \"threads_ms\": {{{}}}, \"threads_idle_ms\": {{{}}}{parts}{cold_json}}}",
                jstr(label),
                jnum(t_q.as_secs_f64() * 1e3),
                jnum(gops),
                peak.map_or("null".into(), |p| jnum(100.0 * gops / p)),
                jnum(wgbs),
                jnum(bw),
                jnum(100.0 * wgbs / bw),
                jnum(t_f.as_secs_f64() * 1e3),
                jnum(ops / t_f.as_secs_f64() / 1e9),
                jnum(t_f.as_secs_f64() / t_q.as_secs_f64()),
                jnum((diff / nr).sqrt()),
                jnum(dot / (nq.sqrt() * nr.sqrt())),
                threads_ms.join(", "),
                idle_ms.join(", "),
            ));
        }
    }
    // The read bandwidth for a buffer as large as the copies (1 thread): the limit for them.
    let cold_bw = match cold.is_empty() {
        true => None,
        false => {
            Some(dynq::peak::read_bandwidth_gbs(cold_bytes, b.min_time).map_err(|e| format!("--cold-bytes: {e}"))?)
        }
    };
    if let Some(path) = &b.json {
        let doc = format!(
            "{{\"dynq\": {}, \"isa\": {}, \"kernel\": {}, \"stand_in\": {}, \"threads\": [{}], \
             \"act_granularity\": {}, \"act_type\": {}, \"weight_qmax\": {}, \"peak_gops\": {}, \
             \"micro_kernel_gops_k768\": {}, \"cold_bytes\": {}, \"cold_read_gbs\": {}, \
             \"fp32_baseline\": \"matrixmultiply 0.3, 1 thread\", \"shapes\": [\n  {}\n]}}\n",
            jstr(dynq::VERSION),
            jstr(&isa.to_string()),
            jstr(kern.name),
            stand_in.map_or("null".into(), |k| jstr(k.name)),
            b.threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(", "),
            jstr(&format!("{:?}", b.gran)),
            jstr(&format!("{:?}", b.ty)),
            b.weight_qmax,
            peak.map_or("null".into(), jnum),
            jnum(micro_768),
            cold_bytes,
            cold_bw.map_or("null".into(), jnum),
            records.join(",\n  "),
        );
        if path == "-" {
            print!("{doc}");
        } else {
            std::fs::write(path, doc).map_err(|e| format!("--json {path}: {e}"))?;
        }
    }
    println!();
    println!(
        "GOPS = 2*M*N*K / time (int8 multiply-adds for dynq, fp32 for the baseline); %peak = GOPS / the measured\n\
         dot-product peak; W GB/s = int8 weight bytes / time, %bw = that / the measured read bandwidth for a buffer\n\
         of the weights' size (the limit for small M); speedup = fp32 time / dynq time;"
    );
    println!(
        "rel.err = ||Y_dynq - Y_fp32|| / ||Y_fp32|| (Frobenius); cosine between the two outputs. Times are medians."
    );
    if let Some(bw) = cold_bw {
        println!();
        println!(
            "weights from memory (calls cycle through copies of the packed weights, {} MiB in all, as a model's \
             layers are read once per token;\nread bandwidth for a buffer of that size, 1 thread: {bw:.1} GB/s):",
            cold_bytes >> 20
        );
        let heads: String = b.threads.iter().map(|t| format!("{:>9}{:>8}", format!("{t}T ms"), "W GB/s")).collect();
        println!("{:<22} {:>16} {:>7} {heads} {:>8}", "layer", "MxNxK", "copies", "%bw 1st");
        for (label, shape, wbytes, copies, ms) in &cold {
            let cols: String = ms.iter().map(|v| format!("{v:>9.3}{:>8.1}", *wbytes as f64 / v / 1e6)).collect();
            println!("{label:<22} {shape:>16} {copies:>7} {cols} {:>7.0}%", 100.0 * *wbytes as f64 / ms[0] / 1e6 / bw);
        }
        println!(
            "%bw 1st = weight bytes per second at the first thread count / that read bandwidth (one thread's; more\n\
             threads can exceed it: a core keeps a limited number of reads from memory in flight)."
        );
    }
    if !scaling.is_empty() {
        println!();
        // What the threads can give where the dot-product instruction is the limit: two
        // vCPUs on one core's two hyperthreads share its units.
        for &t in b.threads.iter().filter(|&&t| t > 1) {
            if let Some((one, all)) = dynq::peak::dot_product_scaling(isa, t, b.min_time) {
                println!(
                    "{isa} dot-product peak, {t} threads at once: {all:.0} GOPS = {:.2}x 1 thread's {one:.0} (runs in turn)",
                    all / one
                );
            }
        }
        println!(
            "thread counts (dynq ms, medians of calls made in turn, each after >= 1 ms of untimed calls with the same count; \
             x = speedup over {} thread(s);\nidle = the first call after the pool's helpers went to sleep, a pause of \
             the spin window (DYNQ_SPIN_US) + 2 ms before each):",
            b.threads[0]
        );
        let multi: Vec<usize> = b.threads.clone();
        let heads: String = b.threads.iter().map(|t| format!("{:>9}", format!("{t}T ms"))).collect();
        let ratios: String = b.threads[1..].iter().map(|t| format!("{:>7}", format!("{t}T x"))).collect();
        let idle: String = multi.iter().map(|t| format!("{:>12}", format!("{t}T idle ms"))).collect();
        println!("{:<22} {:>16} {heads} {ratios} {idle}", "layer", "MxNxK");
        for (label, shape, ms, idle_ms) in &scaling {
            println!(
                "{:<22} {:>16} {} {} {}",
                label,
                shape,
                ms.iter().map(|v| format!("{v:>9.3}")).collect::<String>(),
                ms[1..].iter().map(|v| format!("{:>6.2}x", ms[0] / v)).collect::<String>(),
                idle_ms.iter().flatten().map(|v| format!("{v:>12.3}")).collect::<String>()
            );
        }
    }
    if !breakdown.is_empty() {
        println!();
        println!("where the time goes (1 thread):");
        println!(
            "{:<22} {:>16} {:>9} {:>9} {:>11} {:>9} {:>7} {:>9}",
            "layer", "MxNxK", "dynq ms", "quant ms", "tiles@uk ms", "sum ms", "rest", "bound"
        );
        for (label, shape, ops, t, qa, tiles) in &breakdown {
            let sum = tiles.map(|tl| tl + qa);
            println!(
                "{:<22} {:>16} {:>9.3} {:>9.3} {:>11} {:>9} {:>7} {:>9}",
                label,
                shape,
                t,
                qa,
                tiles.map_or("-".into(), |v| format!("{v:.3}")),
                sum.map_or("-".into(), |v| format!("{v:.3}")),
                sum.map_or("-".into(), |v| format!("{:.0}%", 100.0 * (t - v) / t)),
                match (sum, peak) {
                    (Some(v), Some(p)) => format!("{:.0}%", 100.0 * ops / v / 1e6 / p),
                    _ => "-".into(),
                },
            );
        }
        println!(
            "quant ms = the activation range and quantization passes alone; tiles@uk ms = the product at the rate of\n\
             the micro-kernel alone for this K (`dynq peak`: one tile, operands in cache, f32 epilogue); rest = the\n\
             share of dynq's time beyond their sum (blocking, weights and outputs from memory, calls); bound =\n\
             the %peak that the sum would give: what this kernel and quantizer can reach on this shape."
        );
    }
    Ok(())
}
