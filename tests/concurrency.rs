//! Many threads on one shared packed-weights handle (a BERT-sized 768 -> 256 layer), through
//! the C ABI: GEMMs with different batch sizes, options, element types and thread counts
//! (0 = default, 1..4) give results bit-identical to a single-threaded run made beforehand;
//! meanwhile the same threads serialize and query the handle, load private copies from its
//! blob and free them, and fail on purpose to check that error messages stay per thread.
//! Once all users are done, the last one frees the shared handle.
//!
//! Bounded in time: the threads stop early after `DEADLINE` (and the test then still requires
//! a minimum amount of work). The figures are printed (`-- --nocapture`).

use dynq::ffi::*;
use dynq::Status;
use half::{bf16, f16};
use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const THREADS: usize = 16;
const CALLS_PER_THREAD: usize = 60;
const DEADLINE: Duration = Duration::from_secs(60);
const N: usize = 256;
const K: usize = 768;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// One GEMM request and its single-threaded answer.
struct Request {
    m: usize,
    a: Vec<f32>,
    a16: Vec<f16>,
    bias: Option<Vec<f32>>,
    config: dynq_gemm_config,
    /// f32 output of dynq_gemm, and bf16 output of dynq_gemm_ex from f16 activations.
    want: Vec<u32>,
    want_bf16: Vec<u16>,
}

/// The shared handle: a raw pointer used by many threads, freed by its last user.
struct Shared {
    p: *mut dynq_packed_weights,
    users: AtomicUsize,
}
// SAFETY: the handle is immutable and documented thread-safe; it is freed once, by the last
// user, after every other user is done with it.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn done(&self) {
        if self.users.fetch_sub(1, Ordering::AcqRel) == 1 {
            // SAFETY: the last user; nobody uses the handle any more.
            unsafe { dynq_packed_weights_free(self.p) };
        }
    }
}

fn config(act_granularity: u32, act_type: u32, epilogue: u32, num_threads: u32) -> dynq_gemm_config {
    let mut c = unsafe { std::mem::zeroed::<dynq_gemm_config>() };
    // SAFETY: a writable config.
    assert_eq!(unsafe { dynq_gemm_config_init(&mut c) }, Status::Ok);
    c.act_granularity = act_granularity;
    c.act_type = act_type;
    c.epilogue = epilogue;
    c.num_threads = num_threads;
    c
}

/// Runs a request with the given thread count; returns the f32 and bf16 outputs as bits.
fn run(p: *const dynq_packed_weights, r: &Request, threads: u32) -> (Vec<u32>, Vec<u16>) {
    let c = dynq_gemm_config { num_threads: threads, ..r.config };
    let bias = r.bias.as_ref().map_or(null(), |b| b.as_ptr());
    let mut y = vec![0f32; r.m * N];
    // SAFETY: a is m x K, y is m x N, bias N values; the handle is live.
    let st = unsafe { dynq_gemm(p, r.a.as_ptr(), r.m, K, bias, y.as_mut_ptr(), N, &c) };
    assert_eq!(st, Status::Ok);
    let mut yb = vec![bf16::ZERO; r.m * N];
    // SAFETY: as above, with f16 activations and bf16 output.
    let st = unsafe {
        dynq_gemm_ex(p, r.a16.as_ptr() as *const c_void, 1, r.m, K, bias, yb.as_mut_ptr() as *mut c_void, 2, N, &c)
    };
    assert_eq!(st, Status::Ok);
    (y.iter().map(|v| v.to_bits()).collect(), yb.iter().map(|v| v.to_bits()).collect())
}

fn last_message() -> String {
    let mut buf = vec![0u8; 1024];
    // SAFETY: buf has buf.len() writable bytes.
    let len = unsafe { dynq_last_error_message(buf.as_mut_ptr() as *mut _, buf.len()) };
    String::from_utf8_lossy(&buf[..len.min(1023)]).into_owned()
}

#[test]
fn many_threads_one_handle_identical_results_then_freed() {
    let mut rng = Rng(42);
    let w: Vec<f32> = (0..N * K).map(|_| rng.f32() * 0.05).collect();
    let mut p = null_mut();
    // SAFETY: w has N * K floats.
    assert_eq!(unsafe { dynq_pack_weights(w.as_ptr(), N, K, 0, null(), &mut p) }, Status::Ok);
    let mut need = 0usize;
    // SAFETY: live handle.
    assert_eq!(unsafe { dynq_packed_weights_serialize(p, null_mut(), 0, &mut need) }, Status::Ok);
    let mut blob = vec![0u8; need];
    // SAFETY: blob has need bytes.
    assert_eq!(unsafe { dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need, &mut need) }, Status::Ok);

    // The requests and their single-threaded results.
    let mut requests = Vec::new();
    for (i, &m) in [1usize, 7, 33, 64, 13, 128].iter().enumerate() {
        let a: Vec<f32> = (0..m * K).map(|j| rng.f32() * if j % 97 == 0 { 8.0 } else { 1.0 }).collect();
        let a16 = a.iter().map(|&v| f16::from_f32(v)).collect();
        let bias = (i % 2 == 0).then(|| (0..N).map(|_| rng.f32()).collect());
        let config = config((i % 2) as u32, (i / 2 % 2) as u32, (i % 3) as u32, 1);
        let mut r = Request { m, a, a16, bias, config, want: Vec::new(), want_bf16: Vec::new() };
        (r.want, r.want_bf16) = run(p, &r, 1);
        requests.push(r);
    }
    let requests = Arc::new(requests);
    let blob = Arc::new(blob);
    let shared = Arc::new(Shared { p, users: AtomicUsize::new(THREADS + 1) });
    let macs_per_round: usize = requests.iter().map(|r| 2 * r.m * N * K).sum::<usize>() / requests.len();
    let start = Instant::now();

    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (requests, blob, shared) = (requests.clone(), blob.clone(), shared.clone());
            std::thread::spawn(move || -> (usize, usize) {
                let p = shared.p as *const dynq_packed_weights;
                let mut calls = 0;
                let mut private_handles = 0;
                for c in 0..CALLS_PER_THREAD {
                    if start.elapsed() > DEADLINE {
                        break;
                    }
                    let r = &requests[(t + c) % requests.len()];
                    let threads = ((t + 3 * c) % 5) as u32; // 0 (default), 1, 2, 3, 4
                    let (y, yb) = run(p, r, threads);
                    assert!(y == r.want, "thread {t} call {c}: f32 result differs (m={}, threads={threads})", r.m);
                    assert!(yb == r.want_bf16, "thread {t} call {c}: bf16 result differs");
                    calls += 2;
                    match c % 6 {
                        0 => {
                            // A private copy from the shared blob, used and freed at once.
                            let mut q = null_mut();
                            // SAFETY: blob has blob.len() bytes.
                            let st =
                                unsafe { dynq_packed_weights_deserialize(blob.as_ptr(), blob.len(), null(), &mut q) };
                            assert_eq!(st, Status::Ok);
                            let (y2, _) = run(q, r, threads);
                            assert!(y2 == r.want, "thread {t}: private copy differs");
                            calls += 2;
                            // SAFETY: our own handle, freed once.
                            unsafe { dynq_packed_weights_free(q) };
                            private_handles += 1;
                        }
                        1 => {
                            // Serialize the shared handle concurrently.
                            let mut out = vec![0u8; blob.len()];
                            let mut written = 0usize;
                            // SAFETY: out has blob.len() bytes.
                            let st =
                                unsafe { dynq_packed_weights_serialize(p, out.as_mut_ptr(), out.len(), &mut written) };
                            assert_eq!(st, Status::Ok);
                            assert!(out == *blob);
                        }
                        2 => {
                            // A failure of this thread's own: its message, not another's.
                            let mut bad = r.a.clone();
                            bad[t % K] = f32::NAN;
                            let mut y = vec![0f32; r.m * N];
                            let c1 = dynq_gemm_config { num_threads: threads, ..r.config };
                            // SAFETY: buffers of the claimed sizes.
                            let st = unsafe { dynq_gemm(p, bad.as_ptr(), r.m, K, null(), y.as_mut_ptr(), N, &c1) };
                            assert_eq!(st, Status::NonFinite);
                            let msg = last_message();
                            assert!(msg.contains(&format!("A[0][{}]", t % K)), "thread {t}: message {msg:?}");
                        }
                        _ => {
                            let mut info = unsafe { std::mem::zeroed::<dynq_packed_weights_info>() };
                            info.struct_size = std::mem::size_of::<dynq_packed_weights_info>() as u32;
                            // SAFETY: live handle, valid info.
                            assert_eq!(unsafe { dynq_packed_weights_get_info(p, &mut info) }, Status::Ok);
                            assert_eq!((info.n, info.k), (N, K));
                        }
                    }
                }
                shared.done();
                (calls, private_handles)
            })
        })
        .collect();
    let mut total_calls = 0;
    let mut total_private = 0;
    for h in handles {
        let (c, p) = h.join().expect("a worker thread failed");
        total_calls += c;
        total_private += p;
    }
    shared.done(); // the main thread's own use; the last of all frees the handle
    assert_eq!(shared.users.load(Ordering::Acquire), 0);
    let elapsed = start.elapsed();
    println!(
        "concurrency: {THREADS} threads on one {N}x{K} handle, {total_calls} GEMM calls (~{:.1} GFLOP), \
         {total_private} private handles loaded and freed, thread counts 0..4, in {:.1} s",
        (total_calls / 2 * macs_per_round) as f64 / 1e9,
        elapsed.as_secs_f64()
    );
    assert!(total_calls >= THREADS * 2 * 4, "only {total_calls} calls before the deadline");
}
