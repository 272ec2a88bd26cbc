//! The C ABI: the only place with `extern "C"`.
//!
//! Every function is a thin shell: it checks its arguments (null pointers, alignment, sizes
//! and their overflow, enum values, struct sizes, overlapping buffers), calls the safe core
//! inside `ffi_boundary!` (which also catches panics) and returns a `dynq_status`. On failure
//! a detailed message is kept per thread for `dynq_last_error_message`.
//!
//! Ownership: a `dynq_packed_weights*` returned through an out-pointer belongs to the caller,
//! who releases it with `dynq_packed_weights_free` exactly once. All other pointers are
//! borrowed for the duration of the call only; dynq keeps none of them.
//!
//! Thread safety: every function may be called from any thread. A packed-weights handle is
//! immutable after creation: any number of threads may use it at once (`dynq_gemm`, `_info`,
//! `_serialize`), as long as none of them frees it meanwhile.
//!
//! Enum-like parameters are `uint32_t` in the signatures, never C enums, so that an
//! out-of-range value from a caller is a checked `DYNQ_STATUS_INVALID_ARGUMENT`, not undefined
//! behaviour.

#![allow(non_camel_case_types)]

use crate::error::{Error, Result, Status};
use crate::gemm::{Epilogue, GemmOptions};
use crate::isa::Isa;
use crate::pack::{PackOptions, PackedWeights, Reservation, WeightLayout};
use crate::quant::{ActGranularity, ActType, WeightGranularity};
use std::cell::RefCell;
use std::ffi::c_char;

/// Major version of the library (semantic versioning).
pub const DYNQ_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const DYNQ_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const DYNQ_VERSION_PATCH: u32 = 0;
/// Version of the C ABI; bumped on any incompatible change of a signature or struct.
pub const DYNQ_ABI_VERSION: u32 = 1;

/// Kernel families (`uint32_t` values). `DYNQ_ISA_AUTO` selects the best the CPU supports (or
/// the `DYNQ_ISA` environment variable).
#[repr(u32)]
pub enum dynq_isa {
    Auto = 0,
    Scalar = 1,
    Avx2 = 2,
    AvxVnni = 3,
    Avx512Vnni = 4,
    Neon = 5,
    NeonDotprod = 6,
    NeonI8mm = 7,
    /// x86-64 AMX-INT8 (tile `tdpbusd`), with AVX-512 VNNI for the rest.
    AmxInt8 = 8,
}

/// Memory layout of a weight matrix (`uint32_t` values).
#[repr(u32)]
pub enum dynq_weight_layout {
    /// `[N][K]` row-major, one row per output channel (PyTorch Linear, ONNX Gemm transB=1).
    Nk = 0,
    /// `[K][N]` row-major, one row per input feature (ONNX MatMul).
    Kn = 1,
}

/// Weight scale granularity (`uint32_t` values).
#[repr(u32)]
pub enum dynq_weight_granularity {
    /// One scale per output channel (default).
    PerChannel = 0,
    /// One scale for the whole matrix.
    PerTensor = 1,
}

/// Activation range granularity (`uint32_t` values).
#[repr(u32)]
pub enum dynq_act_granularity {
    /// One scale and zero point per row of A, i.e. per token (default).
    PerRow = 0,
    /// One scale and zero point for all of A (ONNX DynamicQuantizeLinear).
    PerTensor = 1,
}

/// Activation quantization scheme (`uint32_t` values).
#[repr(u32)]
pub enum dynq_act_type {
    /// uint8 with a zero point, as ONNX DynamicQuantizeLinear (default).
    AsymmetricU8 = 0,
    /// int8 in [-127, 127], no zero point.
    SymmetricI8 = 1,
}

/// Operation fused after the bias (`uint32_t` values). Values 3 to 5 came after the first
/// release; a library from before them refuses them with DYNQ_STATUS_INVALID_ARGUMENT, as any
/// unknown value.
#[repr(u32)]
pub enum dynq_epilogue {
    /// None (default).
    None = 0,
    /// max(y, 0).
    Relu = 1,
    /// GELU, erf form: 0.5 * y * (1 + erf(y / sqrt(2))), erf evaluated by dynq's own rational
    /// approximation (error below 3.5e-7), identical on every CPU.
    Gelu = 2,
    /// GELU, tanh form: 0.5 * y * (1 + tanh(sqrt(2 / pi) * (y + 0.044715 * y^3))), as GPT-2's
    /// `gelu_new`, ONNX `Gelu` with `approximate="tanh"` and ONNX Runtime's `FastGelu`; tanh
    /// evaluated by dynq's own rational approximation (error below 3.5e-7), identical on every
    /// CPU.
    GeluTanh = 3,
    /// SiLU (Swish), y * sigmoid(y), the gate of LLaMA's and its kin's MLP: y/2 + y/2 *
    /// tanh(y/2) with the same tanh.
    Silu = 4,
    /// QuickGELU, y * sigmoid(1.702 * y) (CLIP; ONNX Runtime's QuickGelu with its default
    /// alpha): y/2 + y/2 * tanh(0.851 * y) with the same tanh.
    QuickGelu = 5,
}

/// Element types of activations and outputs (`uint32_t` values), for `dynq_gemm_ex`.
#[repr(u32)]
pub enum dynq_dtype {
    /// IEEE binary32.
    F32 = 0,
    /// IEEE binary16.
    F16 = 1,
    /// bfloat16.
    Bf16 = 2,
}

/// Options for packing. Initialize with `dynq_pack_config_init`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dynq_pack_config {
    /// Must be `sizeof(dynq_pack_config)`; lets later versions extend the struct.
    pub struct_size: u32,
    /// A `dynq_weight_granularity` (ignored for pre-quantized weights).
    pub granularity: u32,
    /// A `dynq_isa`: the kernel family to pack for; `DYNQ_ISA_AUTO` (0) for the default.
    pub isa: u32,
    /// Largest quantized weight magnitude for f32 weights, 1..=127, or 0 for the default
    /// (127, 8-bit weights); checked, but without effect, for pre-quantized weights and
    /// blobs. 64 (ONNX Runtime's
    /// `reduce_range`) halves the weights' resolution and lets AVX2 CPUs without VNNI run a
    /// faster kernel; the results are the same on every CPU. A struct of the earlier size
    /// (12 bytes, before this field) is still accepted and means 0.
    pub weight_qmax: u32,
}

/// `sizeof(dynq_pack_config)` before `weight_qmax` was added, still accepted.
const PACK_CONFIG_V1_SIZE: usize = 12;

/// Options of a GEMM call. Initialize with `dynq_gemm_config_init`, then change fields.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dynq_gemm_config {
    /// Must be `sizeof(dynq_gemm_config)`.
    pub struct_size: u32,
    /// A `dynq_act_granularity`.
    pub act_granularity: u32,
    /// A `dynq_act_type`.
    pub act_type: u32,
    /// A `dynq_epilogue`.
    pub epilogue: u32,
    /// Threads: 0 = default (`DYNQ_NUM_THREADS`, else all cores), 1 = the calling thread only.
    pub num_threads: u32,
}

/// One output of `dynq_gemm_split`: `cols` consecutive columns of the product, written as `m`
/// rows at stride `ldy` (elements, `>= cols`) to `y`, whose element type is the call's
/// `y_type`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dynq_output {
    pub y: *mut std::ffi::c_void,
    pub ldy: usize,
    pub cols: usize,
}

/// The attention-head layout of one output of `dynq_gemm_split_heads`. With `heads == 0` the
/// output has the plain layout of `dynq_output` (rows at stride `ldy`). Otherwise the output's
/// `m` rows are `m / seq` sequences of `seq` tokens, its `cols` columns `heads` heads of
/// `d = cols / heads` values, and row `b * seq + s`, column `h * d + e` goes to
/// `y[((b * heads + h) * seq + s) * d + e]` (`[batch, heads, seq, d]`, `transposed == 0`: the
/// reshape and `perm = [0, 2, 1, 3]` transpose of attention's Q and V) or to
/// `y[((b * heads + h) * d + e) * seq + s]` (`[batch, heads, d, seq]`, `transposed == 1`:
/// transposed keys); the values are the bits of the plain layout.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dynq_heads {
    /// Number of heads, or 0 for the plain layout.
    pub heads: usize,
    /// Tokens per sequence (when `heads > 0`).
    pub seq: usize,
    /// 0: `[batch, heads, seq, d]`; 1: `[batch, heads, d, seq]`.
    pub transposed: u32,
    /// Zero.
    pub reserved: u32,
}

/// What `dynq_packed_weights_get_info` reports. Set `struct_size` before the call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct dynq_packed_weights_info {
    /// Must be `sizeof(dynq_packed_weights_info)`, set by the caller.
    pub struct_size: u32,
    /// The `dynq_weight_granularity` of the scales.
    pub granularity: u32,
    /// The `dynq_isa` whose kernel the weights are packed for.
    pub isa: u32,
    /// Version of that kernel's packed layout.
    pub layout_version: u32,
    /// Output channels.
    pub n: usize,
    /// Inputs per output channel.
    pub k: usize,
    /// Heap bytes held by the handle.
    pub bytes: usize,
    /// Bytes `dynq_packed_weights_serialize` writes.
    pub serialized_bytes: usize,
    /// Tile geometry of the kernel: rows of A, columns of W, K group.
    pub mr: u32,
    pub nr: u32,
    pub kr: u32,
    /// Zero.
    pub reserved: u32,
    /// Static NUL-terminated kernel name, valid for the life of the process.
    pub kernel_name: *const c_char,
}

/// Opaque handle to packed weights.
pub struct dynq_packed_weights {
    inner: PackedWeights,
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn record(e: &Error) -> Status {
    let msg = e.message().to_string();
    LAST_ERROR.with(|l| *l.borrow_mut() = msg);
    e.status()
}

/// Runs a body returning `Result<()>` with panics caught, and turns it into a status.
macro_rules! ffi_boundary {
    ($body:block) => {{
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> { $body }));
        match r {
            Ok(Ok(())) => Status::Ok,
            Ok(Err(e)) => record(&e),
            Err(p) => {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                record(&Error::Internal(format!("caught a panic inside dynq: {what} (please report)")))
            }
        }
    }};
}

fn null_err(name: &str) -> Error {
    Error::NullPointer(format!("{name} is NULL"))
}

/// Checks a pointer that must be non-null and aligned for `T`.
fn check_ptr<T>(p: *const T, name: &str) -> Result<()> {
    if p.is_null() {
        return Err(null_err(name));
    }
    if !(p as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(Error::InvalidArgument(format!(
            "{name} ({p:p}) is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )));
    }
    Ok(())
}

/// Element count `rows x cols at stride ld` must address, in elements, with overflow checks
/// covering the byte size as well (slices may not exceed isize::MAX bytes).
fn span(rows: usize, cols: usize, ld: usize, elem: usize, name: &str) -> Result<usize> {
    if ld < cols {
        return Err(Error::InvalidArgument(format!("{name}: row stride {ld} is smaller than the row length {cols}")));
    }
    if rows == 0 {
        return Ok(0);
    }
    let len = (rows - 1)
        .checked_mul(ld)
        .and_then(|v| v.checked_add(cols))
        .filter(|v| v.checked_mul(elem).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| {
            Error::SizeOverflow(format!("{name}: {rows} rows of {cols} at stride {ld} overflow the address space"))
        })?;
    Ok(len)
}

/// Reads a caller's config struct whose first field is `struct_size`.
///
/// # Safety
/// `p` is NULL or points to a readable `T` (its `struct_size` is checked before the rest is
/// read).
unsafe fn read_config<T: Copy>(p: *const T, default: T, name: &str) -> Result<T> {
    // SAFETY: forwarded contract.
    unsafe { read_config_versions(p, default, name, &[]) }
}

/// [`read_config`] that also accepts the sizes the struct had in earlier releases (`older`:
/// each a prefix of the current fields, all `u32`-aligned): the fields a caller's struct lacks
/// keep their defaults.
///
/// # Safety
/// `p` is NULL or points to at least `struct_size` readable bytes (the size is read first).
unsafe fn read_config_versions<T: Copy>(p: *const T, default: T, name: &str, older: &[usize]) -> Result<T> {
    if p.is_null() {
        return Ok(default);
    }
    check_ptr(p, name)?;
    // SAFETY: non-null, aligned; the first field of every config is a u32.
    let size = unsafe { *(p as *const u32) } as usize;
    if older.contains(&size) && size < std::mem::size_of::<T>() {
        let mut v = default;
        // SAFETY: the caller's struct has `size` readable bytes, a prefix of T's fields
        // (plain integers), copied over the defaults.
        unsafe { std::ptr::copy_nonoverlapping(p as *const u8, &mut v as *mut T as *mut u8, size) };
        return Ok(v);
    }
    if size != std::mem::size_of::<T>() {
        let earlier: String = older.iter().map(|s| format!(" or {s} (its layout before later fields)")).collect();
        return Err(Error::InvalidArgument(format!(
            "{name}->struct_size is {size}, expected {}{earlier} (initialize it with its _init function)",
            std::mem::size_of::<T>()
        )));
    }
    // SAFETY: the caller promised a readable T, and its size field agrees.
    Ok(unsafe { *p })
}

fn isa_from_raw(raw: u32) -> Result<Option<Isa>> {
    if raw == 0 {
        return Ok(None);
    }
    Isa::from_raw(raw).map(Some).ok_or_else(|| Error::InvalidArgument(format!("isa={raw} is not a dynq_isa value")))
}

fn default_pack_config() -> dynq_pack_config {
    dynq_pack_config {
        struct_size: std::mem::size_of::<dynq_pack_config>() as u32,
        granularity: 0,
        isa: 0,
        weight_qmax: 0,
    }
}

fn default_gemm_config() -> dynq_gemm_config {
    dynq_gemm_config {
        struct_size: std::mem::size_of::<dynq_gemm_config>() as u32,
        act_granularity: 0,
        act_type: 0,
        epilogue: 0,
        num_threads: 0,
    }
}

fn pack_options(c: &dynq_pack_config) -> Result<PackOptions> {
    let granularity = WeightGranularity::from_raw(c.granularity).ok_or_else(|| {
        Error::InvalidArgument(format!("granularity={} is not a dynq_weight_granularity value", c.granularity))
    })?;
    let weight_qmax = match c.weight_qmax {
        0 => crate::quant::weights::WEIGHT_QMAX,
        q @ 1..=127 => q as u8,
        q => {
            return Err(Error::InvalidArgument(format!("weight_qmax={q}: must be 1..=127, or 0 for the default (127)")))
        }
    };
    Ok(PackOptions { granularity, isa: isa_from_raw(c.isa)?, weight_qmax })
}

fn gemm_options(c: &dynq_gemm_config) -> Result<GemmOptions> {
    let inv = |f: &str, v: u32, t: &str| Error::InvalidArgument(format!("{f}={v} is not a {t} value"));
    Ok(GemmOptions {
        act_granularity: ActGranularity::from_raw(c.act_granularity)
            .ok_or_else(|| inv("act_granularity", c.act_granularity, "dynq_act_granularity"))?,
        act_type: ActType::from_raw(c.act_type).ok_or_else(|| inv("act_type", c.act_type, "dynq_act_type"))?,
        epilogue: Epilogue::from_raw(c.epilogue).ok_or_else(|| inv("epilogue", c.epilogue, "dynq_epilogue"))?,
        num_threads: c.num_threads as usize,
    })
}

fn layout_from_raw(raw: u32) -> Result<WeightLayout> {
    WeightLayout::from_raw(raw)
        .ok_or_else(|| Error::InvalidArgument(format!("layout={raw} is not a dynq_weight_layout value")))
}

fn out_handle(out: *mut *mut dynq_packed_weights, pw: PackedWeights) {
    let b = Box::new(dynq_packed_weights { inner: pw });
    // SAFETY: `out` was checked non-null and aligned by the caller of this helper.
    unsafe { *out = Box::into_raw(b) };
}

/// # Safety
/// `p` is NULL or a live handle from this library.
unsafe fn handle<'a>(p: *const dynq_packed_weights) -> Result<&'a PackedWeights> {
    check_ptr(p, "packed weights")?;
    // SAFETY: the caller guarantees a live handle.
    Ok(unsafe { &(*p).inner })
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

// ------------------------------------------------------------------------------------------
// Version, status and diagnostics
// ------------------------------------------------------------------------------------------

/// The library version as a static NUL-terminated string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn dynq_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The C ABI version this library implements (`DYNQ_ABI_VERSION` of its header).
#[no_mangle]
pub extern "C" fn dynq_abi_version() -> u32 {
    DYNQ_ABI_VERSION
}

/// A static NUL-terminated description of a status; "unknown status" for other values.
#[no_mangle]
pub extern "C" fn dynq_status_str(status: u32) -> *const c_char {
    Status::from_raw(status).map_or(c"unknown status".as_ptr(), |s| s.c_str().as_ptr())
}

/// Copies the detailed message of the most recent failed call on this thread into `buf`
/// (truncated to `len - 1` bytes and NUL-terminated) and returns the message's full length
/// in bytes, without the NUL. With `buf` NULL or `len` 0 it only returns the length. The
/// message is empty if no call on this thread has failed yet. Successful calls leave it as is.
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn dynq_last_error_message(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR.with(|l| {
        let msg = l.borrow();
        if !buf.is_null() && len > 0 {
            let n = msg.len().min(len - 1);
            // SAFETY: the caller provides `len` writable bytes; we write n + 1 <= len.
            unsafe {
                std::ptr::copy_nonoverlapping(msg.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
        }
        msg.len()
    })
}

/// Writes the ISA used when none is forced into `*isa` (a `dynq_isa` value, never AUTO).
/// Fails with `DYNQ_STATUS_UNSUPPORTED` or `DYNQ_STATUS_INVALID_ARGUMENT` when the `DYNQ_ISA`
/// environment variable names an ISA this CPU lacks or no ISA at all.
///
/// # Safety
/// `isa` is NULL or points to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn dynq_active_isa(isa: *mut u32) -> Status {
    ffi_boundary!({
        check_ptr(isa, "isa")?;
        let a = crate::isa::active()?;
        // SAFETY: checked non-null and aligned.
        unsafe { *isa = a.to_raw() };
        Ok(())
    })
}

/// The static NUL-terminated name of a `dynq_isa` value ("auto", "scalar", "avx2", ...), or
/// "unknown".
#[no_mangle]
pub extern "C" fn dynq_isa_name(isa: u32) -> *const c_char {
    match Isa::from_raw(isa) {
        Some(i) => i.c_name().as_ptr(),
        None if isa == 0 => c"auto".as_ptr(),
        None => c"unknown".as_ptr(),
    }
}

/// 1 if `isa` can be used on this CPU with this build (it has a kernel for it), else 0.
/// `DYNQ_ISA_AUTO` gives 1 unless the `DYNQ_ISA` environment variable is invalid.
#[no_mangle]
pub extern "C" fn dynq_isa_available(isa: u32) -> i32 {
    match isa_from_raw(isa) {
        Ok(None) => crate::isa::active().is_ok() as i32,
        Ok(Some(i)) => crate::isa::resolve(i).is_ok() as i32,
        Err(_) => 0,
    }
}

// ------------------------------------------------------------------------------------------
// Configs
// ------------------------------------------------------------------------------------------

/// Fills `*config` with the defaults (per-channel weights, automatic ISA, 8-bit weights) in
/// the struct's first layout: 12 bytes (`struct_size`, `granularity`, `isa`), `struct_size` =
/// 12. This is the entry point that programs built before `weight_qmax` existed call; C and
/// C++ code compiled with this header calls [`dynq_pack_config_init_sized`] instead, through
/// the function-like macro of the same name at the end of the header, which passes
/// `sizeof(*config)`. (To call this function itself, write `(dynq_pack_config_init)(config)`.)
///
/// # Safety
/// `config` is NULL or points to at least 12 writable bytes, aligned for a `dynq_pack_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_pack_config_init(config: *mut dynq_pack_config) -> Status {
    // SAFETY: forwarded contract.
    unsafe { dynq_pack_config_init_sized(config, PACK_CONFIG_V1_SIZE) }
}

/// Fills the `size` bytes of `*config` with the defaults (per-channel weights, automatic ISA,
/// 8-bit weights) and sets `struct_size = size`. `size` is the `sizeof(dynq_pack_config)` the
/// caller was compiled with: 16 for this header, 12 for headers before `weight_qmax`; any
/// other size is refused and nothing is written. Writing only `size` bytes keeps programs
/// built against a smaller struct safe when this library grows it.
///
/// # Safety
/// `config` is NULL or points to at least `size` writable bytes, aligned for a
/// `dynq_pack_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_pack_config_init_sized(config: *mut dynq_pack_config, size: usize) -> Status {
    ffi_boundary!({
        check_ptr(config, "config")?;
        let full = std::mem::size_of::<dynq_pack_config>();
        if size != full && size != PACK_CONFIG_V1_SIZE {
            return Err(Error::InvalidArgument(format!(
                "size={size} is not a size dynq_pack_config has had ({full}, or {PACK_CONFIG_V1_SIZE} before \
                 weight_qmax)"
            )));
        }
        let mut v = default_pack_config();
        v.struct_size = size as u32;
        // SAFETY: checked non-null and aligned; the caller has `size` writable bytes, and `v`
        // is a plain struct of u32 fields, of which the first `size` bytes are copied.
        unsafe { std::ptr::copy_nonoverlapping(&v as *const dynq_pack_config as *const u8, config as *mut u8, size) };
        Ok(())
    })
}

/// Fills `*config` with the defaults (per-row asymmetric uint8 activations, no epilogue,
/// default thread count).
///
/// # Safety
/// `config` is NULL or points to a writable `dynq_gemm_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_config_init(config: *mut dynq_gemm_config) -> Status {
    ffi_boundary!({
        check_ptr(config, "config")?;
        // SAFETY: checked non-null and aligned.
        unsafe { config.write(default_gemm_config()) };
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// Packed weights
// ------------------------------------------------------------------------------------------

/// Quantizes f32 weights to int8 and packs them.
///
/// `w` holds `n * k` floats in `layout` (`DYNQ_WEIGHT_LAYOUT_NK`: n rows of k;
/// `DYNQ_WEIGHT_LAYOUT_KN`: k rows of n). `config` may be NULL for defaults. On success
/// `*out` receives a new handle owned by the caller (free with `dynq_packed_weights_free`);
/// on failure `*out` is set to NULL. NaN or infinite weights give `DYNQ_STATUS_NON_FINITE`;
/// `n` or `k` zero `DYNQ_STATUS_INVALID_ARGUMENT`; `k` above 65536 `DYNQ_STATUS_UNSUPPORTED`.
/// `w` is only read during the call.
///
/// # Safety
/// `w` points to `n * k` readable floats; `out` to a writable pointer; `config` is NULL or
/// points to a `dynq_pack_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_pack_weights(
    w: *const f32,
    n: usize,
    k: usize,
    layout: u32,
    config: *const dynq_pack_config,
    out: *mut *mut dynq_packed_weights,
) -> Status {
    ffi_boundary!({
        check_ptr(out, "out")?;
        // SAFETY: checked non-null and aligned.
        unsafe { *out = std::ptr::null_mut() };
        check_ptr(w, "w")?;
        let layout = layout_from_raw(layout)?;
        // SAFETY: config is NULL or readable per the contract.
        let opts = pack_options(&unsafe {
            read_config_versions(config, default_pack_config(), "config", &[PACK_CONFIG_V1_SIZE])
        }?)?;
        let res = Reservation::new(n, k, opts.isa)?;
        // SAFETY: the caller provides n * k readable floats; Reservation::new checked that
        // n * k * 4 does not overflow.
        let w = unsafe { std::slice::from_raw_parts(w, res.input_len()) };
        out_handle(out, res.fill_f32(w, layout, opts.granularity, opts.weight_qmax)?);
        Ok(())
    })
}

/// Packs weights that are already quantized: int8 values (`n * k` in `layout`, any value in
/// [-128, 127]) with `num_scales` scales, 1 (per tensor) or `n` (per channel), such that
/// `W[n][k] ~= scale * q[n][k]`. Scales must be finite and non-negative. `config->granularity`
/// is ignored. Ownership of `*out` as for `dynq_pack_weights`.
///
/// # Safety
/// `q` points to `n * k` readable bytes, `scales` to `num_scales` readable floats, `out` to a
/// writable pointer, `config` is NULL or points to a `dynq_pack_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_pack_quantized_weights(
    q: *const i8,
    n: usize,
    k: usize,
    layout: u32,
    scales: *const f32,
    num_scales: usize,
    config: *const dynq_pack_config,
    out: *mut *mut dynq_packed_weights,
) -> Status {
    ffi_boundary!({
        check_ptr(out, "out")?;
        // SAFETY: checked non-null and aligned.
        unsafe { *out = std::ptr::null_mut() };
        check_ptr(q, "q")?;
        check_ptr(scales, "scales")?;
        let layout = layout_from_raw(layout)?;
        if num_scales != 1 && num_scales != n {
            return Err(Error::InvalidArgument(format!(
                "num_scales={num_scales}; expected 1 (per tensor) or n = {n} (per channel)"
            )));
        }
        // SAFETY: config is NULL or readable per the contract.
        let opts = pack_options(&unsafe {
            read_config_versions(config, default_pack_config(), "config", &[PACK_CONFIG_V1_SIZE])
        }?)?;
        let res = Reservation::new(n, k, opts.isa)?;
        // SAFETY: the caller provides n * k bytes and num_scales (<= n) floats; sizes checked.
        let (q, scales) =
            unsafe { (std::slice::from_raw_parts(q, res.input_len()), std::slice::from_raw_parts(scales, num_scales)) };
        out_handle(out, res.fill_quantized(q, layout, scales)?);
        Ok(())
    })
}

/// Describes packed weights. Set `info->struct_size = sizeof(dynq_packed_weights_info)` first.
///
/// # Safety
/// `packed` is a live handle; `info` points to a writable `dynq_packed_weights_info`.
#[no_mangle]
pub unsafe extern "C" fn dynq_packed_weights_get_info(
    packed: *const dynq_packed_weights,
    info: *mut dynq_packed_weights_info,
) -> Status {
    ffi_boundary!({
        // SAFETY: per the contract.
        let pw = unsafe { handle(packed) }?;
        check_ptr(info, "info")?;
        // SAFETY: checked non-null and aligned; struct_size is the first u32.
        let size = unsafe { *(info as *const u32) } as usize;
        if size != std::mem::size_of::<dynq_packed_weights_info>() {
            return Err(Error::InvalidArgument(format!(
                "info->struct_size is {size}, expected sizeof(dynq_packed_weights_info) = {}",
                std::mem::size_of::<dynq_packed_weights_info>()
            )));
        }
        let kern = pw.kernel();
        let v = dynq_packed_weights_info {
            struct_size: size as u32,
            granularity: pw.granularity().to_raw(),
            isa: pw.isa().to_raw(),
            layout_version: kern.layout_version,
            n: pw.n(),
            k: pw.k(),
            bytes: pw.bytes(),
            serialized_bytes: pw.serialized_len(),
            mr: kern.mr as u32,
            nr: kern.nr as u32,
            kr: kern.kr as u32,
            reserved: 0,
            kernel_name: kernel_name_ptr(kern.name),
        };
        // SAFETY: checked non-null, aligned, and the caller's size matches.
        unsafe { info.write(v) };
        Ok(())
    })
}

/// NUL-terminated kernel names, one per table entry (and stand-in), built once.
fn kernel_name_ptr(name: &str) -> *const c_char {
    static NAMES: once_cell::sync::Lazy<Vec<std::ffi::CString>> = once_cell::sync::Lazy::new(|| {
        let stand_ins = Isa::ALL.iter().filter_map(|&i| crate::kernels::stand_in_for(i));
        crate::kernels::KERNELS
            .iter()
            .chain(stand_ins)
            .map(|k| std::ffi::CString::new(k.name).expect("kernel names have no NUL"))
            .collect()
    });
    NAMES.iter().find(|c| c.as_bytes() == name.as_bytes()).map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Releases packed weights. NULL is a no-op. The handle must not be in use by another thread
/// and must not be used afterwards.
///
/// # Safety
/// `packed` is NULL or a live handle from this library, not freed before.
#[no_mangle]
pub unsafe extern "C" fn dynq_packed_weights_free(packed: *mut dynq_packed_weights) {
    if !packed.is_null() {
        // SAFETY: the caller hands back ownership of a handle created by Box::into_raw.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(unsafe { Box::from_raw(packed) })));
    }
}

/// Serializes packed weights to a portable blob (see the README for the format), which
/// `dynq_packed_weights_deserialize` loads on any CPU.
///
/// With `buf` NULL, writes the required size to `*written` and returns OK. Otherwise writes
/// the blob if `buf_len` suffices and stores its size in `*written`; if not, stores the
/// required size in `*written` and returns `DYNQ_STATUS_BUFFER_TOO_SMALL`.
///
/// # Safety
/// `packed` is a live handle; `buf` is NULL or points to `buf_len` writable bytes; `written`
/// points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn dynq_packed_weights_serialize(
    packed: *const dynq_packed_weights,
    buf: *mut u8,
    buf_len: usize,
    written: *mut usize,
) -> Status {
    ffi_boundary!({
        // SAFETY: per the contract.
        let pw = unsafe { handle(packed) }?;
        check_ptr(written, "written")?;
        let need = pw.serialized_len();
        // SAFETY: checked non-null and aligned.
        unsafe { *written = need };
        if buf.is_null() {
            return Ok(());
        }
        if buf_len < need {
            return Err(Error::BufferTooSmall(format!(
                "serialized packed weights need {need} bytes, buf_len is {buf_len}"
            )));
        }
        // SAFETY: the caller provides buf_len >= need writable bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(buf, need) };
        pw.serialize_into(out)?;
        Ok(())
    })
}

/// Loads a blob written by `dynq_packed_weights_serialize` (on any machine) and packs it for
/// this CPU (or `config->isa`). A truncated, altered or foreign blob gives
/// `DYNQ_STATUS_CORRUPT_DATA`; a newer format version `DYNQ_STATUS_UNSUPPORTED`.
/// Ownership of `*out` as for `dynq_pack_weights`; `buf` is only read during the call.
///
/// # Safety
/// `buf` points to `len` readable bytes; `out` to a writable pointer; `config` is NULL or
/// points to a `dynq_pack_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_packed_weights_deserialize(
    buf: *const u8,
    len: usize,
    config: *const dynq_pack_config,
    out: *mut *mut dynq_packed_weights,
) -> Status {
    ffi_boundary!({
        check_ptr(out, "out")?;
        // SAFETY: checked non-null and aligned.
        unsafe { *out = std::ptr::null_mut() };
        check_ptr(buf, "buf")?;
        if len > isize::MAX as usize {
            return Err(Error::SizeOverflow(format!("len={len} exceeds the address space")));
        }
        // SAFETY: config is NULL or readable per the contract.
        let opts = pack_options(&unsafe {
            read_config_versions(config, default_pack_config(), "config", &[PACK_CONFIG_V1_SIZE])
        }?)?;
        // SAFETY: the caller provides len readable bytes.
        let blob = unsafe { std::slice::from_raw_parts(buf, len) };
        out_handle(out, PackedWeights::deserialize(blob, opts)?);
        Ok(())
    })
}

// ------------------------------------------------------------------------------------------
// GEMM
// ------------------------------------------------------------------------------------------

/// `Y = dequant(quant(A) x W^T) + bias`, then the epilogue, with activations quantized from
/// the range seen in this call.
///
/// - `a`: `m` rows of `k` floats (k of `packed`), row `i` at `a + i * lda`, `lda >= k`.
/// - `bias`: NULL or `n` floats.
/// - `y`: `m` rows of `n` floats, row `i` at `y + i * ldy`, `ldy >= n`; elements between `n`
///   and `ldy` are not touched. `y` must not overlap `a` or `bias`.
/// - `config`: NULL for defaults.
///
/// `m == 0` is a valid empty batch (`a` and `y` may then be NULL). NaN or infinity in `a` or
/// `bias` gives `DYNQ_STATUS_NON_FINITE` (the message names the element) and leaves `y`
/// untouched; so does every other error. Results are bit-identical for every ISA and thread
/// count. Safe to call concurrently on the same `packed` handle.
///
/// # Safety
/// `packed` is a live handle; `a`, `bias`, `y` point to buffers of the sizes above; `config`
/// is NULL or points to a `dynq_gemm_config`.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm(
    packed: *const dynq_packed_weights,
    a: *const f32,
    m: usize,
    lda: usize,
    bias: *const f32,
    y: *mut f32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract, with f32 elements.
    ffi_boundary!({
        unsafe {
            gemm_generic::<f32, f32>(
                packed,
                a,
                m,
                lda,
                std::ptr::null(),
                bias,
                (std::ptr::null(), 0),
                NO_LN,
                y,
                ldy,
                config,
            )
        }
    })
}

/// `dynq_gemm` with activations and outputs of another element type: `a_type` and `y_type`
/// are `dynq_dtype` values (`DYNQ_DTYPE_F32`, `_F16`, `_BF16`), `lda` and `ldy` count
/// elements, and the pointers must be aligned to their element size. The bias stays f32.
/// Inputs are widened exactly; outputs are computed in f32 and rounded to nearest even, so they
/// are bit-identical on every CPU too.
///
/// # Safety
/// As `dynq_gemm`, with `a` and `y` holding elements of `a_type` and `y_type`.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_ex(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    bias: *const f32,
    y: *mut std::ffi::c_void,
    y_type: u32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract, without smoothing factors.
    ffi_boundary!({
        unsafe {
            gemm_typed_raw(
                packed,
                a,
                a_type,
                m,
                lda,
                std::ptr::null(),
                bias,
                (std::ptr::null(), 0),
                NO_LN,
                y,
                y_type,
                ldy,
                config,
            )
        }
    })
}

/// `dynq_gemm_ex` with per-input-channel smoothing factors: `smooth` is NULL (then this is
/// `dynq_gemm_ex`) or points to `k` positive finite floats, and row `i` of A is quantized as
/// `a[i][j] * smooth[j]` (one f32 multiplication; the result is exactly `dynq_gemm_ex` on the
/// multiplied A).
///
/// This is how activation outliers move into the weights (SmoothQuant): quantize the weights
/// with row `j` of the float `W[K][N]` (column `j` of `W[N][K]`) divided by `smooth[j]`, and pass
/// `smooth` here; the product is the same, but channels of A with very different ranges share
/// one quantization range better. Factors that are not positive and finite give
/// `DYNQ_STATUS_INVALID_ARGUMENT`; a product that overflows `DYNQ_STATUS_NON_FINITE`; `y` is
/// then untouched. `smooth` must not overlap `y`.
///
/// # Safety
/// As `dynq_gemm_ex`; `smooth` is NULL or points to `k` readable floats.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_smoothed(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    y: *mut std::ffi::c_void,
    y_type: u32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract.
    ffi_boundary!({
        unsafe {
            gemm_typed_raw(
                packed,
                a,
                a_type,
                m,
                lda,
                smooth,
                bias,
                (std::ptr::null(), 0),
                NO_LN,
                y,
                y_type,
                ldy,
                config,
            )
        }
    })
}

/// `dynq_gemm_smoothed` with a residual added to the result: `y[i][j] = act(product + bias[j])
/// + residual[i][j]` (the epilogue activation first, then one f32 addition of the residual,
/// widened exactly from `y_type`; then the store). This is the skip connection of a transformer
/// block (`x + Linear(h)`) fused into the product, so the sum costs no extra pass over memory.
/// The result is bit-identical to `dynq_gemm_smoothed` followed by that addition in f32.
///
/// `residual` is NULL (then this is `dynq_gemm_smoothed`) or points to `m` rows of `n`
/// values of type `y_type` at stride `ldr` (elements, `>= n`). It must not overlap `y`: to
/// accumulate into `y`, copy it first (`DYNQ_STATUS_INVALID_ARGUMENT` otherwise). Residual
/// values are added as they are: a NaN or infinity there gives NaN or infinity in that element
/// only, as the float addition it replaces would. On any error `y` is untouched.
///
/// # Safety
/// As `dynq_gemm_smoothed`; `residual` is NULL or points to `(m - 1) * ldr + n` readable values
/// of type `y_type` (when `m > 0`).
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_residual(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    residual: *const std::ffi::c_void,
    ldr: usize,
    y: *mut std::ffi::c_void,
    y_type: u32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract.
    ffi_boundary!({
        unsafe {
            gemm_typed_raw(packed, a, a_type, m, lda, smooth, bias, (residual, ldr), NO_LN, y, y_type, ldy, config)
        }
    })
}

/// `dynq_gemm_residual` followed by a layer norm of each output row, fused:
/// `y[i] = LayerNorm(act(product + bias) + residual)[i] * ln_scale + ln_bias`, the normalization
/// over the row's `n` values (mean, then the biased variance of the deviations, `1 /
/// sqrt(var + ln_epsilon)`), as ONNX `LayerNormalization` over the last axis. This is the
/// post-LN transformer block (BERT: `LayerNorm(x + Linear(h))`) in one call; rows are normalized
/// while they are still in cache. The arithmetic has one fixed order (64 lane sums, a halving
/// tree, one f32 operation per step; see the README), so results are bit-identical on every
/// ISA and thread count, and within float rounding of other implementations. f16/bf16 outputs:
/// the rounded sums are normalized, then rounded again.
///
/// `ln_scale` (required) and `ln_bias` (NULL: none) hold `n` finite floats; `ln_epsilon` is
/// finite and `>= 0` (1e-5 is ONNX's default); `residual` may be NULL. Neither may overlap `y`.
/// Errors as `dynq_gemm_residual`, plus those (`DYNQ_STATUS_INVALID_ARGUMENT`, or
/// `DYNQ_STATUS_NON_FINITE` for a NaN or infinite scale or bias value); `y` untouched on error.
///
/// # Safety
/// As `dynq_gemm_residual`; `ln_scale` points to `n` readable floats, `ln_bias` is NULL or
/// points to `n` readable floats.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_layer_norm(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    residual: *const std::ffi::c_void,
    ldr: usize,
    ln_scale: *const f32,
    ln_bias: *const f32,
    ln_epsilon: f32,
    y: *mut std::ffi::c_void,
    y_type: u32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract.
    ffi_boundary!({
        if ln_scale.is_null() {
            return Err(Error::InvalidArgument("ln_scale is NULL; a layer norm needs its n scale values".into()));
        }
        let ln = (ln_scale, ln_bias, ln_epsilon);
        unsafe { gemm_typed_raw(packed, a, a_type, m, lda, smooth, bias, (residual, ldr), ln, y, y_type, ldy, config) }
    })
}

/// `dynq_gemm_smoothed` with the product's columns sent to several outputs: `outputs[0]` gets
/// the first `outputs[0].cols` columns, `outputs[1]` the next `outputs[1].cols`, and so on;
/// the widths must add up to the weights' `n`. Each element is the bits `dynq_gemm_smoothed`
/// gives for that column. This is how layers that read one input (a transformer's Q, K and V,
/// packed as one matrix with their weights side by side) run as one call: A is quantized and
/// read once, and each layer's output is a matrix of its own, with no copy.
///
/// Errors (`y` buffers untouched): `num_outputs` 0 or `outputs` NULL; a width 0, widths not
/// adding up to `n`, `ldy < cols`; a NULL or misaligned `y` (when `m > 0`); outputs that
/// overlap each other, `a`, `bias` or `smooth`; and the errors of `dynq_gemm_smoothed`.
///
/// # Safety
/// As `dynq_gemm_smoothed`; `outputs` is NULL or points to `num_outputs` readable
/// `dynq_output`, each `y` to `(m - 1) * ldy + cols` writable values of type `y_type` (when
/// `m > 0`).
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_split(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    outputs: *const dynq_output,
    num_outputs: usize,
    y_type: u32,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract.
    ffi_boundary!({
        unsafe {
            gemm_split_raw(
                packed,
                a,
                a_type,
                m,
                lda,
                smooth,
                bias,
                (outputs, std::ptr::null()),
                num_outputs,
                y_type,
                config,
            )
        }
    })
}

/// `dynq_gemm_split` with each output in the plain layout or an attention-head layout
/// (`dynq_heads`): a transformer's Q, K and V projections written straight into the
/// `[batch, heads, seq, d]` (or, for keys, `[batch, heads, d, seq]`) tensors that attention
/// reads, without a separate transpose. `heads` NULL is `dynq_gemm_split`.
///
/// Errors (`y` buffers untouched): those of `dynq_gemm_split`; for an output with
/// `heads[g].heads > 0`: `ldy != cols`, `seq` 0 or not dividing `m`, `heads` not dividing
/// `cols`, `transposed` not 0 or 1, `reserved` not 0.
///
/// # Safety
/// As `dynq_gemm_split`; `heads` is NULL or points to `num_outputs` readable `dynq_heads`.
#[no_mangle]
pub unsafe extern "C" fn dynq_gemm_split_heads(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    outputs: *const dynq_output,
    heads: *const dynq_heads,
    num_outputs: usize,
    y_type: u32,
    config: *const dynq_gemm_config,
) -> Status {
    // SAFETY: forwarded contract.
    ffi_boundary!({
        unsafe {
            gemm_split_raw(packed, a, a_type, m, lda, smooth, bias, (outputs, heads), num_outputs, y_type, config)
        }
    })
}

/// A `dynq_dtype` argument.
fn dtype_arg(raw: u32, name: &str) -> Result<crate::dtype::DType> {
    crate::dtype::DType::from_raw(raw)
        .ok_or_else(|| Error::InvalidArgument(format!("{name}={raw} is not a dynq_dtype value")))
}

/// Evaluates `$body` with the type names `$A` and `$Y` bound to the element types of the
/// `DType`s `$at` and `$yt` (all nine pairs).
macro_rules! with_dtypes {
    ($at:expr, $yt:expr, |$A:ident, $Y:ident| $body:expr) => {{
        use crate::dtype::DType;
        match ($at, $yt) {
            (DType::F32, DType::F32) => {
                type $A = f32;
                type $Y = f32;
                $body
            }
            (DType::F32, DType::F16) => {
                type $A = f32;
                type $Y = half::f16;
                $body
            }
            (DType::F32, DType::BF16) => {
                type $A = f32;
                type $Y = half::bf16;
                $body
            }
            (DType::F16, DType::F32) => {
                type $A = half::f16;
                type $Y = f32;
                $body
            }
            (DType::F16, DType::F16) => {
                type $A = half::f16;
                type $Y = half::f16;
                $body
            }
            (DType::F16, DType::BF16) => {
                type $A = half::f16;
                type $Y = half::bf16;
                $body
            }
            (DType::BF16, DType::F32) => {
                type $A = half::bf16;
                type $Y = f32;
                $body
            }
            (DType::BF16, DType::F16) => {
                type $A = half::bf16;
                type $Y = half::f16;
                $body
            }
            (DType::BF16, DType::BF16) => {
                type $A = half::bf16;
                type $Y = half::bf16;
                $body
            }
        }
    }};
}

/// `dynq_gemm_split` and `dynq_gemm_split_heads` after the boundary (`heads` NULL: plain
/// layouts).
///
/// # Safety
/// The contract of `dynq_gemm_split_heads`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_split_raw(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    (outputs, heads): (*const dynq_output, *const dynq_heads),
    num_outputs: usize,
    y_type: u32,
    config: *const dynq_gemm_config,
) -> Result<()> {
    check_ptr(outputs, "outputs")?;
    if num_outputs == 0 {
        return Err(Error::InvalidArgument("num_outputs is 0; at least one output is needed".into()));
    }
    if num_outputs > isize::MAX as usize / std::mem::size_of::<dynq_output>() {
        return Err(Error::SizeOverflow(format!("num_outputs = {num_outputs} overflows the address space")));
    }
    // SAFETY: `outputs` points to `num_outputs` readable records per the contract.
    let outs = unsafe { std::slice::from_raw_parts(outputs, num_outputs) }.to_vec();
    let mut layouts: Vec<Option<crate::gemm::Heads>> = vec![None; num_outputs];
    if !heads.is_null() {
        check_ptr(heads, "heads")?;
        // SAFETY: `heads` points to `num_outputs` readable records per the contract (the count
        // was checked against the address space above; dynq_heads is no larger than dynq_output).
        let hs = unsafe { std::slice::from_raw_parts(heads, num_outputs) };
        for (g, (h, o)) in hs.iter().zip(&outs).enumerate() {
            if h.heads == 0 {
                continue;
            }
            if h.transposed > 1 || h.reserved != 0 {
                return Err(Error::InvalidArgument(format!(
                    "heads[{g}]: transposed must be 0 or 1 (got {}) and reserved 0 (got {})",
                    h.transposed, h.reserved
                )));
            }
            if o.ldy != o.cols {
                return Err(Error::InvalidArgument(format!(
                    "outputs[{g}]: ldy ({}) must equal cols ({}) in a head layout",
                    o.ldy, o.cols
                )));
            }
            layouts[g] = Some(crate::gemm::Heads { heads: h.heads, seq: h.seq, transposed: h.transposed == 1 });
        }
    }
    let (at, yt) = (dtype_arg(a_type, "a_type")?, dtype_arg(y_type, "y_type")?);
    with_dtypes!(at, yt, |A, Y| {
        // SAFETY: forwarded contract with the element types the caller named.
        unsafe { split_generic::<A, Y>(packed, a as *const A, m, lda, smooth, bias, (&outs, &layouts), config) }
    })
}

/// The checks and the call of `dynq_gemm_split` for element types `A` and `Y`.
///
/// # Safety
/// The contract of `dynq_gemm_split` for these element types.
#[allow(clippy::too_many_arguments)]
unsafe fn split_generic<A: crate::dtype::Element, Y: crate::dtype::Element>(
    packed: *const dynq_packed_weights,
    a: *const A,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    (outs, layouts): (&[dynq_output], &[Option<crate::gemm::Heads>]),
    config: *const dynq_gemm_config,
) -> Result<()> {
    // SAFETY: per the contract.
    let pw = unsafe { handle(packed) }?;
    // SAFETY: config is NULL or readable per the contract.
    let opts = gemm_options(&unsafe { read_config(config, default_gemm_config(), "config") }?)?;
    let (n, k) = (pw.n(), pw.k());
    let (asz, ysz) = (std::mem::size_of::<A>(), std::mem::size_of::<Y>());
    let a_len = span(m, k, lda, asz, "a")?;
    let mut total = 0usize;
    let mut lens = Vec::with_capacity(outs.len());
    for (g, o) in outs.iter().enumerate() {
        if o.cols == 0 {
            return Err(Error::InvalidArgument(format!("outputs[{g}].cols is 0")));
        }
        total = total.saturating_add(o.cols);
        lens.push(span(m, o.cols, o.ldy, ysz, &format!("outputs[{g}]"))?);
    }
    if total != n {
        let widths: Vec<usize> = outs.iter().map(|o| o.cols).collect();
        return Err(Error::InvalidArgument(format!("output widths {widths:?} must add up to n = {n}")));
    }
    if !smooth.is_null() {
        check_ptr(smooth, "smooth")?;
    }
    if !bias.is_null() {
        check_ptr(bias, "bias")?;
    }
    if m > 0 {
        check_ptr(a, "a")?;
        for (g, (o, &len)) in outs.iter().zip(&lens).enumerate() {
            let name = format!("outputs[{g}].y");
            check_ptr(o.y as *const Y, &name)?;
            let r = (o.y as usize, len * ysz);
            for (what, other) in [
                ("a", (a as usize, a_len * asz)),
                ("bias", (bias as usize, n * 4)),
                ("smooth", (smooth as usize, k * 4)),
            ] {
                if other.0 != 0 && overlaps(r, other) {
                    return Err(Error::InvalidArgument(format!(
                        "{name} overlaps {what}; outputs must be separate buffers"
                    )));
                }
            }
            for (h, (o2, &len2)) in outs.iter().zip(&lens).enumerate().take(g) {
                if overlaps(r, (o2.y as usize, len2 * ysz)) {
                    return Err(Error::InvalidArgument(format!(
                        "{name} overlaps outputs[{h}].y; outputs must be separate buffers"
                    )));
                }
            }
        }
    }
    // SAFETY: the caller provides buffers of these sizes (computed without overflow); the outputs
    // overlap neither each other nor the inputs (checked above).
    let (a, bias, smooth) = unsafe {
        (
            if m > 0 { std::slice::from_raw_parts(a, a_len) } else { &[][..] },
            (!bias.is_null()).then(|| std::slice::from_raw_parts(bias, n)),
            (!smooth.is_null()).then(|| std::slice::from_raw_parts(smooth, k)),
        )
    };
    let mut split: Vec<crate::gemm::SplitOut<'_, Y>> = outs
        .iter()
        .zip(&lens)
        .zip(layouts)
        .map(|((o, &len), &heads)| crate::gemm::SplitOut {
            // SAFETY: as above (an empty slice when m = 0, where y may be NULL).
            y: if m > 0 { unsafe { std::slice::from_raw_parts_mut(o.y as *mut Y, len) } } else { &mut [][..] },
            ldy: o.ldy,
            cols: o.cols,
            heads,
        })
        .collect();
    crate::gemm::gemm_split(pw, a, m, lda, smooth, bias, &mut split, &opts)
}

/// `dynq_gemm_residual` after the boundary: element types resolved, then `gemm_generic`.
///
/// # Safety
/// The contract of `dynq_gemm_residual` (a null residual pointer: none).
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_typed_raw(
    packed: *const dynq_packed_weights,
    a: *const std::ffi::c_void,
    a_type: u32,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    residual: (*const std::ffi::c_void, usize),
    ln: LnArgs,
    y: *mut std::ffi::c_void,
    y_type: u32,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Result<()> {
    let (at, yt) = (dtype_arg(a_type, "a_type")?, dtype_arg(y_type, "y_type")?);
    with_dtypes!(at, yt, |A, Y| {
        // SAFETY: forwarded contract with the element types the caller named.
        unsafe {
            gemm_generic::<A, Y>(
                packed,
                a as *const A,
                m,
                lda,
                smooth,
                bias,
                (residual.0 as *const Y, residual.1),
                ln,
                y as *mut Y,
                ldy,
                config,
            )
        }
    })
}

/// A layer norm's scale, bias and epsilon (scale NULL: none).
type LnArgs = (*const f32, *const f32, f32);
const NO_LN: LnArgs = (std::ptr::null(), std::ptr::null(), 0.0);

/// The checks and the call shared by `dynq_gemm`, `dynq_gemm_ex`, `dynq_gemm_smoothed`,
/// `dynq_gemm_residual` and `dynq_gemm_layer_norm`.
///
/// # Safety
/// The contract of `dynq_gemm_residual` for element types `A` and `Y`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_generic<A: crate::dtype::Element, Y: crate::dtype::Element>(
    packed: *const dynq_packed_weights,
    a: *const A,
    m: usize,
    lda: usize,
    smooth: *const f32,
    bias: *const f32,
    (residual, ldr): (*const Y, usize),
    (ln_scale, ln_bias, ln_epsilon): LnArgs,
    y: *mut Y,
    ldy: usize,
    config: *const dynq_gemm_config,
) -> Result<()> {
    // SAFETY: per the contract.
    let pw = unsafe { handle(packed) }?;
    // SAFETY: config is NULL or readable per the contract.
    let opts = gemm_options(&unsafe { read_config(config, default_gemm_config(), "config") }?)?;
    let (n, k) = (pw.n(), pw.k());
    let (asz, ysz) = (std::mem::size_of::<A>(), std::mem::size_of::<Y>());
    let a_len = span(m, k, lda, asz, "a")?;
    let y_len = span(m, n, ldy, ysz, "y")?;
    let r_len = if residual.is_null() { 0 } else { span(m, n, ldr, ysz, "residual")? };
    // The layer norm (ln_scale NULL: none), its pointers checked.
    let layer_norm = |n: usize| -> Result<Option<crate::gemm::LayerNorm<'_>>> {
        if ln_scale.is_null() {
            return Ok(None);
        }
        check_ptr(ln_scale, "ln_scale")?;
        if !ln_bias.is_null() {
            check_ptr(ln_bias, "ln_bias")?;
        }
        // SAFETY: the caller provides n readable floats at non-null ln_scale and ln_bias.
        Ok(Some(crate::gemm::LayerNorm {
            gamma: unsafe { std::slice::from_raw_parts(ln_scale, n) },
            beta: (!ln_bias.is_null()).then(|| unsafe { std::slice::from_raw_parts(ln_bias, n) }),
            epsilon: ln_epsilon,
        }))
    };
    if m == 0 {
        // An empty batch still has its factors checked.
        if !smooth.is_null() {
            check_ptr(smooth, "smooth")?;
        }
        // SAFETY: non-null smooth points to k readable floats per the contract.
        let smooth = (!smooth.is_null()).then(|| unsafe { std::slice::from_raw_parts(smooth, k) });
        // (And the layer norm's parameters, which the core checks before anything else too.)
        let fused = crate::gemm::Fused { smooth, layer_norm: layer_norm(n)?, ..Default::default() };
        return crate::gemm::gemm_fused::<A, Y>(pw, &[], 0, lda, &fused, &mut [], ldy, &opts);
    }
    check_ptr(a, "a")?;
    check_ptr(y, "y")?;
    if !bias.is_null() {
        check_ptr(bias, "bias")?;
    }
    let y_range = (y as usize, y_len * ysz);
    if overlaps(y_range, (a as usize, a_len * asz)) {
        return Err(Error::InvalidArgument("y overlaps a; the output must be a separate buffer".into()));
    }
    if !bias.is_null() && overlaps(y_range, (bias as usize, n * 4)) {
        return Err(Error::InvalidArgument("y overlaps bias; the output must be a separate buffer".into()));
    }
    if !smooth.is_null() {
        check_ptr(smooth, "smooth")?;
        if overlaps(y_range, (smooth as usize, k * 4)) {
            return Err(Error::InvalidArgument("y overlaps smooth; the output must be a separate buffer".into()));
        }
    }
    if !residual.is_null() {
        check_ptr(residual, "residual")?;
        if overlaps(y_range, (residual as usize, r_len * ysz)) {
            return Err(Error::InvalidArgument(
                "y overlaps residual; the output must be a separate buffer (to accumulate into y, copy it first)"
                    .into(),
            ));
        }
    }
    let layer_norm = layer_norm(n)?;
    for (p, what) in [(ln_scale, "ln_scale"), (ln_bias, "ln_bias")] {
        if !p.is_null() && overlaps(y_range, (p as usize, n * 4)) {
            return Err(Error::InvalidArgument(format!("y overlaps {what}; the output must be a separate buffer")));
        }
    }
    // SAFETY: the caller provides buffers of these sizes (computed without overflow), and y
    // does not overlap the inputs (checked above).
    let (a, y, bias, smooth, residual) = unsafe {
        (
            std::slice::from_raw_parts(a, a_len),
            std::slice::from_raw_parts_mut(y, y_len),
            (!bias.is_null()).then(|| std::slice::from_raw_parts(bias, n)),
            (!smooth.is_null()).then(|| std::slice::from_raw_parts(smooth, k)),
            (!residual.is_null())
                .then(|| crate::gemm::Residual { data: std::slice::from_raw_parts(residual, r_len), ld: ldr }),
        )
    };
    crate::gemm::gemm_fused(
        pw,
        a,
        m,
        lda,
        &crate::gemm::Fused { smooth, bias, residual, layer_norm, a_heads: None },
        y,
        ldy,
        &opts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_cargo() {
        assert_eq!(DYNQ_VERSION_MAJOR.to_string(), env!("CARGO_PKG_VERSION_MAJOR"));
        assert_eq!(DYNQ_VERSION_MINOR.to_string(), env!("CARGO_PKG_VERSION_MINOR"));
        assert_eq!(DYNQ_VERSION_PATCH.to_string(), env!("CARGO_PKG_VERSION_PATCH"));
        let v = unsafe { std::ffi::CStr::from_ptr(dynq_version()) }.to_str().unwrap();
        assert_eq!(v, crate::VERSION);
    }

    #[test]
    fn status_strings_match_core() {
        for s in Status::all() {
            let c = unsafe { std::ffi::CStr::from_ptr(dynq_status_str(s as u32)) };
            assert_eq!(c.to_str().unwrap(), s.as_str());
        }
        let c = unsafe { std::ffi::CStr::from_ptr(dynq_status_str(10)) };
        assert_eq!(c.to_str().unwrap(), "unknown status");
    }

    #[test]
    fn isa_names_match_core() {
        for isa in Isa::ALL {
            let c = unsafe { std::ffi::CStr::from_ptr(dynq_isa_name(isa.to_raw())) };
            assert_eq!(c.to_str().unwrap(), isa.name());
            assert_eq!(dynq_isa_available(isa.to_raw()) == 1, crate::isa::resolve(isa).is_ok());
        }
        assert_eq!(dynq_isa_available(99), 0);
    }
}
