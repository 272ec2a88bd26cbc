//! The `dynq` command line: info, bench, and how it reports a bad DYNQ_ISA / DYNQ_NUM_THREADS.

use std::process::Command;

fn dynq(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dynq"));
    c.args(args).env_remove("DYNQ_ISA").env_remove("DYNQ_NUM_THREADS").env_remove("DYNQ_SPIN_US");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run dynq");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn info_lists_isa_and_kernels() {
    let (ok, out) = dynq(&["info"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("selected ISA: "), "{out}");
    assert!(out.contains("gemm_u8s8_i32_"), "{out}");
    let (ok, out) = dynq(&["info"], &[("DYNQ_ISA", "scalar")]);
    assert!(ok && out.contains("selected ISA: scalar (forced by DYNQ_ISA)"), "{out}");
}

#[test]
fn peak_prints_json() {
    let (ok, out) = dynq(&["peak", "--bytes", "65536"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("\"dot_product_gops\"") && out.contains("\"65536\""), "{out}");
    // The micro-kernel ceiling is measured for every ISA with a kernel, scalar included.
    let (ok, out) = dynq(&["peak", "--isa", "scalar", "--bytes", "4096"], &[]);
    assert!(ok, "{out}");
    let kernel = out.split("\"micro_kernel_gops_by_k\": {").nth(1).unwrap_or_else(|| panic!("{out}"));
    let first: f64 =
        kernel.split(['"', ':', ',']).map(str::trim).filter(|s| !s.is_empty()).nth(1).unwrap().parse().unwrap();
    assert!(first > 0.0, "{out}");
    // --threads N: the dot-product loop on 1 and on N threads at once, with their ratio.
    let (ok, out) = dynq(&["peak", "--threads", "2", "--bytes", "4096"], &[]);
    assert!(ok && out.contains("\"dot_product_threads\": {\"threads\": 2, "), "{out}");
    if !out.contains("\"dot_product_gops\": null") {
        let scaling: f64 = out.split("\"scaling\": ").nth(1).unwrap().split('}').next().unwrap().parse().unwrap();
        assert!(scaling > 0.1 && scaling < 2.5, "{out}");
    }
    for bad in ["0", "lots", "257"] {
        let (ok, out) = dynq(&["peak", "--threads", bad], &[]);
        assert!(!ok && out.contains("--threads") && out.contains("thread count"), "{bad}: {out}");
    }
}

#[test]
fn bench_prints_a_table() {
    let (ok, out) = dynq(&["bench", "--shapes", "3x20x30", "--min-time", "0", "--threads", "2"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("3x20x30") && out.contains("speedup"), "{out}");
    assert!(!out.contains("where the time goes"), "the breakdown is for one thread: {out}");
    // One thread: the breakdown (activation quantization, the product at the micro-kernel's
    // rate) follows, with a row per shape.
    let (ok, out) = dynq(&["bench", "--shapes", "3x20x30,5x7x9", "--min-time", "0"], &[]);
    assert!(ok, "{out}");
    let tail = out.split("where the time goes").nth(1).unwrap_or_else(|| panic!("no breakdown: {out}"));
    assert!(tail.contains("3x20x30") && tail.contains("5x7x9") && tail.contains("quant ms"), "{out}");
}

/// Several thread counts: the main table is the first count's, a table gives each count's time
/// and its speedup over the first, row by shape; the breakdown follows when the first is 1.
#[test]
fn bench_times_several_thread_counts() {
    let (ok, out) = dynq(&["bench", "--shapes", "3x20x30,9x33x17", "--min-time", "0", "--threads", "1,2,3"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains("threads=1,2,3"), "{out}");
    let tail = out.split("thread counts").nth(1).unwrap_or_else(|| panic!("no thread table: {out}"));
    let table = tail.split("where the time goes").next().unwrap();
    for head in ["1T ms", "2T ms", "3T ms", "2T x", "3T x", "1T idle ms", "3T idle ms"] {
        assert!(table.contains(head), "{head}: {out}");
    }
    for shape in ["3x20x30", "9x33x17"] {
        let row = table.lines().find(|l| l.contains(shape)).unwrap_or_else(|| panic!("{shape}: {out}"));
        // label, shape, 3 times, 2 ratios, 3 times after idle
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols.len(), 10, "{row}");
        let times = |c: &[&str]| c.iter().all(|v| v.parse::<f64>().is_ok_and(|v| v > 0.0));
        assert!(times(&cols[2..5]) && times(&cols[7..]), "{row}");
        assert!(cols[5..7].iter().all(|v| v.ends_with('x')), "{row}");
    }
    assert!(tail.contains("where the time goes"), "{out}");
    // --json: the same figures as a document (checked as JSON by the CI smoke step).
    let path = std::env::temp_dir().join(format!("dynq-bench-{}.json", std::process::id()));
    let p = path.to_str().unwrap();
    let (ok, out) =
        dynq(&["bench", "--shapes", "3x20x30,9x33x17", "--min-time", "0", "--threads", "1,2", "--json", p], &[]);
    assert!(ok, "{out}");
    let doc = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert!(doc.starts_with("{\"dynq\": ") && doc.trim_end().ends_with("]}"), "{doc}");
    assert_eq!(doc.matches("\"layer\": ").count(), 2, "{doc}");
    assert_eq!(doc.matches("\"threads_ms\": {\"1\": ").count(), 2, "{doc}");
    assert!(doc.contains("\"threads\": [1, 2]") && doc.contains("\"quant_ms\": "), "{doc}");
    let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--min-time", "0", "--json", "/nonexistent-dir/x.json"], &[]);
    assert!(!ok && out.contains("--json /nonexistent-dir/x.json"), "{out}");
    // One count: no thread table.
    let (ok, out) = dynq(&["bench", "--shapes", "3x20x30", "--min-time", "0", "--threads", "2"], &[]);
    assert!(ok && !out.contains("thread counts"), "{out}");
    for bad in ["nan", "-1", "inf", "61"] {
        let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--min-time", bad], &[]);
        assert!(!ok && out.contains("--min-time") && !out.contains("panicked"), "{bad}: {out}");
    }
    for bad in ["abc", "-1", "", "1e9", "99999999999999999999999"] {
        let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--min-time", "0", "--cold-bytes", bad], &[]);
        assert!(!ok && out.contains("--cold-bytes") && !out.contains("panicked"), "{bad:?}: {out}");
    }
    let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--cold-bytes"], &[]);
    assert!(!ok && out.contains("--cold-bytes needs a value"), "{out}");
    for bad in ["1,x", "", "1,,2", "-1", "1,100000"] {
        let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--threads", bad], &[]);
        assert!(!ok && out.contains("--threads"), "{bad:?}: {out}");
    }
}

/// `--weight-qmax`: the kernel line names the ISA's narrow-weight kernel where it has one, the
/// weights' range is printed, and a value outside 1..=127 is refused; `peak --narrow` names the
/// kernel it measured.
#[test]
fn bench_and_peak_with_narrow_weights() {
    let kern = dynq::kernels::kernel_for(dynq::isa::active().unwrap()).unwrap();
    let want = kern.narrow.unwrap_or(kern).name;
    let (ok, out) = dynq(&["bench", "--shapes", "7x40x50", "--min-time", "0", "--weight-qmax", "64"], &[]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("kernel={want}")) && out.contains("weights=[-64, 64]"), "{out}");
    for bad in ["0", "128", "x"] {
        let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--weight-qmax", bad], &[]);
        assert!(!ok && out.contains("--weight-qmax"), "{bad}: {out}");
    }
    let (ok, out) = dynq(&["peak", "--bytes", "4096", "--narrow"], &[]);
    assert!(ok && out.contains(&format!("\"kernel\": \"{want}\"")), "{out}");
}

#[test]
fn bad_environment_is_reported_not_crashed() {
    #[cfg(target_arch = "x86_64")]
    let foreign = "neon_i8mm";
    #[cfg(not(target_arch = "x86_64"))]
    let foreign = "avx512_vnni";
    let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--min-time", "0"], &[("DYNQ_ISA", foreign)]);
    assert!(!ok);
    assert!(out.contains(foreign) && out.contains("does not support"), "{out}");
    let (ok, out) = dynq(&["bench", "--shapes", "2x8x8"], &[("DYNQ_ISA", "sse9")]);
    assert!(!ok && out.contains("names no ISA"), "{out}");
    let (ok, out) = dynq(&["bench", "--shapes", "2x8x8", "--threads", "0"], &[("DYNQ_NUM_THREADS", "lots")]);
    assert!(!ok && out.contains("DYNQ_NUM_THREADS"), "{out}");
    // A bad DYNQ_SPIN_US: reported by a call that would use worker threads, and by `info`.
    for bad in ["lots", "-1", "1000001"] {
        let (ok, out) =
            dynq(&["bench", "--shapes", "64x256x256", "--threads", "2", "--min-time", "0"], &[("DYNQ_SPIN_US", bad)]);
        assert!(!ok && out.contains("DYNQ_SPIN_US"), "{bad}: {out}");
        let (ok, out) = dynq(&["info"], &[("DYNQ_SPIN_US", bad)]);
        assert!(ok && out.contains("DYNQ_SPIN_US") && out.contains("between 0 and 1000000"), "{bad}: {out}");
    }
    let (ok, out) = dynq(&["info"], &[("DYNQ_SPIN_US", "0")]);
    assert!(ok && out.contains("wait for the next call: 0 us"), "{out}");
    let (ok, _) =
        dynq(&["bench", "--shapes", "64x256x256", "--threads", "2", "--min-time", "0"], &[("DYNQ_SPIN_US", "0")]);
    assert!(ok);
    // Sizes no buffer can have: an error naming the shape, not an abort.
    let (ok, out) = dynq(&["bench", "--shapes", "18446744073709551615x2x2", "--min-time", "0"], &[]);
    assert!(!ok && out.contains("no memory for A"), "{out}");
    let (ok, out) = dynq(&["bench", "--shapes", "2x4611686018427387904x2", "--min-time", "0"], &[]);
    assert!(!ok && out.contains("no memory for the weights"), "{out}");
    let (ok, out) = dynq(&["peak", "--bytes", "lots"], &[]);
    assert!(!ok && out.contains("bad size"), "{out}");
    // A buffer of no bytes, or of more than memory can hold: an error, not a rate of 0.
    for bytes in ["0", "18446744073709551615", "4096,0"] {
        let (ok, out) = dynq(&["peak", "--bytes", bytes], &[]);
        assert!(!ok && out.contains("--bytes") && !out.contains("read_gbs"), "{bytes}: {out}");
    }
    let (ok, out) = dynq(&["peak", "--isa", "sse9"], &[]);
    assert!(!ok && out.contains("unknown ISA"), "{out}");
    let (ok, out) = dynq(&["frobnicate"], &[]);
    assert!(!ok && out.contains("unknown command"), "{out}");
}

/// `--isa avx_vnni` on a CPU that lacks AVX-VNNI but has AVX-512 VNNI measures the AVX-VNNI
/// kernel's code through its EVEX twin, and says so; where neither exists it is refused.
#[test]
fn avx_vnni_is_measured_through_its_stand_in() {
    let stand_in = dynq::kernels::stand_in_for(dynq::Isa::AvxVnni);
    let runs = stand_in.is_some() || dynq::isa::resolve(dynq::Isa::AvxVnni).is_ok();
    let (ok, out) = dynq(&["peak", "--isa", "avx_vnni", "--bytes", "4096"], &[]);
    assert_eq!(ok, runs, "{out}");
    let (ok, bench) = dynq(&["bench", "--isa", "avx_vnni", "--shapes", "3x20x30", "--min-time", "0"], &[]);
    assert_eq!(ok, runs, "{bench}");
    match stand_in {
        Some(k) => {
            assert!(out.contains(&format!("\"stand_in\": \"{}\"", k.name)), "{out}");
            assert!(!out.contains("\"dot_product_gops\": null"), "{out}");
            assert!(bench.contains("this CPU lacks avx_vnni") && bench.contains(k.name), "{bench}");
            assert!(bench.contains("3x20x30"), "{bench}");
            let (ok, info) = dynq(&["info"], &[]);
            assert!(ok && info.contains(&format!("measurable through {}", k.name)), "{info}");
        }
        None if runs => assert!(out.contains("\"stand_in\": null"), "{out}"),
        None => assert!(out.contains("does not support"), "{out}"),
    }
}
