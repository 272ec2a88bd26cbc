//! The GEMM driver: argument checks, activation quantization, tiling, threading, and the one
//! f32 epilogue shared by every kernel.
//!
//! For output row `i` and column `j`:
//!
//! ```text
//! x[i][k] ~= sa[i] * (qa[i][k] - za[i])        (activations, quantized in this call)
//! w[j][k] ~= sw[j] * qw[j][k]                  (weights, symmetric, quantized at pack time)
//!
//! y[i][j] = sum_k x[i][k] * w[j][k] + bias[j]
//!         ~= sa[i] * sw[j] * sum_k (qa[i][k] - za[i]) * qw[j][k] + bias[j]
//!          = sa[i] * sw[j] * (sum_k qa[i][k] * qw[j][k]  -  za[i] * colsum[j]) + bias[j]
//! ```
//!
//! The micro-kernels compute only `acc = sum_k qa * qw` (exact, see [`crate::quant::MAX_K`]);
//! `colsum[j] = sum_k qw[j][k]` was computed at pack time, so the zero point costs one multiply
//! per output instead of one per product.
//!
//! ## Bit-identical results
//! The f32 part is evaluated in one fixed order, with no fused multiply-add and no reduction
//! across K in floating point:
//!
//! ```text
//! c = acc - za * colsum          (i32, exact)
//! t = f32(c) * (sa * sw)         (two f32 roundings: the product sa * sw, then the multiply)
//! t = t + bias                   (if a bias is given)
//! t = max(t, 0), gelu(t), gelu_tanh(t), silu(t) or quick_gelu(t)   (the epilogue, if one is selected)
//! ```
//!
//! Every kernel produces the same `acc`, and every element is computed by these same
//! operations whatever the tiling, so the output is bit-identical across ISAs and thread
//! counts. Tests enforce it.

use crate::dtype::Element;
use crate::error::{checked_add, checked_mul, try_zeroed_vec, Error, Result};
use crate::kernels::{DequantRow, F32Tile, ThreadStateGuard, TileOut, MAX_BLOCKS16};
use crate::pack::PackedWeights;
use crate::quant::activations::{quantize_activations_rows, ActGranularity, ActType, Rows};
use once_cell::sync::Lazy;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

mod norm;
pub(crate) use norm::layer_norm_rows;
pub use norm::{layer_norm_reference, LayerNorm};

/// Largest thread count accepted by a GEMM call.
pub const MAX_THREADS: usize = 1024;

/// The operation applied after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `y = acc * scales + bias`.
    None,
    /// `y = max(acc * scales + bias, 0)`, see [`relu`].
    Relu,
    /// `y = gelu(acc * scales + bias)`, the erf form, see [`gelu`].
    Gelu,
    /// `y = gelu_tanh(acc * scales + bias)`, the tanh approximation of GELU (GPT-2's `gelu_new`,
    /// ONNX `Gelu` with `approximate="tanh"`, ONNX Runtime's `FastGelu`), see [`gelu_tanh`].
    GeluTanh,
    /// `y = silu(acc * scales + bias)`, `x * sigmoid(x)` (SiLU or Swish: the gate of LLaMA's
    /// and its kin's MLP), see [`silu`].
    Silu,
    /// `y = quick_gelu(acc * scales + bias)`, `x * sigmoid(1.702 * x)` (CLIP's QuickGELU,
    /// ONNX Runtime's `QuickGelu` with its default alpha), see [`quick_gelu`].
    QuickGelu,
}

impl Epilogue {
    /// Every epilogue, in the order of their C ABI values.
    pub const ALL: [Epilogue; 6] =
        [Epilogue::None, Epilogue::Relu, Epilogue::Gelu, Epilogue::GeluTanh, Epilogue::Silu, Epilogue::QuickGelu];

    /// The C ABI value (`dynq_epilogue`).
    pub fn to_raw(self) -> u32 {
        match self {
            Epilogue::None => 0,
            Epilogue::Relu => 1,
            Epilogue::Gelu => 2,
            Epilogue::GeluTanh => 3,
            Epilogue::Silu => 4,
            Epilogue::QuickGelu => 5,
        }
    }
    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Epilogue::None),
            1 => Some(Epilogue::Relu),
            2 => Some(Epilogue::Gelu),
            3 => Some(Epilogue::GeluTanh),
            4 => Some(Epilogue::Silu),
            5 => Some(Epilogue::QuickGelu),
            _ => None,
        }
    }
}

/// Quantized-activation buffers kept by each thread between calls (up to this size), so that a
/// layer's call does not allocate and zero its buffer again: a thread that runs GEMMs holds at
/// most this much between calls.
const SCRATCH_KEEP_MAX: usize = 8 << 20;

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// This thread's kept buffer (empty if none, or if the thread is being torn down).
fn take_scratch() -> Vec<u8> {
    SCRATCH.try_with(|c| c.take()).unwrap_or_default()
}

/// Keeps `v` for this thread's next call if it is not too large.
fn give_scratch(v: Vec<u8>) {
    if v.capacity() <= SCRATCH_KEEP_MAX {
        let _ = SCRATCH.try_with(|c| c.set(v));
    }
}

/// Options of one GEMM call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmOptions {
    pub act_granularity: ActGranularity,
    pub act_type: ActType,
    pub epilogue: Epilogue,
    /// 0: the default (`DYNQ_NUM_THREADS`, else every available core); 1: the calling thread
    /// only; n: up to n workers of dynq's pool (whose size is the larger of the default and the
    /// number of cores).
    pub num_threads: usize,
}

impl Default for GemmOptions {
    fn default() -> Self {
        GemmOptions {
            act_granularity: ActGranularity::PerRow,
            act_type: ActType::AsymmetricU8,
            epilogue: Epilogue::None,
            num_threads: 0,
        }
    }
}

/// The f32 epilogue for one element, in the fixed order documented at the top of the module
/// (bias and ReLU are applied by [`dequantize_row`]).
#[inline(always)]
pub fn dequantize(acc: i32, za: i32, colsum: i32, sa: f32, sw: f32) -> f32 {
    let c = acc.wrapping_sub(za.wrapping_mul(colsum));
    (c as f32) * (sa * sw)
}

/// ReLU as dynq defines it: `t` if `t > 0`, else `+0.0` (so `-0.0` and NaN give `+0.0`; this
/// is also what `maxps(t, 0)` computes, which the SIMD epilogues use).
#[inline(always)]
pub fn relu(t: f32) -> f32 {
    if t > 0.0 {
        t
    } else {
        0.0
    }
}

/// Coefficients of `erf(z) ~= z * P(z^2) / Q(z^2)` on `[-4, 4]` (a rational least-squares
/// fit made for dynq; maximum error 3.3e-7 when evaluated in f32 as [`erf`] does).
pub(crate) const ERF_P: [f32; 6] =
    [1.128_378_7, 0.209_969_8, 0.055_328_526, 0.004_603_963, 0.000_303_493, 1.895_347e-6];
pub(crate) const ERF_Q: [f32; 6] = [1.0, 0.519_408_46, 0.122_190_71, 0.016_645_646, 0.001_365_527_4, 3.746_484e-5];

/// erf as dynq defines it, with only fused multiply-adds, `* / min max`, in a fixed order, so
/// that every SIMD implementation reproduces it bit for bit:
///
/// ```text
/// z = min(max(z, -4), 4);  s = z * z
/// P = fma(fma(fma(fma(fma(P5, s, P4), s, P3), s, P2), s, P1), s, P0)   (fma(a, b, c) = a*b + c,
/// Q = the same with Q5..Q0                                              rounded once)
/// erf = min(max((z * P) / Q, -1), 1)
/// ```
///
/// Every kernel's CPU has a fused multiply-add (AVX2 and AVX-VNNI kernels require FMA3, AArch64
/// has it in its base instruction set); `f32::mul_add` computes the same correctly rounded
/// value in software where the scalar path runs on a CPU without one.
#[inline(always)]
pub fn erf(z: f32) -> f32 {
    let z = z.clamp(-4.0, 4.0);
    let s = z * z;
    let mut p = ERF_P[5];
    let mut q = ERF_Q[5];
    for i in (0..5).rev() {
        p = p.mul_add(s, ERF_P[i]);
        q = q.mul_add(s, ERF_Q[i]);
    }
    ((z * p) / q).clamp(-1.0, 1.0)
}

/// GELU as dynq defines it: `h = x * 0.5`, then `fma(h, erf(x * FRAC_1_SQRT_2), h)` (that is
/// `h + h * erf`, rounded once), with [`erf`]. Within 2e-7 * |x| of the exact erf GELU.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let h = x * 0.5;
    h.mul_add(erf(x * std::f32::consts::FRAC_1_SQRT_2), h)
}

/// Coefficients of `tanh(u) ~= u * P(u^2) / Q(u^2)` on `[-10, 10]` (a rational least-squares
/// fit made for dynq; maximum error 3.4e-7 when evaluated in f32 as [`tanh`] does).
pub(crate) const TANH_P: [f32; 5] = [0.999_999_76, 0.133_046_06, 0.003_406_12, 1.919_181_7e-5, 1.150_348_3e-8];
pub(crate) const TANH_Q: [f32; 5] = [1.0, 0.466_378_5, 0.025_533_244, 0.000_314_164_1, 6.994_529e-7];

/// Where [`tanh`] clamps its argument: `tanh(10)` is `1 - 4e-9`, so the result is exactly 1
/// from there on and `gelu_tanh` of a large negative value is exactly zero.
pub(crate) const TANH_CLAMP: f32 = 10.0;

/// `sqrt(2 / pi)` and `0.044715 * sqrt(2 / pi)`, the constants of the tanh GELU.
pub(crate) const GELU_TANH_A: f32 = 0.797_884_6;
pub(crate) const GELU_TANH_B: f32 = 0.035_677_407;

/// tanh as dynq defines it, in the same way as [`erf`] (fused multiply-adds, `* / min max`, in
/// a fixed order):
///
/// ```text
/// u = min(max(u, -10), 10);  s = u * u
/// P = fma(fma(fma(fma(P4, s, P3), s, P2), s, P1), s, P0);  Q the same with Q4..Q0
/// tanh = min(max((u * P) / Q, -1), 1)
/// ```
#[inline(always)]
pub fn tanh(u: f32) -> f32 {
    let u = u.clamp(-TANH_CLAMP, TANH_CLAMP);
    let s = u * u;
    let mut p = TANH_P[4];
    let mut q = TANH_Q[4];
    for i in (0..4).rev() {
        p = p.mul_add(s, TANH_P[i]);
        q = q.mul_add(s, TANH_Q[i]);
    }
    ((u * p) / q).clamp(-1.0, 1.0)
}

/// The tanh approximation of GELU, `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`,
/// as dynq defines it:
///
/// ```text
/// s = x * x;  u = x * fma(B, s, A)          (A = sqrt(2 / pi), B = 0.044715 * A)
/// h = x * 0.5;  y = fma(h, tanh(u), h)
/// ```
///
/// with [`tanh`]. Within 2e-7 * |x| of the exact formula; exactly 0 for x below -5.9.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = x * GELU_TANH_B.mul_add(x * x, GELU_TANH_A);
    let h = x * 0.5;
    h.mul_add(tanh(u), h)
}

/// SiLU (Swish) as dynq defines it, `x * sigmoid(x)` written with `sigmoid(x) = (1 + tanh(x /
/// 2)) / 2`: `h = x * 0.5`, then `fma(h, tanh(h), h)`, with [`tanh`]. Within 2e-7 * |x| of the
/// exact function; exactly 0 below -20.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let h = x * 0.5;
    h.mul_add(tanh(h), h)
}

/// `1.702 / 2`, the tanh argument of [`quick_gelu`].
pub(crate) const QUICK_GELU_HALF_ALPHA: f32 = 0.851;

/// QuickGELU as dynq defines it, `x * sigmoid(1.702 * x)` written like [`silu`]: `h = x * 0.5`,
/// then `fma(h, tanh(x * 0.851), h)`. Within 2e-7 * |x| of the exact function; exactly 0
/// below -11.8.
#[inline(always)]
pub fn quick_gelu(x: f32) -> f32 {
    let h = x * 0.5;
    h.mul_add(tanh(x * QUICK_GELU_HALF_ALPHA), h)
}

/// Definition of `RowOps::dequantize_row`: the epilogue of one output row segment.
pub fn dequantize_row(row: &DequantRow<'_>, acc: &[i32], out: &mut [f32]) {
    for (j, (o, &c)) in out.iter_mut().zip(acc).enumerate() {
        let mut t = dequantize(c, row.za, row.col_sums[j], row.sa, row.scales[j]);
        if let Some(b) = row.bias {
            t += b[j];
        }
        *o = match row.act {
            Epilogue::None => t,
            Epilogue::Relu => relu(t),
            Epilogue::Gelu => gelu(t),
            Epilogue::GeluTanh => gelu_tanh(t),
            Epilogue::Silu => silu(t),
            Epilogue::QuickGelu => quick_gelu(t),
        };
    }
}

/// Required length of a matrix buffer of `rows` rows of `cols` values at stride `ld`.
fn required_len(rows: usize, cols: usize, ld: usize, what: &str) -> Result<usize> {
    if rows == 0 {
        return Ok(0);
    }
    checked_add(checked_mul(rows - 1, ld, what)?, cols, what)
}

fn check_matrix(len: usize, rows: usize, cols: usize, ld: usize, name: &str) -> Result<()> {
    if ld < cols {
        return Err(Error::InvalidArgument(format!("{name}: row stride {ld} is smaller than the row length {cols}")));
    }
    let need = required_len(rows, cols, ld, name)?;
    checked_mul(need, 4, name)?;
    if len < need {
        return Err(Error::InvalidArgument(format!(
            "{name} has {len} values; {rows} rows of {cols} at stride {ld} need {need}"
        )));
    }
    Ok(())
}

/// The default thread count: `DYNQ_NUM_THREADS` if set, else the available parallelism.
pub fn default_threads() -> Result<usize> {
    static DEFAULT: Lazy<Result<usize>> = Lazy::new(|| match std::env::var("DYNQ_NUM_THREADS") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
            _ => Err(Error::InvalidArgument(format!(
                "DYNQ_NUM_THREADS={v:?} is not a thread count between 1 and {MAX_THREADS}"
            ))),
        },
        _ => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
    });
    DEFAULT.clone()
}

/// Multiply-adds below which one more worker costs more (handing it work, splitting the tiles)
/// than it saves: about 4 us of work on one core. Measured with the caller working from the
/// start (see [`run_tasks`]): at 2M multiply-adds two threads already gave 1.5x (8x512x512),
/// at 1M they gave nothing (1x1024x1024).
const MIN_MACS_PER_WORKER: usize = 1 << 20;

/// Multiply-adds below which a call does not wake sleeping pool threads, only uses helpers
/// already spinning (see [`run_tasks_as`]): about 50 us of work on one core.
const MIN_MACS_TO_WAKE: usize = 1 << 24;

/// The number of workers worth using for an `m x n x k` product (never more than asked).
fn useful_threads(threads: usize, m: usize, n: usize, k: usize) -> usize {
    let macs = m.saturating_mul(n).saturating_mul(k);
    threads.min((macs / MIN_MACS_PER_WORKER).max(1))
}

fn resolve_threads(requested: usize) -> Result<usize> {
    match requested {
        0 => default_threads(),
        n if n <= MAX_THREADS => Ok(n),
        n => Err(Error::InvalidArgument(format!("num_threads={n} exceeds the maximum {MAX_THREADS}"))),
    }
}

/// The worker pool of the process and the fork generation it was made in.
struct PoolSlot {
    generation: usize,
    pool: rayon::ThreadPool,
    /// Seats of the helpers that wait, spinning, for the next parallel region (see
    /// [`Spinners`]).
    spinners: Spinners,
}

/// Helpers that finished their share of a parallel region and wait for the next one, spinning
/// for a while ([`spin_window`]) before giving their thread back to the pool.
///
/// Waking a sleeping pool thread takes 8-10 us in these virtual machines (measured: a region of
/// 8 tasks of 10 us in total took 11.4 us on 2 threads against 10.7 us on 1; of 80 us, 48.7 us
/// against 40 ideally), as much as a whole 32x256x256 product and a tenth of a BERT layer on
/// AMX; a spinning helper takes a region in well under a microsecond. Each seat is one
/// `AtomicUsize`: [`GONE`] (no helper), [`WAITING`] (a helper spins on it), [`BUSY`] (its helper
/// works on a region it was given), or the address of a boxed `Arc<TaskSet>` offered to it. A
/// caller offers only to a waiting seat (compare-exchange from `WAITING`) and a helper leaves
/// only from `WAITING` (compare-exchange to `GONE`), so an offer is never lost: either the
/// helper takes it or the caller sees the seat gone and wakes a pool thread instead. Either way
/// the caller also works on the region itself, so a helper that comes late only costs speed.
struct Spinners {
    seats: Box<[AtomicPtr<Offer>]>,
}

/// A region offered to a waiting helper (boxed: its address is the seat's value).
type Offer = std::sync::Arc<TaskSet>;

const GONE: *mut Offer = std::ptr::null_mut();
const WAITING: *mut Offer = std::ptr::without_provenance_mut(1);
const BUSY: *mut Offer = std::ptr::without_provenance_mut(2);

/// How long a helper spins for the next region: `DYNQ_SPIN_US` microseconds if set (0 turns
/// spinning off; at most 1 s), else 200 us, about what OpenMP runtimes and ONNX Runtime's pool
/// spin by default.
pub fn spin_window() -> Result<std::time::Duration> {
    static WINDOW: Lazy<Result<std::time::Duration>> = Lazy::new(|| match std::env::var("DYNQ_SPIN_US") {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<u64>() {
            Ok(us) if us <= 1_000_000 => Ok(std::time::Duration::from_micros(us)),
            _ => Err(Error::InvalidArgument(format!(
                "DYNQ_SPIN_US={v:?} is not a number of microseconds between 0 and 1000000"
            ))),
        },
        _ => Ok(std::time::Duration::from_micros(200)),
    });
    WINDOW.clone()
}

impl Spinners {
    /// Seats for helpers: one fewer than the cores, so spinning helpers never take the core of
    /// the thread that will offer them work.
    fn new(cores: usize) -> Self {
        Spinners { seats: (0..cores.saturating_sub(1)).map(|_| AtomicPtr::new(GONE)).collect() }
    }

    /// Whether a helper is spinning, waiting for a region (a hint: it may leave at once).
    fn any_waiting(&self) -> bool {
        self.seats.iter().any(|s| s.load(Ordering::Relaxed) == WAITING)
    }

    /// Offers `set` to a waiting helper; false if none is waiting.
    fn offer(&self, set: &std::sync::Arc<TaskSet>) -> bool {
        for seat in self.seats.iter() {
            if seat.load(Ordering::Relaxed) != WAITING {
                continue;
            }
            let offer = Box::into_raw(Box::new(set.clone()));
            match seat.compare_exchange(WAITING, offer, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                // SAFETY: `offer` was just leaked from a Box and was not published.
                Err(_) => drop(unsafe { Box::from_raw(offer) }),
            }
        }
        false
    }

    /// Run by a helper after its share of a region: takes a free seat (if any, and if spinning
    /// is on) and runs the regions offered to it until none comes for the spin window.
    fn wait_for_work(&self) {
        // (A bad DYNQ_SPIN_US is reported by `run_tasks`, before any helper starts.)
        if let Ok(window) = spin_window() {
            // Miri's clock advances with the steps it interprets: a helper spinning there for
            // the real window would cost millions of them. A short one keeps the path checked.
            self.serve(if cfg!(miri) { window.min(std::time::Duration::from_micros(2)) } else { window });
        }
    }

    /// Takes a free seat and runs the regions offered on it until none comes for `window`
    /// (returns at once for a zero window or when every seat is taken).
    fn serve(&self, window: std::time::Duration) {
        if window.is_zero() {
            return;
        }
        let Some(seat) =
            self.seats.iter().find(|s| s.compare_exchange(GONE, WAITING, Ordering::AcqRel, Ordering::Relaxed).is_ok())
        else {
            return;
        };
        let mut since = std::time::Instant::now();
        let mut polls = 0u32;
        loop {
            let v = seat.load(Ordering::Acquire);
            if v.addr() > BUSY.addr() {
                seat.store(BUSY, Ordering::Relaxed);
                // SAFETY: an address above BUSY's is a boxed Offer leaked by `offer` for this
                // seat only; it is taken back once (the seat is BUSY until it waits again).
                let set = unsafe { Box::from_raw(v) };
                set.join();
                drop(set);
                seat.store(WAITING, Ordering::Release);
                since = std::time::Instant::now();
                continue;
            }
            std::hint::spin_loop();
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(64)
                && since.elapsed() >= window
                && seat.compare_exchange(WAITING, GONE, Ordering::AcqRel, Ordering::Relaxed).is_ok()
            {
                return;
            }
        }
    }
}

/// The current pool (null before first use). A pool is never freed: it lives as long as the
/// process, and one inherited from a parent process must not be dropped (see [`pool`]).
static POOL: AtomicPtr<PoolSlot> = AtomicPtr::new(std::ptr::null_mut());

/// Incremented in the child process of every `fork()` (a `pthread_atfork` handler).
static FORK_GENERATION: AtomicUsize = AtomicUsize::new(0);

#[cfg(all(unix, not(miri)))]
extern "C" fn after_fork_in_child() {
    // Async-signal-safe: one atomic add.
    FORK_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers [`after_fork_in_child`] once per process (registrations are inherited by children).
fn watch_forks() {
    // (Miri cannot call foreign functions; it never forks either.)
    #[cfg(all(unix, not(miri)))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: registers a handler that only touches an atomic; no other precondition.
            // If registration fails, forked children keep the parent's pool (whose threads do
            // not exist there): their calls then run on the calling thread, still correct.
            let _ = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        });
    }
}

/// The one worker pool of the process, created on first use with as many threads as the
/// larger of the default thread count and the available cores. A call asking for `t` threads
/// runs `min(t, pool size)` workers from it: whatever thread counts callers ask for, dynq
/// starts a bounded number of threads once, never one pool per count.
///
/// A child process made by `fork()` (Python's multiprocessing, pre-forking servers) inherits
/// the pool but none of its threads: its first multi-threaded call makes a pool of its own. The
/// inherited one is left alone (its bookkeeping refers to threads of the parent).
fn pool() -> Result<&'static PoolSlot> {
    loop {
        let generation = FORK_GENERATION.load(Ordering::Acquire);
        let current = POOL.load(Ordering::Acquire);
        // SAFETY: a non-null POOL points to a leaked, never freed PoolSlot.
        if let Some(slot) = unsafe { current.as_ref() } {
            if slot.generation == generation {
                return Ok(slot);
            }
        }
        watch_forks();
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let size = cores.max(default_threads().unwrap_or(1)).min(MAX_THREADS);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(size)
            .thread_name(|i| format!("dynq-{i}"))
            .build()
            .map_err(|e| Error::OutOfMemory(format!("could not start {size} worker threads: {e}")))?;
        let fresh = Box::into_raw(Box::new(PoolSlot { generation, pool, spinners: Spinners::new(cores) }));
        match POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: `fresh` was just leaked from a Box and is never freed.
            Ok(_) => return Ok(unsafe { &*fresh }),
            Err(_) => {
                // Another thread installed a pool first: use that one.
                // SAFETY: `fresh` was never shared; this takes the Box back to drop it.
                drop(unsafe { Box::from_raw(fresh) });
            }
        }
    }
}

/// Runs `task(t)` for every `t < tasks` on the calling thread and up to `threads - 1` helpers
/// from the pool.
///
/// The tasks are cut into one contiguous home range per worker (the caller's is the first;
/// helpers take the others in the order they arrive); each worker runs its own range front to
/// back, then takes what is left of the others'. So consecutive parallel regions of one call
/// give a worker the same part of the work (the activation rows it quantized are the rows whose
/// tiles it computes, in its own cache), while a worker that is late or never comes only
/// loses its range to the others.
///
/// The caller works instead of waiting: it posts the helpers' jobs and starts on the tasks at
/// once, and afterwards waits only for tasks a helper has actually taken. A helper that wakes
/// late (waking a sleeping thread can take tens of microseconds, more in a virtual machine) finds
/// nothing left and costs nothing; with a busy pool the caller simply does all the work. A panic
/// in any task is caught, every started task is waited for, and the panic is then resumed on the
/// calling thread.
pub(crate) fn run_tasks<F: Fn(usize) + Sync>(threads: usize, tasks: usize, task: F) -> Result<()> {
    run_tasks_as(threads, tasks, true, task)
}

/// [`run_tasks`]; `wake`: false for a region too small to wait for a sleeping pool thread
/// (waking one costs the caller a system call, and the thread arrives tens to hundreds of
/// microseconds later in a virtual machine, where a late helper that claims a task makes the
/// caller wait for it): the region then goes only to helpers already spinning (after a larger
/// call) and the caller runs the rest. Measured, 2 vCPUs, the helpers asleep after a 2 ms
/// pause: 32x256x256 on 2 threads took 0.064-0.229 ms against 0.029 on 1 when its regions
/// woke a helper; 0.037-0.043 when a helper was only asked to come and spin for the next one.
pub(crate) fn run_tasks_as<F: Fn(usize) + Sync>(threads: usize, tasks: usize, wake: bool, task: F) -> Result<()> {
    if threads <= 1 || tasks <= 1 {
        (0..tasks).for_each(task);
        return Ok(());
    }
    // A bad DYNQ_SPIN_US is the caller's to hear about (as a bad DYNQ_NUM_THREADS is).
    spin_window()?;
    let pool = match pool() {
        Ok(p) => p,
        // No worker threads could be started (a process at its thread limit): the calling
        // thread does all the work, with the same result.
        Err(_) => {
            (0..tasks).for_each(task);
            return Ok(());
        }
    };
    if !wake && !pool.spinners.any_waiting() {
        (0..tasks).for_each(task);
        return Ok(());
    }
    let helpers = (threads.min(tasks) - 1).min(pool.pool.current_num_threads());
    let task: &(dyn Fn(usize) + Sync) = &task;
    // SAFETY: the lifetime is erased so that helper jobs (which must be 'static) can hold the
    // pointer. `TaskSet::work` calls the task only for an index it claimed below `tasks`, and
    // this function returns only once `done == tasks`, i.e. after every claimed task has
    // returned; a helper that starts later claims nothing and never touches the closure.
    let task: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
    let set = std::sync::Arc::new(TaskSet::new(helpers + 1, tasks, task));
    for _ in 0..helpers {
        if pool.spinners.offer(&set) {
            continue;
        }
        if !wake {
            // No helper spinning: the caller does the rest (its range and theirs).
            break;
        }
        let set = set.clone();
        pool.pool.spawn(move || {
            set.join();
            drop(set);
            pool.spinners.wait_for_work();
        });
    }
    set.work(0);
    let mut spins = 0u32;
    while set.done.load(Ordering::Acquire) < tasks {
        if spins < 1 << 12 {
            std::hint::spin_loop();
            spins += 1;
        } else {
            std::thread::yield_now();
        }
    }
    let panic = set.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = panic {
        std::panic::resume_unwind(p);
    }
    Ok(())
}

/// The shared state of one [`run_tasks`] call.
struct TaskSet {
    /// Per worker, the next task index to claim in its home range: range `w` is
    /// `w * tasks / workers .. (w + 1) * tasks / workers` (`workers = next.len()`).
    next: Box<[AtomicUsize]>,
    /// Workers that have started (the caller counts as the first): a helper's home range.
    joined: AtomicUsize,
    /// Tasks finished (returned or panicked).
    done: AtomicUsize,
    tasks: usize,
    /// The first panic of a task, resumed by the caller.
    panic: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
    task: &'static (dyn Fn(usize) + Sync),
}

impl TaskSet {
    /// `tasks` tasks in one home range per worker; the caller is the first worker.
    fn new(workers: usize, tasks: usize, task: &'static (dyn Fn(usize) + Sync)) -> Self {
        TaskSet {
            next: (0..workers).map(|w| AtomicUsize::new(w * tasks / workers)).collect(),
            joined: AtomicUsize::new(1),
            done: AtomicUsize::new(0),
            tasks,
            panic: std::sync::Mutex::new(None),
            task,
        }
    }

    /// Runs a helper's share: the next home range, then whatever is left of the others.
    fn join(&self) {
        let home = self.joined.fetch_add(1, Ordering::Relaxed);
        self.work(home % self.next.len());
    }

    /// Runs the unclaimed tasks of home range `home`, then those of the following ranges.
    /// Every index is handed out once by its range's counter, so each task runs exactly once.
    fn work(&self, home: usize) {
        let workers = self.next.len();
        for w in (0..workers).map(|i| (home + i) % workers) {
            let end = (w + 1) * self.tasks / workers;
            loop {
                // Each worker moves a counter past its end at most once: no overflow.
                let t = self.next[w].fetch_add(1, Ordering::Relaxed);
                if t >= end {
                    break;
                }
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.task)(t)));
                if let Err(p) = r {
                    self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(p);
                }
                self.done.fetch_add(1, Ordering::Release);
            }
        }
    }
}

/// Where the parallel parts of a GEMM call run: dynq's own pool ([`gemm_typed`]), or a pool the
/// caller owns ([`gemm_typed_on`]; the ONNX Runtime op runs on ONNX Runtime's intra-op pool, so a
/// session never has two pools competing for the cores).
pub trait Parallel: Sync {
    /// How many workers may run tasks at once: the work of a call is split for this many.
    fn workers(&self) -> usize;
    /// Runs `task(t)` for every `t < tasks` (in any order, on any threads, using at most about
    /// `max_workers` of them) and returns once all have finished. Results never depend on how
    /// the tasks were scheduled.
    fn run(&self, max_workers: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<()>;
    /// [`Parallel::run`] for a region of a call too small to be worth waking sleeping threads
    /// for (`wake == false`): dynq's pool then uses only helpers already spinning. Other
    /// pools run it as any region.
    #[doc(hidden)]
    fn run_as(&self, max_workers: usize, tasks: usize, wake: bool, task: &(dyn Fn(usize) + Sync)) -> Result<()> {
        let _ = wake;
        self.run(max_workers, tasks, task)
    }
}

/// dynq's own pool, with up to this many workers per call.
struct Pool(usize);

impl Parallel for Pool {
    fn workers(&self) -> usize {
        self.0
    }
    fn run(&self, max_workers: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<()> {
        run_tasks(max_workers.min(self.0), tasks, task)
    }
    fn run_as(&self, max_workers: usize, tasks: usize, wake: bool, task: &(dyn Fn(usize) + Sync)) -> Result<()> {
        run_tasks_as(max_workers.min(self.0), tasks, wake, task)
    }
}

/// The executor of one call: a [`Parallel`] and the number of workers worth using for this
/// product (fewer than offered for small products, see [`useful_threads`]).
pub(crate) struct Exec<'a> {
    par: &'a dyn Parallel,
    threads: usize,
    /// Whether the call is large enough to wake sleeping threads for (see [`run_tasks_as`]).
    wake: bool,
}

impl Exec<'_> {
    /// Sequential, on the calling thread.
    pub(crate) const SERIAL: Exec<'static> = Exec { par: &Pool(1), threads: 1, wake: true };

    /// dynq's pool with up to `threads` workers (tests of the parallel parts).
    #[cfg(test)]
    pub(crate) fn on_pool(threads: usize) -> Exec<'static> {
        Exec { par: Box::leak(Box::new(Pool(threads))), threads, wake: true }
    }

    /// Workers this call is split for.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(t)` for every `t < tasks`: inline when one worker or one task suffices.
    pub(crate) fn run<F: Fn(usize) + Sync>(&self, tasks: usize, task: F) -> Result<()> {
        if self.threads <= 1 || tasks <= 1 {
            (0..tasks).for_each(task);
            return Ok(());
        }
        self.par.run_as(self.threads, tasks, self.wake, &task)
    }
}

/// A raw output pointer shared by the tasks of one call, each writing a disjoint set of
/// elements.
struct SharedOut<T> {
    ptr: *mut T,
    len: usize,
}
// SAFETY: tasks write disjoint elements (distinct (row, column) tiles) and the owner of the
// buffer waits for all of them before the borrow ends.
unsafe impl<T: Send> Sync for SharedOut<T> {}
unsafe impl<T: Send> Send for SharedOut<T> {}

impl<T> SharedOut<T> {
    fn new(s: &mut [T]) -> Self {
        SharedOut { ptr: s.as_mut_ptr(), len: s.len() }
    }
    /// # Safety
    /// No other task writes or reads index `i` concurrently.
    #[inline(always)]
    unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len);
        // SAFETY: in bounds (checked above); exclusivity promised by the caller.
        unsafe { self.ptr.add(i).write(v) }
    }

    /// A raw pointer to element `start` after checking that `start..start + len` is in
    /// bounds. It is a pointer, not a slice: a tile's span (rows at stride ldy) covers
    /// elements of neighbouring tiles between its rows, which other tasks write meanwhile, so
    /// no `&mut` may be formed over it; only the tile's own elements are written through it.
    #[inline(always)]
    fn ptr_at(&self, start: usize, len: usize) -> *mut T {
        assert!(start <= self.len && len <= self.len - start);
        // SAFETY: in bounds (checked above); pointer arithmetic only.
        unsafe { self.ptr.add(start) }
    }
}

/// One (row tile, column panel) of the output, handed to the callback of [`for_each_tile`].
struct Tile<'a> {
    /// First row and number of rows (`<= MR`).
    i0: usize,
    rows: usize,
    /// First column and number of valid columns (`<= NR`).
    j0: usize,
    cols: usize,
    /// The `rows` rows of quantized activations (stride `row_bytes`).
    a: &'a [u8],
    /// The packed panel.
    panel: &'a [i8],
    /// Weights to bring into L2 while this tile computes (see `F32Tile::prefetch_l2`).
    prefetch_l2: &'a [i8],
    /// The only row tile of its block: the weights stream through it (`F32Tile::stream_l2`).
    stream_l2: bool,
}

/// Share `i` of `parts` of `bytes`, in whole cache lines.
fn line_share(bytes: &[i8], i: usize, parts: usize) -> &[i8] {
    let chunk = bytes.len().div_ceil(parts.max(1)).next_multiple_of(64);
    &bytes[(i * chunk).min(bytes.len())..((i + 1) * chunk).min(bytes.len())]
}

/// The length (in values) of a row of the quantized activation buffer for a padded depth `kp`:
/// `kp`, plus one cache line when the rows would start an even number of lines apart. A
/// kernel reads the same K group of many rows at once (AMX: 32 rows per tile step); rows a
/// power-of-two multiple of lines apart (K = 1024, 2048, 4096: every row at the same offset in
/// its page) fall into the same few L1 sets, 32 lines into a 12-way set, and come from L2 on
/// every step. An odd number of lines apart, 64 consecutive rows use 64 different sets. (AMX,
/// 1 thread, medians of alternating calls: K = 4096 and 3072 0.93-0.96x the time.)
fn a_row_len(kp: usize, a_bytes: usize) -> usize {
    let bytes = kp * a_bytes;
    if bytes.is_multiple_of(128) {
        kp + 64 / a_bytes
    } else {
        kp
    }
}

/// Packed weights up to this size are split between threads by rows (see `for_each_tile`):
/// half of this machine's 2 MiB L2, and the L2 of most server cores.
const ROW_BLOCKS_MAX_WEIGHTS: usize = 1 << 20;

/// Panels of a block met tile by tile (each A tile in L1 while they pass) up to this size.
const TILES_OUTER_MAX_PANELS: usize = 512 * 1024;
/// Quantized activation rows of a block up to this size stay in L2 while its panels pass.
const A_BLOCK_MAX: usize = 512 * 1024;

/// Rows whose tiles are all written: `(first row, end row)`.
type RowsDone<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Visits every (row tile, column panel) of the output exactly once, possibly from several
/// threads, with a scratch buffer of `MR * NR` `i32` per task. The callback runs the
/// micro-kernel.
///
/// `rows_done`, when given, is called once for every row, with runs of rows whose tiles have
/// all been visited: at the end of each block when blocks span every panel (the rows are then
/// still in cache), otherwise in a pass over the rows after all tiles.
fn for_each_tile<F>(
    w: &PackedWeights,
    qa: &[u8],
    row_bytes: usize,
    m: usize,
    exec: &Exec<'_>,
    rows_done: Option<RowsDone<'_>>,
    f: F,
) -> Result<()>
where
    F: Fn(&Tile<'_>, &mut [i32]) + Sync,
{
    let kern = w.kernel();
    let (nr, n) = (kern.nr, w.n());
    // Up to `stream_mr` rows (more than MR only for kernels that take them) run as one tile
    // that streams the weights once, instead of several tiles that each read every panel.
    let mr = if m > kern.mr && m <= kern.stream_mr { m } else { kern.mr };
    let m_tiles = m.div_ceil(mr);
    // The rows are spread evenly over the tiles (M = 20 with MR = 8: 7 + 7 + 6, not 8 + 8 + 4): a tile
    // with few rows has few independent accumulators and reads the whole panel for little work.
    // (Kernels that want full tiles get them: MR rows each, the rest in the last.)
    let tile_rows = |t: usize| {
        let (start, end) = match kern.full_tiles {
            true => (t * mr, ((t + 1) * mr).min(m)),
            false => (t * m / m_tiles, (t + 1) * m / m_tiles),
        };
        assert!(end > start && end - start <= mr); // the micro-kernel relies on it
        (start, end - start)
    };
    let n_panels = n.div_ceil(nr);
    let kp = kern.padded_k(w.k());
    debug_assert!(row_bytes >= kp * kern.a_bytes);
    debug_assert!(qa.len() >= m * row_bytes);
    debug_assert_eq!(w.packed_data().len(), n_panels * nr * kp);
    // Blocks: a block of panels stays in cache while all row tiles of a block stream by.
    // With several threads, blocks are made small enough that there are at least four per
    // thread (the workers pull them as they go); the split never changes a result.
    let threads = exec.threads();
    let (mc, nc) = if threads > 1 && n_panels * nr * kp <= ROW_BLOCKS_MAX_WEIGHTS && m_tiles >= 2 * threads {
        // Weights that fit in each core's L2 (beside the rest): every block spans all panels
        // and the workers split the rows. Each core then writes whole output rows and reads
        // mostly the activation rows it quantized itself (the caller and the first helper
        // take the first blocks of both phases), instead of pulling the other core's rows and
        // output lines across; each keeps its own copy of the weights. 128x768x768, 2 threads
        // against 1: 1.73x with column blocks, 1.97x with row blocks; 128x1024x1024 1.12x
        // faster, 128x768x3072 (2.4 MB of weights) 1.03x, 512x1024x4096 (4 MB) 0.96x.
        (m_tiles.div_ceil(4 * threads), n_panels)
    } else {
        let mc = 16.min(m_tiles).max(1);
        let m_blocks = m_tiles.div_ceil(mc);
        let mut nc = 8.min(n_panels).max(1);
        if mc * mr * kp * kern.a_bytes > A_BLOCK_MAX {
            // A block of rows too large to stay in L2 beside the panels (AMX's 32-row tiles at
            // K = 4096: 2 MB for 16 tiles) would be read from the last-level cache once per
            // panel: fewer panels per block instead, as many as stay in L2, met tile by tile
            // (each A tile then comes from the last-level cache once per block and stays in
            // L1/L2 while the block's panels pass). AMX, 1 thread, medians of alternating
            // calls: 512x1024x4096 0.86x the time, 1024x768x3072 0.89x, 128x4096x4096 0.90x.
            nc = nc.min((TILES_OUTER_MAX_PANELS / (nr * kp)).max(1));
        }
        if threads > 1 {
            let want_n_blocks = (4 * threads).div_ceil(m_blocks);
            nc = nc.min(n_panels.div_ceil(want_n_blocks)).max(1);
        }
        (mc, nc)
    };
    let m_blocks = m_tiles.div_ceil(mc);
    let n_blocks = n_panels.div_ceil(nc);
    // Order inside a block. Tiles outer (each A tile stays in L1 while the block's panels come
    // from L2, and each output row is written in one run of nc * NR columns) when the block's
    // panels fit in L2 beside the rest and several tiles reuse them; panels outer (each panel
    // read once, from memory for weights that do not fit in cache, and reused by every tile)
    // otherwise, e.g. for decoding shapes with one or two row tiles.
    let tiles_outer = mc >= 4 && nc * nr * kp <= TILES_OUTER_MAX_PANELS;
    let data = w.packed_data();
    let panel_bytes = nr * kp;
    // Weights that do not stay in L2 from one block to the next are read from the last-level
    // cache or memory by the first tile that needs them, faster than that tile computes (16
    // bytes per cycle at the AVX-512 kernel's rate): each tile asks for a share of the weights
    // that come after it, to be brought into L2 while it computes (`Tile::prefetch_l2`).
    let streamed = data.len() > ROW_BLOCKS_MAX_WEIGHTS;
    let run_block = |blk: usize| {
        // SAFETY: the CPU runs the kernel's ISA (checked when `w` was packed).
        let _state = unsafe { ThreadStateGuard::new(kern) };
        let (mb, nb) = (blk / n_blocks, blk % n_blocks);
        let mut scratch = vec![0i32; mr * nr];
        let visit = |p: usize, (i0, rows): (usize, usize), prefetch_l2: &[i8], stream_l2: bool, scratch: &mut [i32]| {
            let tile = Tile {
                i0,
                rows,
                j0: p * nr,
                cols: (n - p * nr).min(nr),
                a: &qa[i0 * row_bytes..(i0 + rows) * row_bytes],
                panel: &data[p * panel_bytes..(p + 1) * panel_bytes],
                prefetch_l2,
                stream_l2,
            };
            f(&tile, scratch);
        };
        let (panels, tiles) = (nb * nc..((nb + 1) * nc).min(n_panels), mb * mc..((mb + 1) * mc).min(m_tiles));
        // The panels of the block after this one, the next this worker most likely runs.
        let next_block = {
            let nb2 = (nb + 1) % n_blocks;
            &data[nb2 * nc * panel_bytes..((nb2 + 1) * nc).min(n_panels) * panel_bytes]
        };
        let share = |bytes, i, parts| if streamed { line_share(bytes, i, parts) } else { &[] };
        // With blocks spanning every panel, a row is complete when its tile has met them all.
        let done = rows_done.filter(|_| n_blocks == 1);
        if tiles_outer {
            let visits = tiles.len() * panels.len();
            for (ti, t) in tiles.enumerate() {
                let rows = tile_rows(t);
                for (pi, p) in panels.clone().enumerate() {
                    visit(p, rows, share(next_block, ti * panels.len() + pi, visits), false, &mut scratch);
                }
                if let Some(done) = done {
                    // The tile's rows are still in L1.
                    done(rows.0, rows.0 + rows.1);
                }
            }
        } else {
            let rows: Vec<(usize, usize)> = tiles.map(tile_rows).collect();
            for p in panels.clone() {
                // While the block's tiles meet panel p, panel p + 1 (or the next block's first).
                let upcoming = match p + 1 < panels.end {
                    true => &data[(p + 1) * panel_bytes..(p + 2) * panel_bytes],
                    false => &next_block[..panel_bytes.min(next_block.len())],
                };
                // A single tile (decoding) streams its panels anyway, prefetching them itself
                // (`F32Tile::stream_l2`): asking for the next one as well made 1x4096x4096 and
                // 4x4096x4096 2-4% slower.
                let upcoming = if rows.len() > 1 { upcoming } else { &[] };
                for (ri, &r) in rows.iter().enumerate() {
                    visit(p, r, share(upcoming, ri, rows.len()), rows.len() == 1, &mut scratch);
                }
            }
            if let (Some(done), Some(first), Some(last)) = (done, rows.first(), rows.last()) {
                done(first.0, last.0 + last.1);
            }
        }
    };
    // Dynamic balancing: the workers pull blocks as they finish others.
    exec.run(m_blocks * n_blocks, run_block)?;
    if let Some(done) = rows_done.filter(|_| n_blocks > 1) {
        let chunks = (4 * exec.threads()).min(m).max(1);
        exec.run(chunks, |c| done(c * m / chunks, (c + 1) * m / chunks))?;
    }
    Ok(())
}

/// `Y = dequant(quant(A) * W) + bias`, then the epilogue. `a` holds `m` rows of `w.k()` values
/// at stride `lda`; `y` receives `m` rows of `w.n()` values at stride `ldy` (other elements are
/// left untouched). `bias`, when given, has `w.n()` values.
///
/// On error nothing has been written to `y`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    w: &PackedWeights,
    a: &[f32],
    m: usize,
    lda: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    ldy: usize,
    opts: &GemmOptions,
) -> Result<()> {
    gemm_typed(w, a, m, lda, bias, y, ldy, opts)
}

/// [`gemm`] with activations and outputs of any [`Element`] type (f32, f16, bf16). Inputs are
/// widened exactly; outputs are computed in f32 by the same epilogue and rounded to nearest
/// (ties to even), so they too are identical on every ISA and thread count.
#[allow(clippy::too_many_arguments)]
pub fn gemm_typed<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    bias: Option<&[f32]>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
) -> Result<()> {
    gemm_smoothed(w, a, m, lda, None, bias, y, ldy, opts)
}

/// [`gemm_typed`] with per-input-channel smoothing factors (see [`gemm_smoothed_on`]), on
/// dynq's pool.
#[allow(clippy::too_many_arguments)]
pub fn gemm_smoothed<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    smooth: Option<&[f32]>,
    bias: Option<&[f32]>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
) -> Result<()> {
    let pool = Pool(resolve_threads(opts.num_threads)?);
    gemm_smoothed_on(w, a, m, lda, smooth, bias, y, ldy, opts, &pool)
}

/// [`gemm_typed`] with its parallel parts run by `par` instead of dynq's pool
/// (`opts.num_threads` is then not used). The result is the same bits whatever `par` does.
#[allow(clippy::too_many_arguments)]
pub fn gemm_typed_on<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    bias: Option<&[f32]>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
    par: &dyn Parallel,
) -> Result<()> {
    gemm_smoothed_on(w, a, m, lda, None, bias, y, ldy, opts, par)
}

/// [`gemm_typed_on`] with per-input-channel smoothing factors: when `smooth` is given (`w.k()`
/// positive finite values), row `i` of A is quantized as `a[i][k] * smooth[k]` (one f32
/// multiplication, so the result is exactly that of [`gemm_typed_on`] on the multiplied A).
///
/// This is how activation outliers move into the weights (SmoothQuant): a converter that
/// multiplies row `k` of the float weights by `s[k]` before quantizing them and passes
/// `smooth[k] = 1 / s[k]` computes the same product, with activation channels of very different
/// ranges brought closer together so that one per-row quantization range fits them all.
#[allow(clippy::too_many_arguments)]
pub fn gemm_smoothed_on<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    smooth: Option<&[f32]>,
    bias: Option<&[f32]>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
    par: &dyn Parallel,
) -> Result<()> {
    gemm_fused_on(w, a, m, lda, &Fused { smooth, bias, ..Fused::default() }, y, ldy, opts, par)
}

/// A matrix added to the output after the epilogue: `m` rows of `w.n()` values at stride `ld`.
#[derive(Clone, Copy, Debug)]
pub struct Residual<'a, Y> {
    pub data: &'a [Y],
    pub ld: usize,
}

/// The optional inputs fused into one GEMM call (see [`gemm_fused_on`]).
#[derive(Clone, Copy, Debug)]
pub struct Fused<'a, Y> {
    /// Per-input-channel smoothing factors (`w.k()` positive finite values).
    pub smooth: Option<&'a [f32]>,
    /// `w.n()` finite values added before the activation.
    pub bias: Option<&'a [f32]>,
    /// A matrix added after the activation: the residual (skip) connection of a transformer
    /// block, `y = act(A * W + bias) + residual`.
    pub residual: Option<Residual<'a, Y>>,
    /// Layer normalization of each output row, last: `y = LayerNorm(act(A * W + bias) +
    /// residual)` (single plain output only; see [`LayerNorm`]).
    pub layer_norm: Option<LayerNorm<'a>>,
    /// A in the attention-head layout `[batch, heads, seq, k / heads]` (`transposed` false)
    /// instead of rows at a stride (`lda` is then not used): row `i = b * seq + s` of the
    /// product's A is the `heads` runs `a[b][h][s][..]` side by side. This is the `Transpose(perm
    /// = [0, 2, 1, 3])` and reshape that attention applies to its context before the output
    /// projection, fused into the quantization's read; the result is the bits of the call on
    /// the transposed copy.
    pub a_heads: Option<Heads>,
}

impl<Y> Default for Fused<'_, Y> {
    fn default() -> Self {
        Fused { smooth: None, bias: None, residual: None, layer_norm: None, a_heads: None }
    }
}

/// [`gemm_fused_on`] on dynq's pool (`opts.num_threads` workers).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    fused: &Fused<'_, Y>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
) -> Result<()> {
    let pool = Pool(resolve_threads(opts.num_threads)?);
    gemm_fused_on(w, a, m, lda, fused, y, ldy, opts, &pool)
}

/// The general GEMM call: [`gemm_smoothed_on`] plus an optional residual. For each output
/// element, `y[i][j] = act(product + bias[j]) + residual[i][j]`: the residual (widened to f32
/// exactly) is added to the f32 result of the epilogue with one f32 addition, then the sum is
/// stored (rounded to nearest-even for f16/bf16 outputs). So the result is bit-identical to
/// the call without a residual followed by that addition done in f32, on every ISA and thread
/// count. The residual is data like A, not a weight: its values are added as they are (a NaN
/// or infinity gives NaN or infinity in that element only, as the float `Add` it replaces
/// would).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused_on<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    fused: &Fused<'_, Y>,
    y: &mut [Y],
    ldy: usize,
    opts: &GemmOptions,
    par: &dyn Parallel,
) -> Result<()> {
    let n = w.n();
    gemm_impl(w, a, m, lda, fused, &mut [SplitOut::rows(y, ldy, n)], opts, par)
}

/// One output of [`gemm_split_on`]: `cols` consecutive columns of the product, written as
/// `m` rows at stride `ldy` (elements) into `y`, or in the attention-head layout `heads` gives.
#[derive(Debug)]
pub struct SplitOut<'a, Y> {
    pub y: &'a mut [Y],
    pub ldy: usize,
    pub cols: usize,
    /// `Some`: the output is written split into attention heads (see [`Heads`]) and `ldy` is
    /// not used.
    pub heads: Option<Heads>,
}

impl<'a, Y> SplitOut<'a, Y> {
    /// `cols` columns as `m` rows at stride `ldy`.
    pub fn rows(y: &'a mut [Y], ldy: usize, cols: usize) -> Self {
        SplitOut { y, ldy, cols, heads: None }
    }
}

/// The layout of a transformer's query, key or value projection as its attention reads it,
/// written straight by the GEMM instead of by a `Reshape` and a `Transpose` after it. The `m`
/// rows are `m / seq` sequences (batch entries) of `seq` tokens; the `cols` columns are `heads`
/// heads of `d = cols / heads` values. Element (row `b * seq + s`, column `h * d + e`) goes to
///
/// - `y[((b * heads + h) * seq + s) * d + e]`: `[batch, heads, seq, d]` (`transposed == false`,
///   `Transpose(perm = [0, 2, 1, 3])` of the `[batch, seq, heads, d]` reshape), or
/// - `y[((b * heads + h) * d + e) * seq + s]`: `[batch, heads, d, seq]` (`transposed == true`,
///   `perm = [0, 2, 3, 1]`, the transposed keys of `Q K^T`).
///
/// The values are the bits of the plain layout; only their places differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub heads: usize,
    pub seq: usize,
    pub transposed: bool,
}

impl Heads {
    /// Checks the layout for `m` rows of `cols` columns written into `len` elements.
    fn check(&self, m: usize, cols: usize, len: usize, name: &str) -> Result<()> {
        let Heads { heads, seq, .. } = *self;
        if heads == 0 || seq == 0 {
            return Err(Error::InvalidArgument(format!("{name}: heads ({heads}) and seq ({seq}) must be positive")));
        }
        if !cols.is_multiple_of(heads) {
            return Err(Error::InvalidArgument(format!("{name}: {cols} columns do not split into {heads} heads")));
        }
        if !m.is_multiple_of(seq) {
            return Err(Error::InvalidArgument(format!("{name}: {m} rows are not whole sequences of {seq}")));
        }
        let need = checked_mul(m, cols, name)?;
        if len < need {
            return Err(Error::InvalidArgument(format!("{name}: buffer has {len} elements, needs {need}")));
        }
        Ok(())
    }
}

/// [`gemm_fused_on`] (without a residual) whose output columns go to several matrices: the
/// first `outs[0].cols` columns to `outs[0]`, the next `outs[1].cols` to `outs[1]`, and so on
/// (the widths add up to `w.n()`). This is how one call computes several layers that read the
/// same input, with their weights concatenated along N (a transformer's Q, K and V): A is
/// quantized once and read once, and each layer's output is a matrix of its own, with no copy.
/// Every element is the bits [`gemm_fused_on`] gives for that column.
#[allow(clippy::too_many_arguments)]
pub fn gemm_split_on<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    smooth: Option<&[f32]>,
    bias: Option<&[f32]>,
    outs: &mut [SplitOut<'_, Y>],
    opts: &GemmOptions,
    par: &dyn Parallel,
) -> Result<()> {
    gemm_impl(w, a, m, lda, &Fused { smooth, bias, ..Fused::default() }, outs, opts, par)
}

/// [`gemm_split_on`] on dynq's pool (`opts.num_threads` workers).
#[allow(clippy::too_many_arguments)]
pub fn gemm_split<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    smooth: Option<&[f32]>,
    bias: Option<&[f32]>,
    outs: &mut [SplitOut<'_, Y>],
    opts: &GemmOptions,
) -> Result<()> {
    let pool = Pool(resolve_threads(opts.num_threads)?);
    gemm_split_on(w, a, m, lda, smooth, bias, outs, opts, &pool)
}

/// Where one output segment's tiles go.
struct Segment<'o, Y> {
    /// First column of the product in this segment, and its width.
    start: usize,
    cols: usize,
    ldy: usize,
    heads: Option<Heads>,
    out: SharedOut<Y>,
    /// The same buffer as f32 when Y is f32 (the kernel then writes into it directly).
    direct: Option<SharedOut<f32>>,
    _life: std::marker::PhantomData<&'o mut [Y]>,
}

#[allow(clippy::too_many_arguments)]
fn gemm_impl<A: Element, Y: Element>(
    w: &PackedWeights,
    a: &[A],
    m: usize,
    lda: usize,
    fused: &Fused<'_, Y>,
    outs: &mut [SplitOut<'_, Y>],
    opts: &GemmOptions,
    par: &dyn Parallel,
) -> Result<()> {
    let Fused { smooth, bias, residual, layer_norm, a_heads } = *fused;
    let (n, k) = (w.n(), w.k());
    let rows = match a_heads {
        None => {
            check_matrix(a.len(), m, k, lda, "activations A")?;
            Rows::Strided(lda)
        }
        Some(h) => {
            if h.transposed {
                return Err(Error::InvalidArgument(
                    "activations A: the head layout of A must be [batch, heads, seq, d] (transposed = false)".into(),
                ));
            }
            h.check(m, k, a.len(), "activations A")?;
            Rows::Heads { heads: h.heads, seq: h.seq }
        }
    };
    if outs.is_empty() {
        return Err(Error::InvalidArgument("no output".into()));
    }
    let total = outs.iter().try_fold(0usize, |t, o| t.checked_add(o.cols));
    if outs.len() > 1 {
        if total != Some(n) || outs.iter().any(|o| o.cols == 0) {
            let widths: Vec<usize> = outs.iter().map(|o| o.cols).collect();
            return Err(Error::InvalidArgument(format!(
                "output widths {widths:?} must be positive and add up to n = {n}"
            )));
        }
        if residual.is_some() {
            return Err(Error::InvalidArgument("a residual needs a single output".into()));
        }
        if layer_norm.is_some() {
            return Err(Error::InvalidArgument("a layer norm needs a single output".into()));
        }
        for (g, o) in outs.iter().enumerate() {
            match &o.heads {
                Some(h) => h.check(m, o.cols, o.y.len(), &format!("output {g}"))?,
                None => check_matrix(o.y.len(), m, o.cols, o.ldy, &format!("output {g}"))?,
            }
        }
    } else {
        debug_assert_eq!(outs[0].cols, n);
        match &outs[0].heads {
            Some(_) if residual.is_some() => {
                return Err(Error::InvalidArgument("a residual needs the plain output layout (no heads)".into()));
            }
            Some(_) if layer_norm.is_some() => {
                return Err(Error::InvalidArgument("a layer norm needs the plain output layout (no heads)".into()));
            }
            Some(h) => h.check(m, n, outs[0].y.len(), "output Y")?,
            None => check_matrix(outs[0].y.len(), m, n, outs[0].ldy, "output Y")?,
        }
    }
    if let Some(r) = &residual {
        check_matrix(r.data.len(), m, n, r.ld, "residual")?;
    }
    if let Some(ln) = &layer_norm {
        ln.check(n)?;
    }
    if let Some(s) = smooth {
        if s.len() != k {
            return Err(Error::InvalidArgument(format!("smoothing factors: {} values, expected k = {k}", s.len())));
        }
        if let Some(j) = s.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(Error::InvalidArgument(format!(
                "smoothing factor [{j}] is {}; smoothing factors must be positive and finite",
                s[j]
            )));
        }
    }
    // Factors that are all 1 change nothing (x * 1 == x exactly): skip the multiplications.
    let smooth = smooth.filter(|s| s.iter().any(|&v| v != 1.0));
    if let Some(b) = bias {
        if b.len() != n {
            return Err(Error::InvalidArgument(format!("bias has {} values, expected n = {n}", b.len())));
        }
        if let Some(j) = b.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!("bias[{j}] is {}; bias must be finite", b[j])));
        }
    }
    let exec = Exec {
        par,
        threads: useful_threads(par.workers().clamp(1, MAX_THREADS), m, n, k),
        wake: m.saturating_mul(n).saturating_mul(k) >= MIN_MACS_TO_WAKE,
    };
    if m == 0 {
        return Ok(());
    }
    let kern = w.kernel();
    let kp = kern.padded_k(k);
    let qa = quantize_activations_rows(
        kern.ops,
        kern.a_bytes,
        a,
        m,
        k,
        rows,
        smooth,
        opts.act_granularity,
        opts.act_type,
        a_row_len(kp, kern.a_bytes),
        m,
        take_scratch(),
        &exec,
    )?;
    let (scales, col_sums) = (w.scales(), w.col_sums());
    let act = opts.epilogue;
    // The zero points as the kernel's raw accumulators need them (see `Kernel::a_shift`).
    let za: Vec<i32> = qa.zero_points.iter().map(|z| z - kern.a_shift).collect();
    // The output segments, in column order (one for a single output).
    let mut start = 0;
    let segs: Vec<Segment<'_, Y>> = outs
        .iter_mut()
        .map(|o| {
            // f32 outputs take the kernel's stores directly where a tile's place allows it (see
            // `straight` below).
            let direct = Y::as_f32_mut(o.y).map(SharedOut::new);
            let seg = Segment {
                start,
                cols: o.cols,
                ldy: o.ldy,
                heads: o.heads,
                out: SharedOut::new(o.y),
                direct,
                _life: std::marker::PhantomData,
            };
            start += o.cols;
            seg
        })
        .collect();
    let res_f32: Option<(&[f32], usize)> = residual.as_ref().and_then(|r| Y::as_f32(r.data).map(|d| (d, r.ld)));
    // A layer norm (single plain output) normalizes rows in place once all their tiles are
    // written, while they are in cache.
    let isa = kern.isa;
    let ln_rows = layer_norm.map(|ln| {
        let seg = &segs[0];
        move |r0: usize, r1: usize| {
            if r1 <= r0 {
                return;
            }
            let y = seg.out.ptr_at(r0 * seg.ldy, (r1 - r0 - 1) * seg.ldy + n);
            // SAFETY: rows r0..r1 (n values at stride ldy, in bounds: ptr_at) are complete and
            // no other task touches them any more (see `for_each_tile`).
            unsafe { norm::layer_norm_rows(isa, y, r1 - r0, n, seg.ldy, &ln) };
        }
    });
    let r = for_each_tile(
        w,
        &qa.data,
        qa.row_bytes,
        m,
        &exec,
        ln_rows.as_ref().map(|f| f as RowsDone<'_>),
        |t, scratch| {
            let (i0, j0, cols) = (t.i0, t.j0, t.cols);
            // The segment of the tile's first column. The kernel writes straight into it when the
            // segment holds all the tile's columns and is f32; otherwise into the f32 scratch
            // buffer (MR * NR words; f32 and i32 have the same size and alignment), whose columns
            // are then rounded to Y and sent to their segments below.
            let g = segs.partition_point(|sg| sg.start + sg.cols <= j0);
            let seg = &segs[g];
            let straight = match (&seg.direct, &seg.heads) {
                // The rows (i0..i0+rows) x columns of this tile belong to it only; in bounds
                // (checked by `ptr_at`); the kernel writes only the tile's elements.
                (Some(out), None) if j0 + cols <= seg.start + seg.cols => {
                    Some((out.ptr_at(i0 * seg.ldy + (j0 - seg.start), (t.rows - 1) * seg.ldy + cols), seg.ldy, None))
                }
                // In the [batch, heads, seq, d] layout, a tile inside one sequence is a block of
                // rows at stride d in each head it touches: written straight too when it lies inside
                // one head, or when d and the tile's first column are multiples of 16 (each run of
                // 16 columns then lies inside one head: `blocks16`); otherwise through the scratch
                // tile.
                (Some(out), Some(h)) if !h.transposed && j0 + cols <= seg.start + seg.cols => {
                    let dh = seg.cols / h.heads;
                    let (b, s0) = (i0 / h.seq, i0 % h.seq);
                    // Where column c of the segment goes in row i0, and how many follow it in its head.
                    let place = |c: usize| {
                        let at = ((b * h.heads + c / dh) * h.seq + s0) * dh + c % dh;
                        (at, dh - c % dh)
                    };
                    let c0 = j0 - seg.start;
                    let (at, room) = place(c0);
                    if s0 + t.rows > h.seq {
                        None
                    } else if cols <= room {
                        Some((out.ptr_at(at, (t.rows - 1) * dh + cols), dh, None))
                    } else if dh.is_multiple_of(16) && c0.is_multiple_of(16) && cols <= 16 * MAX_BLOCKS16 {
                        let mut blocks = [std::ptr::null_mut(); MAX_BLOCKS16];
                        for (bk, p) in blocks.iter_mut().enumerate().take(cols.div_ceil(16)) {
                            let (at, _) = place(c0 + 16 * bk);
                            *p = out.ptr_at(at, (t.rows - 1) * dh + (cols - 16 * bk).min(16));
                        }
                        Some((blocks[0], dh, Some(blocks)))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            let (y0, ld, blocks16) = straight.unwrap_or((scratch.as_mut_ptr() as *mut f32, cols, None));
            let ft = F32Tile {
                za: &za[i0..i0 + t.rows],
                sa: &qa.scales[i0..i0 + t.rows],
                col_sums: &col_sums[j0..j0 + cols],
                scales: &scales[j0..j0 + cols],
                bias: bias.map(|b| &b[j0..j0 + cols]),
                act,
                y: y0,
                ldy: ld,
                blocks16,
                // An f32 residual (single output only) is added by the kernel (rows i0.. from
                // column j0: in bounds, checked by check_matrix).
                residual: res_f32.map(|(r, ldr)| (r[i0 * ldr + j0..].as_ptr(), ldr)),
                prefetch_l2: t.prefetch_l2,
                stream_l2: t.stream_l2,
            };
            if let Some((r, ldr)) = ft.residual {
                // The tile's residual lines are requested now and arrive while the kernel computes
                // (its epilogue would otherwise wait for memory on each of them).
                for i in 0..t.rows {
                    let row = r.wrapping_add(i * ldr);
                    prefetch(row);
                    prefetch(row.wrapping_add(cols - 1));
                }
            }
            // SAFETY: `t.a` holds `rows <= MR` rows of kp values at stride row_bytes, the panel
            // holds kp * NR bytes, kp is a multiple of KR (padded_k), `ft` describes rows x cols
            // writable, unaliased f32 (in y or in the scratch buffer, rows * cols <= MR * NR) and
            // readable residual rows, and the CPU supports the kernel's ISA (checked when `w` was
            // packed).
            unsafe { (kern.ukernel)(t.rows, kp, t.a.as_ptr(), qa.row_bytes, t.panel.as_ptr(), &TileOut::F32(&ft)) };
            if let (Some(res), None) = (&residual, res_f32) {
                // f16/bf16 residual (and output): added to the f32 tile in the scratch buffer.
                for r in 0..t.rows {
                    let src = &res.data[(i0 + r) * res.ld + j0..][..cols];
                    // SAFETY: row r of the scratch tile: `cols` f32 the kernel just wrote, which
                    // only this task sees.
                    let row = unsafe { std::slice::from_raw_parts_mut(y0.add(r * ld), cols) };
                    row.iter_mut().zip(src).for_each(|(y, r)| *y += r.to_f32());
                }
            }
            if straight.is_none() {
                // SAFETY: the kernel wrote rows * cols f32 at the start of the scratch buffer.
                let tile = unsafe { std::slice::from_raw_parts(scratch.as_ptr() as *const f32, t.rows * cols) };
                let (mut c, mut g) = (0, g);
                while c < cols {
                    let sg = &segs[g];
                    let (jj, take) = (j0 + c - sg.start, (sg.start + sg.cols - (j0 + c)).min(cols - c));
                    if let Some(hd) = &sg.heads {
                        // SAFETY: columns jj..jj + take of rows i0.. of this segment belong to
                        // this tile only (each lands at its own place in the head layout).
                        unsafe { write_heads(sg, hd, i0, jj, take, &tile[c..], cols, t.rows) };
                        c += take;
                        g += 1;
                        continue;
                    }
                    let dst = sg.out.ptr_at(i0 * sg.ldy + jj, (t.rows - 1) * sg.ldy + take);
                    for r in 0..t.rows {
                        for cc in 0..take {
                            // SAFETY: (i0 + r, jj + cc) of segment g is in bounds (checked by
                            // ptr_at: r * ldy + cc < span) and belongs to this tile only.
                            unsafe { dst.add(r * sg.ldy + cc).write(Y::from_f32(tile[r * cols + c + cc])) };
                        }
                    }
                    c += take;
                    g += 1;
                }
            }
        },
    );
    give_scratch(qa.data);
    r
}

/// Writes `rows` rows (from `i0`) of the segment's columns `jj..jj + take` in the head
/// layout `hd`, from the f32 tile `src` (row `r` at `src[r * ld..]`).
///
/// # Safety
/// Those elements of the segment belong to the caller's tile only (no other task writes them).
#[allow(clippy::too_many_arguments)]
unsafe fn write_heads<Y: Element>(
    sg: &Segment<'_, Y>,
    hd: &Heads,
    i0: usize,
    jj: usize,
    take: usize,
    src: &[f32],
    ld: usize,
    rows: usize,
) {
    let Heads { heads, seq, transposed } = *hd;
    let dh = sg.cols / heads;
    let is_f32 = std::any::TypeId::of::<Y>() == std::any::TypeId::of::<f32>();
    // Rows r0..r1 of the tile lie in one sequence b (from position s0).
    let mut r0 = 0;
    while r0 < rows {
        let (b, s0) = ((i0 + r0) / seq, (i0 + r0) % seq);
        let r1 = rows.min(r0 + (seq - s0));
        let mut x = 0;
        while x < take {
            // A run of columns inside one head.
            let (h, e0) = ((jj + x) / dh, (jj + x) % dh);
            let run = (dh - e0).min(take - x);
            let block = (b * heads + h) * seq * dh;
            if transposed {
                // Column e of head h is `seq` contiguous values (one per token): this tile's
                // rows are a run of it.
                let dst = sg.out.ptr_at(block + e0 * seq + s0, (run - 1) * seq + (r1 - r0));
                let vals = &src[r0 * ld..(r1 - 1) * ld + x + run];
                if is_f32 && r1 - r0 == 8 {
                    for q in 0..run {
                        // Eight rows of column x + q (the tile's rows: r * ld + x + q < vals.len()).
                        let col: [f32; 8] = std::array::from_fn(|r| vals[r * ld + x + q]);
                        // SAFETY: Y is f32; 8 values in bounds (ptr_at), this tile's.
                        unsafe { dst.add(q * seq).cast::<[f32; 8]>().write_unaligned(col) };
                    }
                } else {
                    for q in 0..run {
                        for r in 0..r1 - r0 {
                            // SAFETY: in bounds (ptr_at); the element is this tile's (caller).
                            unsafe { dst.add(q * seq + r).write(Y::from_f32(vals[r * ld + x + q])) };
                        }
                    }
                }
            } else {
                for r in r0..r1 {
                    let dst = sg.out.ptr_at(block + (s0 + r - r0) * dh + e0, run);
                    let vals = &src[r * ld + x..r * ld + x + run];
                    if is_f32 {
                        // Sixteen values at a time as one array (a few vector moves, where a
                        // memcpy call of a run this short costs more than the copy).
                        let dst = dst.cast::<f32>();
                        let mut q = 0;
                        while q + 16 <= run {
                            let v: [f32; 16] = vals[q..q + 16].try_into().unwrap_or([0.0; 16]);
                            // SAFETY: Y is f32; values q..q + 16 < run are in bounds (ptr_at)
                            // and this tile's.
                            unsafe { dst.add(q).cast::<[f32; 16]>().write_unaligned(v) };
                            q += 16;
                        }
                        for (q, v) in vals.iter().enumerate().skip(q) {
                            // SAFETY: as above.
                            unsafe { dst.add(q).write(*v) };
                        }
                    } else {
                        for (q, v) in vals.iter().enumerate() {
                            // SAFETY: as above.
                            unsafe { dst.add(q).write(Y::from_f32(*v)) };
                        }
                    }
                }
            }
            x += run;
        }
        r0 = r1;
    }
}

/// Asks for the cache line holding `p` (a hint: no effect on any result, and it never faults).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that cannot fault, whatever the address; SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above (PRFM is a hint in the base instruction set).
    unsafe {
        std::arch::asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = p;
}

/// The integer part only: `out[i][j] = sum_k (qa[i][k] - za[i]) * qw[j][k]` computed by the
/// kernel `w` is packed for. `qa` holds `m` rows of `w.k()` bytes at stride `lda`, `za` one
/// zero point (0..=255) per row. Exposed for tests and for callers that quantize activations
/// themselves.
#[allow(clippy::too_many_arguments)]
pub fn gemm_i32(
    w: &PackedWeights,
    qa: &[u8],
    m: usize,
    lda: usize,
    za: &[i32],
    out: &mut [i32],
    ldo: usize,
    num_threads: usize,
) -> Result<()> {
    let (n, k) = (w.n(), w.k());
    check_matrix(qa.len(), m, k, lda, "quantized activations")?;
    check_matrix(out.len(), m, n, ldo, "output")?;
    if za.len() != m {
        return Err(Error::InvalidArgument(format!("{} zero points for {m} rows", za.len())));
    }
    if let Some(z) = za.iter().find(|z| !(0..=255).contains(*z)) {
        return Err(Error::InvalidArgument(format!("zero point {z} is outside 0..=255")));
    }
    let pool = Pool(resolve_threads(num_threads)?);
    let exec = Exec { par: &pool, threads: pool.0, wake: true };
    if m == 0 {
        return Ok(());
    }
    let kern = w.kernel();
    let kp = kern.padded_k(k);
    let row_bytes = kp * kern.a_bytes;
    let mut buf = try_zeroed_vec::<u8>(checked_mul(m, row_bytes, "activation buffer")?, "activation buffer")?;
    for i in 0..m {
        let dst = &mut buf[i * row_bytes..i * row_bytes + k * kern.a_bytes];
        for (d, &v) in dst.chunks_exact_mut(kern.a_bytes).zip(&qa[i * lda..i * lda + k]) {
            d[0] = v; // little-endian: a zero-extended u16 is the byte then 0
        }
    }
    let col_sums = w.col_sums();
    let shared = SharedOut::new(out);
    for_each_tile(w, &buf, row_bytes, m, &exec, None, |t, scratch| {
        // SAFETY: as in `gemm`; `scratch` has room for MR * NR values.
        unsafe {
            (kern.ukernel)(t.rows, kp, t.a.as_ptr(), row_bytes, t.panel.as_ptr(), &TileOut::I32(scratch.as_mut_ptr()))
        };
        for r in 0..t.rows {
            let i = t.i0 + r;
            for c in 0..t.cols {
                let j = t.j0 + c;
                let z = za[i] - kern.a_shift;
                let v = scratch[r * kern.nr + c].wrapping_sub(z.wrapping_mul(col_sums[j]));
                // SAFETY: (i, j) belongs to this tile only; tiles are disjoint.
                unsafe { shared.write(i * ldo + j, v) };
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every task runs exactly once, whatever the thread count, and the borrowed closure state
    /// is complete when `run_tasks` returns.
    #[test]
    fn run_tasks_runs_each_task_once() {
        for threads in [1, 2, 3, 8] {
            for tasks in [0, 1, 2, 7, 100, 1000] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                run_tasks(threads, tasks, |t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads} tasks {tasks}");
            }
        }
    }

    /// A small region (`wake == false`) runs every task once, on the caller alone when no
    /// helper spins (in order: nothing is handed out); `any_waiting` sees a spinning seat.
    #[test]
    fn run_tasks_small_regions_wake_no_thread() {
        for threads in [1, 2, 3] {
            for tasks in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                run_tasks_as(threads, tasks, false, |t| {
                    hits[t].fetch_add(1, Ordering::Relaxed);
                })
                .unwrap();
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "threads {threads} tasks {tasks}");
            }
        }
        let sp = Spinners::new(2);
        assert!(!sp.any_waiting());
        sp.seats[0].store(WAITING, Ordering::Relaxed);
        assert!(sp.any_waiting());
        sp.seats[0].store(BUSY, Ordering::Relaxed);
        assert!(!sp.any_waiting());
        // A helper may still spin after another test's region and take a share; when the
        // caller ran every task, it ran them in order.
        let order = std::sync::Mutex::new(Vec::new());
        let caller = std::thread::current().id();
        let on_caller = AtomicUsize::new(0);
        run_tasks_as(2, 50, false, |t| {
            order.lock().unwrap().push(t);
            if std::thread::current().id() == caller {
                on_caller.fetch_add(1, Ordering::Relaxed);
            }
        })
        .unwrap();
        let mut order = order.into_inner().unwrap();
        if on_caller.load(Ordering::Relaxed) == 50 {
            assert_eq!(order, (0..50).collect::<Vec<_>>());
        }
        order.sort();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
    }

    /// With every pool thread busy, the caller runs all tasks itself: its home range, then the
    /// helpers' ranges it takes over, so every task once and in order; the helper jobs that
    /// start afterwards find nothing left.
    #[test]
    fn run_tasks_caller_takes_over_absent_helpers() {
        let pool = &pool().unwrap().pool;
        let busy = pool.current_num_threads();
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = std::sync::Arc::new(std::sync::Mutex::new(wait));
        let started = std::sync::Arc::new(AtomicUsize::new(0));
        for _ in 0..busy {
            let (wait, started) = (wait.clone(), started.clone());
            pool.spawn(move || {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = wait.lock().unwrap().recv();
            });
        }
        // One job holds the lock while it waits, the others wait for the lock: all busy.
        while started.load(Ordering::SeqCst) < busy {
            std::thread::yield_now();
        }
        for (threads, tasks) in [(2, 10), (3, 11), (4, 4)] {
            let order = std::sync::Mutex::new(Vec::new());
            run_tasks(threads, tasks, |t| order.lock().unwrap().push(t)).unwrap();
            assert_eq!(order.into_inner().unwrap(), (0..tasks).collect::<Vec<_>>(), "threads {threads} tasks {tasks}");
        }
        for _ in 0..busy {
            release.send(()).unwrap();
        }
    }

    /// A region offered to a waiting helper is run by it (each task once, the helper taking
    /// its share); an offer finds no taker when no helper waits or its helper is busy; a helper
    /// leaves its seat once no region has come for its window.
    #[test]
    #[cfg_attr(miri, ignore = "relies on real time: a helper spinning for 50 ms")]
    fn spinners_take_offered_regions_and_leave_when_idle() {
        use std::sync::{Arc, Mutex};
        let sp = Spinners::new(2);
        assert_eq!(sp.seats.len(), 1);
        assert!(Spinners::new(1).seats.is_empty(), "one core: no helper may spin");
        let hits: &'static [AtomicUsize] = Box::leak((0..8).map(|_| AtomicUsize::new(0)).collect());
        let ran_on: &'static Mutex<Vec<std::thread::ThreadId>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        let task: &'static (dyn Fn(usize) + Sync) = Box::leak(Box::new(|t: usize| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            hits[t].fetch_add(1, Ordering::Relaxed);
            ran_on.lock().unwrap().push(std::thread::current().id());
        }));
        let set = Arc::new(TaskSet::new(2, 8, task));
        assert!(!sp.offer(&set), "no helper waits");
        sp.seats[0].store(BUSY, Ordering::Relaxed);
        assert!(!sp.offer(&set), "the helper is busy");
        sp.seats[0].store(GONE, Ordering::Relaxed);
        std::thread::scope(|s| {
            let helper = s.spawn(|| {
                sp.serve(std::time::Duration::from_millis(50));
                std::thread::current().id()
            });
            let t0 = std::time::Instant::now();
            while sp.seats[0].load(Ordering::Acquire) != WAITING {
                assert!(t0.elapsed().as_secs() < 10, "the helper never took its seat");
                std::thread::yield_now();
            }
            assert!(sp.offer(&set));
            set.work(0);
            while set.done.load(Ordering::Acquire) < set.tasks {
                std::thread::yield_now();
            }
            let helper = helper.join().unwrap();
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            assert!(ran_on.lock().unwrap().contains(&helper), "the waiting helper took none of the tasks");
            assert_eq!(sp.seats[0].load(Ordering::Acquire), GONE, "the helper left its seat");
        });
        assert_eq!(Arc::strong_count(&set), 1, "the helper's reference is released");
    }

    /// A panicking task reaches the caller after every other task has finished, and the pool
    /// keeps working afterwards.
    #[test]
    fn run_tasks_resumes_a_panic_after_all_tasks() {
        let finished = AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_tasks(2, 64, |t| {
                if t == 17 {
                    panic!("task 17 fails");
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        let p = r.expect_err("the panic must reach the caller");
        assert_eq!(p.downcast_ref::<&str>(), Some(&"task 17 fails"));
        assert_eq!(finished.load(Ordering::Relaxed), 63);
        let sum = AtomicUsize::new(0);
        run_tasks(2, 10, |t| {
            sum.fetch_add(t, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(sum.into_inner(), 45);
    }
}
