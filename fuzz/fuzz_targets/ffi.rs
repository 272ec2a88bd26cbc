//! The C ABI argument space: a sequence of calls to the `extern "C"` functions with
//! fuzzer-chosen shapes, strides, configs (valid, wrong `struct_size`, out-of-range enum values,
//! misaligned), NULLs, misaligned and overlapping buffers, non-finite values, and handles
//! created, shared and freed along the way.
//!
//! Pointers are only ever passed to buffers that really have the sizes claimed, so any crash
//! or sanitizer report is a bug in dynq. The one exception is deliberate: a size that no buffer
//! can have (more than `isize::MAX` bytes) is claimed with a small buffer, because the ABI
//! promises to refuse such sizes before touching memory. Sizes a real buffer could have but
//! this harness will not allocate (over a few MB) are not tried.
//!
//! Oracle, for every call:
//! - no crash, no sanitizer report, no panic (libFuzzer aborts on any panic, even a caught
//!   one), never `DYNQ_STATUS_INTERNAL`;
//! - when the harness knows every argument is valid, the call succeeds; when it knows one is
//!   not, it fails;
//! - a failed call writes nothing (the whole arena is compared byte for byte), sets `*out` to
//!   NULL and leaves a non-empty message; a successful one leaves the last message as it was;
//! - a successful GEMM writes exactly the `m x n` elements of `y` and nothing else.

#![no_main]

use dynq::ffi::*;
use dynq::{Isa, Status};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

/// The largest buffer the harness allocates for one argument (k = 65536 floats fits).
const CAP_BYTES: usize = 300_000;
const MAX_K: usize = 65536;

/// Sizes: mostly small, some at tile and format edges, some that no buffer can have.
fn size(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=15)? {
        0..=8 => u.int_in_range(1..=24)?,
        9 => [1, 0, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65][u.choose_index(15)?],
        10 | 11 => u.int_in_range(0..=300)?,
        12 => [65535, 65536, 65537, 1 << 20][u.choose_index(4)?],
        _ => [
            usize::MAX,
            usize::MAX - 1,
            usize::MAX / 2,
            usize::MAX / 2 + 1,
            usize::MAX / 4,
            usize::MAX / 4 + 1,
            usize::MAX / 8,
            usize::MAX / 16,
            usize::MAX / 32,
            1 << 62,
            1 << 40,
            1 << 32,
        ][u.choose_index(12)?],
    })
}

/// An enum-like `uint32_t`: mostly one of the `count` valid values, sometimes anything.
fn enum_u32(u: &mut Unstructured, count: u32) -> Result<u32> {
    Ok(if u.ratio(7u8, 8)? { u.int_in_range(0..=count - 1)? } else { u.arbitrary::<u32>()? })
}

/// `rows x cols` at stride `ld` in elements of `elem` bytes, as the ABI defines it: `None` if
/// no buffer can be that large (more than isize::MAX bytes).
fn span(rows: usize, cols: usize, ld: usize, elem: usize) -> Option<usize> {
    if rows == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(ld)?
        .checked_add(cols)
        .filter(|v| v.checked_mul(elem).is_some_and(|b| b <= isize::MAX as usize))
}

/// One zeroed, 64-byte aligned allocation that every pointer of a call points into.
struct Arena {
    words: Vec<u64>,
    used: usize,
}

impl Arena {
    fn new(bytes: usize) -> Self {
        Arena { words: vec![0; bytes.div_ceil(8) + 16], used: 0 }
    }
    fn bytes(&mut self) -> &mut [u8] {
        let len = self.words.len() * 8;
        // SAFETY: a u64 buffer viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, len) }
    }
    fn snapshot(&mut self) -> Vec<u8> {
        self.bytes().to_vec()
    }
    fn base(&mut self) -> *mut u8 {
        self.words.as_mut_ptr() as *mut u8
    }
    /// Reserves `len` bytes at an 8-aligned offset (+ `skew` bytes); returns the offset.
    fn take(&mut self, len: usize, skew: usize) -> usize {
        let off = self.used.next_multiple_of(8) + skew;
        self.used = off + len;
        assert!(self.used <= self.words.len() * 8, "arena too small");
        off
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum PtrKind {
    Null,
    Aligned,
    Misaligned,
}

/// True once in `n` (false when the input is exhausted, so that its tail decodes to the common
/// case).
fn rare(u: &mut Unstructured, n: u8) -> Result<bool> {
    Ok(u.int_in_range(0..=n - 1)? == n - 1)
}

fn ptr_kind(u: &mut Unstructured) -> Result<PtrKind> {
    Ok(match u.int_in_range(0u8..=31)? {
        30 => PtrKind::Null,
        31 => PtrKind::Misaligned,
        _ => PtrKind::Aligned,
    })
}

struct Handle {
    p: *mut dynq_packed_weights,
    n: usize,
    k: usize,
}

struct State {
    handles: Vec<Handle>,
    usable: Vec<Isa>,
}

fn message() -> Vec<u8> {
    let mut buf = vec![0u8; 8192];
    // SAFETY: buf has buf.len() writable bytes.
    let len = unsafe { dynq_last_error_message(buf.as_mut_ptr() as *mut _, buf.len()) };
    buf.truncate(len.min(8191));
    buf
}

/// With `DYNQ_FUZZ_TRACE=1`, every call and its status go to stderr (to see what a corpus
/// reaches: `cargo fuzz run ffi corpus/ffi -- -runs=0`).
fn trace() -> bool {
    static T: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *T.get_or_init(|| std::env::var_os("DYNQ_FUZZ_TRACE").is_some())
}

/// Checks the outcome of one call against the oracle of the module documentation.
fn judge(what: &str, st: Status, valid: Option<bool>, before_msg: &[u8]) {
    if trace() {
        eprintln!("TRACE {st:?} valid={valid:?} {what}");
    }
    assert_ne!(st, Status::Internal, "{what}: INTERNAL (a caught panic): {}", String::from_utf8_lossy(&message()));
    match valid {
        Some(true) => {
            assert_eq!(st, Status::Ok, "{what}: valid call refused: {}", String::from_utf8_lossy(&message()))
        }
        Some(false) => assert_ne!(st, Status::Ok, "{what}: invalid call accepted"),
        None => {}
    }
    let msg = message();
    if st == Status::Ok {
        assert_eq!(msg, before_msg, "{what}: a successful call changed the last error message");
    } else {
        assert!(!msg.is_empty(), "{what}: failure without a message");
    }
}

/// A pack config: NULL, or a struct in the arena (maybe misaligned, maybe wrong). Returns the
/// pointer and whether it is acceptable.
fn pack_config(u: &mut Unstructured, ar: &mut Arena, s: &State) -> Result<(*const dynq_pack_config, bool)> {
    let kind = ptr_kind(u)?;
    if kind == PtrKind::Null || rare(u, 3)? {
        return Ok((null(), true));
    }
    let size = std::mem::size_of::<dynq_pack_config>() as u32;
    // The current size, the first layout's 12 bytes (which ignores weight_qmax), or anything.
    let struct_size = match u.int_in_range(0..=15u8)? {
        0 => u.arbitrary()?,
        1..=2 => 12,
        _ => size,
    };
    let granularity = enum_u32(u, 2)?;
    let isa = enum_u32(u, 8)?;
    let weight_qmax = [0u32, 0, 127, 64, 1, 63, 128, 255, u32::MAX][u.choose_index(9)?];
    let c = dynq_pack_config { struct_size, granularity, isa, weight_qmax };
    let skew = if kind == PtrKind::Misaligned { 1 } else { 0 };
    let off = ar.take(size as usize, skew);
    // SAFETY: in bounds of the arena; unaligned write.
    unsafe { (ar.base().add(off) as *mut dynq_pack_config).write_unaligned(c) };
    let isa_ok = isa == 0 || Isa::from_raw(isa).is_some_and(|i| s.usable.contains(&i));
    let qmax_ok = struct_size == 12 || weight_qmax <= 127;
    let ok = skew == 0 && (struct_size == size || struct_size == 12) && granularity < 2 && isa_ok && qmax_ok;
    // SAFETY: in bounds.
    Ok(((unsafe { ar.base().add(off) }) as *const dynq_pack_config, ok))
}

fn gemm_config(u: &mut Unstructured, ar: &mut Arena) -> Result<(*const dynq_gemm_config, bool)> {
    let kind = ptr_kind(u)?;
    if kind == PtrKind::Null || rare(u, 4)? {
        return Ok((null(), true));
    }
    let size = std::mem::size_of::<dynq_gemm_config>() as u32;
    let struct_size = if u.ratio(15u8, 16)? { size } else { u.arbitrary()? };
    let act_granularity = enum_u32(u, 2)?;
    let act_type = enum_u32(u, 2)?;
    let epilogue = enum_u32(u, 6)?;
    // 0 = default; valid up to 1024 (dynq runs at most its pool's size of workers).
    let num_threads = [0u32, 1, 2, 3, 1, 64, 1024, 1025, u32::MAX, 1 << 20][u.choose_index(10)?];
    let c = dynq_gemm_config { struct_size, act_granularity, act_type, epilogue, num_threads };
    let skew = if kind == PtrKind::Misaligned { 2 } else { 0 };
    let off = ar.take(size as usize, skew);
    // SAFETY: in bounds of the arena; unaligned write.
    unsafe { (ar.base().add(off) as *mut dynq_gemm_config).write_unaligned(c) };
    let ok = skew == 0
        && struct_size == size
        && act_granularity < 2
        && act_type < 2
        && epilogue < 6
        && num_threads as usize <= 1024;
    // SAFETY: in bounds.
    Ok(((unsafe { ar.base().add(off) }) as *const dynq_gemm_config, ok))
}

/// Fills `v` with finite values; with `allow_bad`, sometimes puts one NaN or infinity in it
/// (then returns false).
fn finite_f32(u: &mut Unstructured, v: &mut [f32], allow_bad: bool) -> Result<bool> {
    let mut seed = u.arbitrary::<u32>()? | 1;
    for x in v.iter_mut() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        *x = (seed >> 8) as f32 / (1 << 23) as f32 - 1.0;
    }
    if allow_bad && !v.is_empty() && rare(u, 10)? {
        let i = u.choose_index(v.len())?;
        v[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][u.choose_index(3)?];
        return Ok(false);
    }
    Ok(true)
}

/// Writes `len` activations of element type `at` at `off`: finite values, maybe one NaN.
/// Returns false when that NaN is in a row's first `k` values (read by the GEMM; one in the
/// stride gap is never read).
fn fill_activations(
    u: &mut Unstructured,
    ar: &mut Arena,
    off: usize,
    len: usize,
    at: u32,
    lda: usize,
    k: usize,
) -> Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let mut v = vec![0f32; len];
    finite_f32(u, &mut v, false)?;
    let mut ok = true;
    if let Some(i) = rare(u, 12)?.then(|| u.choose_index(len)).transpose()? {
        v[i] = f32::NAN;
        ok = i % lda.max(1) >= k;
    }
    let (bytes, asz) = (ar.bytes(), elem_size(at));
    for (i, x) in v.iter().enumerate() {
        let o = off + i * asz;
        match at {
            1 => bytes[o..o + 2].copy_from_slice(&half::f16::from_f32(*x).to_bits().to_le_bytes()),
            2 => bytes[o..o + 2].copy_from_slice(&half::bf16::from_f32(*x).to_bits().to_le_bytes()),
            _ => bytes[o..o + 4].copy_from_slice(&x.to_le_bytes()),
        }
    }
    Ok(ok)
}

/// An out-pointer slot for a handle: NULL, or a slot preset to non-NULL garbage.
fn out_slot(u: &mut Unstructured, slot: &mut *mut dynq_packed_weights) -> Result<*mut *mut dynq_packed_weights> {
    *slot = 0x10 as *mut dynq_packed_weights;
    Ok(if rare(u, 24)? { null_mut() } else { slot as *mut _ })
}

fn after_create(
    s: &mut State,
    what: &str,
    st: Status,
    out: *mut *mut dynq_packed_weights,
    slot: *mut dynq_packed_weights,
    n: usize,
    k: usize,
) {
    if out.is_null() {
        assert_ne!(st, Status::Ok, "{what}: out NULL accepted");
        return;
    }
    if st == Status::Ok {
        assert!(!slot.is_null(), "{what}: OK without a handle");
        s.handles.push(Handle { p: slot, n, k });
    } else {
        assert!(slot.is_null(), "{what}: *out not NULL after failure");
    }
}

fn op_pack(u: &mut Unstructured, s: &mut State, quantized: bool) -> Result<()> {
    let (n, k) = (size(u)?, size(u)?);
    let layout = enum_u32(u, 2)?;
    let elem = if quantized { 1 } else { 4 };
    let claim = n.checked_mul(k).filter(|e| e.checked_mul(elem).is_some_and(|b| b <= isize::MAX as usize));
    let possible = claim.is_some();
    let count = claim.unwrap_or(16);
    if count.saturating_mul(4) > CAP_BYTES {
        return Ok(());
    }
    let num_scales = if !quantized {
        0
    } else {
        match u.int_in_range(0u8..=7)? {
            0 => 1,
            1 => size(u)?,
            _ => n,
        }
    };
    let scale_count = if num_scales == n && !possible { 1 } else { num_scales };
    if scale_count.saturating_mul(4) > CAP_BYTES {
        return Ok(());
    }
    let mut ar = Arena::new(count * 4 + scale_count * 4 + 256);
    let (cfg, cfg_ok) = pack_config(u, &mut ar, s)?;
    let wkind = ptr_kind(u)?;
    let skew = if wkind == PtrKind::Misaligned { 1 } else { 0 };
    let woff = ar.take(count * elem, skew);
    let mut values_ok = true;
    if quantized {
        let q = &mut ar.bytes()[woff..woff + count];
        u.fill_buffer(q)?;
    } else {
        let mut v = vec![0f32; count];
        values_ok = finite_f32(u, &mut v, true)?;
        for (i, x) in v.iter().enumerate() {
            ar.bytes()[woff + 4 * i..woff + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
    }
    let mut scales_ok = true;
    let skind = if quantized { ptr_kind(u)? } else { PtrKind::Aligned };
    let sskew = if skind == PtrKind::Misaligned { 1 } else { 0 };
    let soff = ar.take(scale_count * 4, sskew);
    if quantized {
        for i in 0..scale_count {
            let v: f32 = match u.int_in_range(0u8..=15)? {
                0 => -0.5,
                1 => f32::NAN,
                2 => f32::INFINITY,
                3 => 0.0,
                4 => -0.0,
                5 => f32::from_bits(1),
                _ => 0.01 * (i % 7 + 1) as f32,
            };
            scales_ok &= v.is_finite() && v >= 0.0;
            ar.bytes()[soff + 4 * i..soff + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    let base = ar.base();
    // SAFETY: offsets within the arena.
    let wptr = if wkind == PtrKind::Null { null() } else { unsafe { base.add(woff) } };
    let sptr = if skind == PtrKind::Null { null() } else { (unsafe { base.add(soff) }) as *const f32 };
    let mut slot = null_mut();
    let out = out_slot(u, &mut slot)?;
    // int8 weights have no alignment requirement.
    let w_ok = wkind == PtrKind::Aligned || (quantized && wkind == PtrKind::Misaligned);
    let valid = out_ok(out)
        && w_ok
        && layout < 2
        && cfg_ok
        && n >= 1
        && (1..=MAX_K).contains(&k)
        && possible
        && values_ok
        && (!quantized || (skind == PtrKind::Aligned && (num_scales == 1 || num_scales == n) && scales_ok));
    let snap = ar.snapshot();
    let before = message();
    // SAFETY: every pointer is NULL or points to a buffer of the claimed size (or the claimed
    // size exceeds isize::MAX bytes, which the ABI must refuse).
    let st = unsafe {
        if quantized {
            dynq_pack_quantized_weights(wptr as *const i8, n, k, layout, sptr, num_scales, cfg, out)
        } else {
            dynq_pack_weights(wptr as *const f32, n, k, layout, cfg, out)
        }
    };
    let what = format!("pack(quantized={quantized}, n={n}, k={k}, layout={layout}, scales={num_scales})");
    judge(&what, st, Some(valid), &before);
    assert!(snap == ar.snapshot(), "{what}: the inputs were written");
    after_create(s, &what, st, out, slot, n, k);
    Ok(())
}

fn out_ok<T>(p: *mut T) -> bool {
    !p.is_null()
}

fn pick_handle(u: &mut Unstructured, s: &mut State) -> Result<Option<usize>> {
    if s.handles.is_empty() || rare(u, 32)? {
        return Ok(None);
    }
    Ok(Some(u.choose_index(s.handles.len())?))
}

/// The packed weights of a GEMM call: `(n, k, handle)`, the handle usually a live one, rarely
/// NULL (then n = k = 4 for sizing the other arguments).
fn gemm_weights(u: &mut Unstructured, s: &mut State) -> Result<(usize, usize, *const dynq_packed_weights)> {
    ensure_handle(u, s)?;
    Ok(match pick_handle(u, s)? {
        Some(i) => (s.handles[i].n, s.handles[i].k, s.handles[i].p as *const dynq_packed_weights),
        None => (4, 4, null()),
    })
}

/// A row stride for rows of `width` values: usually `width` plus up to `max_pad`, sometimes one
/// below `width` or any size (overflowing ones included).
fn stride(u: &mut Unstructured, width: usize, max_pad: usize) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=7)? {
        7 => size(u)?,
        6 => width.saturating_sub(1),
        _ => width + u.int_in_range(0..=max_pad)?,
    })
}

/// Makes sure there is a handle to work with (a valid small pack, which must succeed).
fn ensure_handle(u: &mut Unstructured, s: &mut State) -> Result<()> {
    if !s.handles.is_empty() {
        return Ok(());
    }
    let n = u.int_in_range(1..=40)?;
    let k = u.int_in_range(1..=70)?;
    let mut w = vec![0f32; n * k];
    let mut seed = (n * 31 + k) as u32;
    for x in &mut w {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *x = (seed >> 8) as f32 / (1 << 24) as f32 - 0.5;
    }
    let mut p = null_mut();
    // SAFETY: valid arguments.
    let st = unsafe { dynq_pack_weights(w.as_ptr(), n, k, 0, null(), &mut p) };
    assert_eq!(st, Status::Ok);
    s.handles.push(Handle { p, n, k });
    Ok(())
}

fn elem_size(dtype: u32) -> usize {
    match dtype {
        1 | 2 => 2,
        _ => 4,
    }
}

/// `mode`: 0 `dynq_gemm`, 1 `dynq_gemm_ex`, 2 `dynq_gemm_residual` (with a residual that is
/// NULL, separate, misaligned, at a bad stride or overlapping y; a third of the time through
/// `dynq_gemm_layer_norm`, now and then with a bad epsilon).
fn op_gemm(u: &mut Unstructured, s: &mut State, mode: u8) -> Result<()> {
    let ex = mode >= 1;
    let (n, k, hp) = gemm_weights(u, s)?;
    let m = if u.ratio(3u8, 4)? { u.int_in_range(1..=20)? } else { size(u)? };
    let lda = stride(u, k, 3)?;
    let ldy = stride(u, n, 3)?;
    let (at, yt) = if ex { (enum_u32(u, 3)?, enum_u32(u, 3)?) } else { (0, 0) };
    let (asz, ysz) = (elem_size(at), elem_size(yt));
    let (a_span, y_span) = (span(m, k, lda, asz), span(m, n, ldy, ysz));
    let possible = a_span.is_some() && y_span.is_some();
    let (a_len, y_len) = if possible { (a_span.unwrap(), y_span.unwrap()) } else { (8, 8) };
    // The residual (mode 2): its kind, stride and extent.
    let rkind = if mode == 2 { ptr_kind(u)? } else { PtrKind::Null };
    let use_res = rkind != PtrKind::Null;
    let ldr = if !use_res {
        n
    } else {
        stride(u, n, 3)?
    };
    let r_span = if use_res { span(m, n, ldr, ysz) } else { Some(0) };
    let r_len = r_span.unwrap_or(8).min(CAP_BYTES);
    let r_in_y = use_res && rare(u, 6)?;
    if (a_len * asz).saturating_add(y_len * ysz).saturating_add(r_len * ysz) > CAP_BYTES {
        return Ok(());
    }
    let mut ar = Arena::new(a_len * asz + y_len * ysz + r_len * ysz + n * 4 + 1024);
    let (cfg, cfg_ok) = gemm_config(u, &mut ar)?;

    // Placement: separate buffers, or y overlapping a, or the bias inside y.
    let layout = u.int_in_range(0u8..=15)?;
    let (akind, ykind, bkind) = (ptr_kind(u)?, ptr_kind(u)?, ptr_kind(u)?);
    let use_bias = u.arbitrary::<bool>()?;
    let skew = |k: PtrKind| if k == PtrKind::Misaligned { 1 } else { 0 };
    let aoff = ar.take(a_len * asz, skew(akind));
    let (yoff, boff);
    match layout {
        14 if a_len > 0 && y_len > 0 => {
            // y starts inside a's span.
            yoff = aoff + u.choose_index(a_len)? * asz;
            ar.used = ar.used.max(yoff + y_len * ysz);
            boff = ar.take(n * 4, skew(bkind));
        }
        15 if y_len > 0 => {
            yoff = ar.take(y_len * ysz, skew(ykind));
            // the bias starts inside y's span (if it fits in the arena).
            boff = (yoff + u.choose_index(y_len)? * ysz) & !3;
            ar.used = ar.used.max(boff + n * 4);
        }
        _ => {
            yoff = ar.take(y_len * ysz, skew(ykind));
            boff = ar.take(n * 4, skew(bkind));
        }
    }
    if ar.used > ar.words.len() * 8 {
        return Ok(());
    }
    let yoff = if ykind == PtrKind::Misaligned && yoff % 2 == 0 { yoff + 1 } else { yoff };
    if yoff + y_len * ysz > ar.words.len() * 8 {
        return Ok(());
    }
    let boff = if bkind == PtrKind::Misaligned && boff % 4 == 0 { boff + 1 } else { boff };
    if boff + n * 4 > ar.words.len() * 8 {
        return Ok(());
    }
    // The residual: its own buffer, or starting inside y.
    let roff = if r_in_y && y_len > 0 {
        let o = yoff + u.choose_index(y_len)? * ysz;
        ar.used = ar.used.max(o + r_len * ysz);
        o
    } else {
        ar.take(r_len * ysz, skew(rkind))
    };
    let roff = if rkind == PtrKind::Misaligned && roff % 2 == 0 { roff + 1 } else { roff };
    if roff + r_len * ysz > ar.words.len() * 8 {
        return Ok(());
    }

    let a_ok = if possible { fill_activations(u, &mut ar, aoff, a_len, at, lda, k)? } else { true };
    let mut bias_ok = true;
    if use_bias && layout != 15 {
        let mut v = vec![0f32; n];
        bias_ok = finite_f32(u, &mut v, true)?;
        let bytes = ar.bytes();
        for (i, x) in v.iter().enumerate() {
            bytes[boff + 4 * i..boff + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
    }
    // Pre-fill y with a recognisable pattern (may overwrite parts of a or bias if they overlap,
    // which only matters for calls that must fail anyway).
    if layout < 14 {
        let bytes = ar.bytes();
        bytes[yoff..yoff + y_len * ysz].fill(0xA5);
    }

    let base = ar.base();
    // SAFETY: offsets within the arena.
    let (ap, yp, bp) = unsafe { (base.add(aoff), base.add(yoff), base.add(boff)) };
    // SAFETY: an offset within the arena.
    let rp = if use_res { (unsafe { base.add(roff) }) as *const c_void } else { null() };
    let ap = if akind == PtrKind::Null { null() } else { ap as *const c_void };
    let yp = if ykind == PtrKind::Null { null_mut() } else { yp as *mut c_void };
    let bp = if use_bias { bp as *const f32 } else { null() };

    let overlap = |a: (usize, usize), b: (usize, usize)| a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    let yr = (yoff, y_len * ysz);
    let a_aligned = (aoff % asz == 0 || at > 2) && akind != PtrKind::Null;
    let y_aligned = yoff % ysz == 0 && ykind != PtrKind::Null;
    let b_aligned = boff % 4 == 0;
    let shapes_ok = lda >= k && ldy >= n;
    let valid = !hp.is_null()
        && cfg_ok
        && at < 3
        && yt < 3
        && shapes_ok
        && (m == 0
            || (possible
                && a_aligned
                && y_aligned
                && a_ok
                && !overlap(yr, (aoff, a_len * asz))
                && (!use_bias || (b_aligned && bias_ok && !overlap(yr, (boff, n * 4))))));
    // A misaligned `a` of an invalid dtype is not checked for alignment before the dtype.
    let valid = if at > 2 { false } else { valid };
    // The residual: its stride and extent are checked even for m = 0; its pointer for m > 0.
    let r_ok = !use_res
        || (ldr >= n
            && r_span.is_some()
            && (m == 0 || (roff % ysz == 0 && !overlap(yr, (roff, r_span.unwrap_or(0) * ysz)))));
    let valid = valid && r_ok;
    // The layer norm (mode 2, a third of the time): a scale of ones, a bad epsilon now and then.
    let use_ln = mode == 2 && u.ratio(1u8, 3)?;
    let eps = if use_ln && rare(u, 6)? { -1.0f32 } else { 1e-5 };
    let ln_scale = vec![1.0f32; if use_ln { n } else { 0 }];
    let valid = valid && eps >= 0.0;

    let snap = ar.snapshot();
    let before = message();
    // SAFETY: every non-NULL pointer points into the arena with at least the claimed extent
    // (or the claimed extent exceeds isize::MAX bytes, which the ABI must refuse).
    let st = unsafe {
        if use_ln {
            dynq_gemm_layer_norm(hp, ap, at, m, lda, null(), bp, rp, ldr, ln_scale.as_ptr(), null(), eps, yp, yt, ldy, cfg)
        } else if mode == 2 {
            dynq_gemm_residual(hp, ap, at, m, lda, null(), bp, rp, ldr, yp, yt, ldy, cfg)
        } else if ex {
            dynq_gemm_ex(hp, ap, at, m, lda, bp, yp, yt, ldy, cfg)
        } else {
            dynq_gemm(hp, ap as *const f32, m, lda, bp, yp as *mut f32, ldy, cfg)
        }
    };
    let what = format!(
        "gemm(mode={mode}, m={m}, n={n}, k={k}, lda={lda}, ldy={ldy}, a_type={at}, y_type={yt}, layout={layout}, \
         a={akind:?}, y={ykind:?}, bias={use_bias}/{bkind:?}, residual={rkind:?}/ldr={ldr}/in_y={r_in_y}, layer_norm={use_ln}/eps={eps}, handle={})",
        !hp.is_null()
    );
    judge(&what, st, Some(valid), &before);
    let after = ar.snapshot();
    if st != Status::Ok {
        assert!(snap == after, "{what}: failed call wrote memory");
    } else {
        for (i, (x, y)) in snap.iter().zip(&after).enumerate() {
            if x != y {
                let rel = i.checked_sub(yoff).expect("write before y");
                let (row, col) = (rel / ysz / ldy.max(1), rel / ysz % ldy.max(1));
                assert!(row < m && col < n, "{what}: wrote byte {i} outside y's m x n elements");
            }
        }
    }
    Ok(())
}

/// `dynq_gemm_split` (and a third of the time `dynq_gemm_split_heads`): 0-4 outputs whose
/// widths partition n (sometimes spoiled: n + 1, a zero width), strides at, above or below the
/// widths or overflowing, NULL or misaligned outputs, an output starting inside the previous
/// one, a NULL or misaligned table of outputs, and head layouts valid or not.
fn op_gemm_split(u: &mut Unstructured, s: &mut State) -> Result<()> {
    let (n, k, hp) = gemm_weights(u, s)?;
    let m = if u.ratio(3u8, 4)? { u.int_in_range(1..=12)? } else { size(u)? };
    let lda = stride(u, k, 2)?;
    let (at, yt) = (enum_u32(u, 3)?, enum_u32(u, 3)?);
    let (asz, ysz) = (elem_size(at), elem_size(yt));
    let parts = u.int_in_range(0usize..=4)?;
    let mut widths = Vec::with_capacity(parts);
    let mut left = n;
    for g in 0..parts {
        let w = if g + 1 == parts { left } else { u.int_in_range(0..=left)? };
        widths.push(w);
        left -= w;
    }
    if parts > 0 {
        match u.int_in_range(0u8..=15)? {
            15 => widths[0] += 1,
            14 => {
                let g = u.choose_index(parts)?;
                widths[g] = 0;
            }
            _ => {}
        }
    }
    let mut ldys = Vec::with_capacity(parts);
    for &w in &widths {
        ldys.push(match u.int_in_range(0u8..=11)? {
            11 => size(u)?,
            10 => w.saturating_sub(1),
            _ => w + u.int_in_range(0..=2)?,
        });
    }
    let a_span = span(m, k, lda, asz);
    let y_spans: Vec<Option<usize>> = widths.iter().zip(&ldys).map(|(&w, &ld)| span(m, w, ld, ysz)).collect();
    let possible = a_span.is_some() && y_spans.iter().all(|v| v.is_some());
    let a_len = if possible { a_span.unwrap() } else { 8 };
    let y_lens: Vec<usize> = y_spans.iter().map(|v| if possible { v.unwrap() } else { 8 }).collect();
    let total = y_lens.iter().fold(a_len.saturating_mul(asz), |t, &l| t.saturating_add(l.saturating_mul(ysz)));
    if total > CAP_BYTES {
        return Ok(());
    }
    let table_bytes = (parts + 1) * std::mem::size_of::<dynq_output>();
    let mut ar = Arena::new(total + n * 4 + table_bytes + 1024);
    let (cfg, cfg_ok) = gemm_config(u, &mut ar)?;
    let skew = |k: PtrKind| if k == PtrKind::Misaligned { 1 } else { 0 };
    let akind = ptr_kind(u)?;
    let aoff = ar.take(a_len * asz, skew(akind));
    let mut kinds = Vec::with_capacity(parts);
    let mut yoffs: Vec<usize> = Vec::with_capacity(parts);
    for g in 0..parts {
        let kind = ptr_kind(u)?;
        let off = if g > 0 && y_lens[g - 1] > 0 && rare(u, 8)? {
            // Starts inside the previous output.
            let o = yoffs[g - 1] + u.choose_index(y_lens[g - 1])? * ysz;
            ar.used = ar.used.max(o + y_lens[g] * ysz);
            o
        } else {
            ar.take(y_lens[g] * ysz, skew(kind))
        };
        let off = if kind == PtrKind::Misaligned && off % 2 == 0 { off + 1 } else { off };
        kinds.push(kind);
        yoffs.push(off);
    }
    let use_bias = u.arbitrary::<bool>()?;
    let bkind = ptr_kind(u)?;
    let boff = ar.take(n * 4, skew(bkind));
    let boff = if bkind == PtrKind::Misaligned && boff % 4 == 0 { boff + 1 } else { boff };
    let tkind = ptr_kind(u)?;
    let toff = ar.take(table_bytes, if tkind == PtrKind::Misaligned { 4 } else { 0 });
    if ar.used > ar.words.len() * 8
        || boff + n * 4 > ar.words.len() * 8
        || yoffs.iter().zip(&y_lens).any(|(&o, &l)| o + l * ysz > ar.words.len() * 8)
    {
        return Ok(());
    }

    let a_ok = if possible { fill_activations(u, &mut ar, aoff, a_len, at, lda, k)? } else { true };
    let mut bias_ok = true;
    if use_bias {
        let mut v = vec![0f32; n];
        bias_ok = finite_f32(u, &mut v, true)?;
        let bytes = ar.bytes();
        for (i, x) in v.iter().enumerate() {
            bytes[boff + 4 * i..boff + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
    }
    for (&o, &l) in yoffs.iter().zip(&y_lens) {
        ar.bytes()[o..o + l * ysz].fill(0xA5);
    }
    let base = ar.base();
    for g in 0..parts {
        let yp = if kinds[g] == PtrKind::Null {
            null_mut()
        } else {
            // SAFETY: an offset within the arena.
            unsafe { base.add(yoffs[g]) as *mut c_void }
        };
        let rec = dynq_output { y: yp, ldy: ldys[g], cols: widths[g] };
        // SAFETY: the table's slot g is inside the arena; unaligned write.
        unsafe { (base.add(toff + g * std::mem::size_of::<dynq_output>()) as *mut dynq_output).write_unaligned(rec) };
    }
    // SAFETY: offsets within the arena.
    let (ap, bp, tp) = unsafe { (base.add(aoff), base.add(boff), base.add(toff)) };
    let ap = if akind == PtrKind::Null { null() } else { ap as *const c_void };
    let bp = if use_bias { bp as *const f32 } else { null() };
    let tp = if tkind == PtrKind::Null { null() } else { tp as *const dynq_output };

    let overlap = |a: (usize, usize), b: (usize, usize)| a.1 > 0 && b.1 > 0 && a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
    let yr: Vec<(usize, usize)> = yoffs.iter().zip(&y_lens).map(|(&o, &l)| (o, l * ysz)).collect();
    let b_aligned = boff % 4 == 0;
    let table_ok = tkind == PtrKind::Aligned;
    let widths_ok = parts > 0 && widths.iter().all(|&w| w > 0) && widths.iter().sum::<usize>() == n;
    let strides_ok = widths.iter().zip(&ldys).all(|(&w, &ld)| ld >= w) && y_spans.iter().all(|v| v.is_some());
    let a_shape_ok = lda >= k && a_span.is_some();
    let bias_valid = !use_bias || (b_aligned && bias_ok);
    let outs_ok = (0..parts).all(|g| {
        kinds[g] != PtrKind::Null
            && yoffs[g] % ysz == 0
            && !overlap(yr[g], (aoff, a_len * asz))
            && (!use_bias || !overlap(yr[g], (boff, n * 4)))
            && (0..g).all(|h| !overlap(yr[g], yr[h]))
    });
    let a_aligned = aoff % asz == 0 && akind != PtrKind::Null;
    let valid = !hp.is_null()
        && cfg_ok
        && at < 3
        && yt < 3
        && table_ok
        && widths_ok
        && strides_ok
        && a_shape_ok
        && bias_valid
        && (m == 0 || (possible && a_aligned && a_ok && outs_ok));

    // A third of the calls go through dynq_gemm_split_heads with a table of layouts: plain for
    // about half the outputs, else heads (0-6) of sequences (0, m + 1 or a divisor candidate),
    // transposed 0/1 (rarely 2) and reserved 0 (rarely 1).
    let with_heads = parts > 0 && u.ratio(1u8, 3)?;
    let mut heads_tab: Vec<dynq_heads> = Vec::new();
    let mut heads_ok = true;
    if with_heads {
        for g in 0..parts {
            let heads = if u.arbitrary::<bool>()? { 0 } else { u.int_in_range(0usize..=6)? };
            let seq = match u.int_in_range(0u8..=7)? {
                0 => 0,
                1 => m.saturating_add(1),
                _ => u.int_in_range(1..=m.clamp(1, 64))?,
            };
            let transposed = if rare(u, 16)? { 2 } else { u.int_in_range(0u32..=1)? };
            let reserved = u32::from(rare(u, 16)?);
            if heads > 0 {
                heads_ok &= transposed <= 1
                    && reserved == 0
                    && ldys[g] == widths[g]
                    && seq > 0
                    && m % seq == 0
                    && widths[g] % heads == 0;
            }
            heads_tab.push(dynq_heads { heads, seq, transposed, reserved });
        }
    }
    let valid = valid && heads_ok;

    let snap = ar.snapshot();
    let before = message();
    // SAFETY: every non-NULL pointer points into the arena with at least the claimed extent (or
    // an extent over isize::MAX bytes, which the ABI must refuse); the heads table has `parts`
    // records.
    let st = unsafe {
        if with_heads {
            dynq_gemm_split_heads(hp, ap, at, m, lda, null(), bp, tp, heads_tab.as_ptr(), parts, yt, cfg)
        } else {
            dynq_gemm_split(hp, ap, at, m, lda, null(), bp, tp, parts, yt, cfg)
        }
    };
    let layouts: Vec<(usize, usize, u32, u32)> =
        heads_tab.iter().map(|h| (h.heads, h.seq, h.transposed, h.reserved)).collect();
    let what = format!(
        "gemm_split(m={m}, n={n}, k={k}, lda={lda}, a_type={at}, y_type={yt}, widths={widths:?}, ldys={ldys:?}, \
         outputs={kinds:?}, table={tkind:?}, a={akind:?}, bias={use_bias}/{bkind:?}, handle={}, heads={layouts:?})",
        !hp.is_null()
    );
    judge(&what, st, Some(valid), &before);
    let after = ar.snapshot();
    if st != Status::Ok {
        assert!(snap == after, "{what}: failed call wrote memory");
    } else {
        for (i, (x, y)) in snap.iter().zip(&after).enumerate() {
            if x != y {
                let inside = (0..parts).any(|g| {
                    i >= yoffs[g] && i < yoffs[g] + y_lens[g] * ysz && {
                        let rel = (i - yoffs[g]) / ysz;
                        rel / ldys[g].max(1) < m && rel % ldys[g].max(1) < widths[g]
                    }
                });
                assert!(inside, "{what}: wrote byte {i} outside the outputs' m x width elements");
            }
        }
    }
    Ok(())
}

fn op_info(u: &mut Unstructured, s: &mut State) -> Result<()> {
    ensure_handle(u, s)?;
    let h = pick_handle(u, s)?;
    let hp = h.map_or(null(), |i| s.handles[i].p as *const dynq_packed_weights);
    let size = std::mem::size_of::<dynq_packed_weights_info>();
    let mut ar = Arena::new(size + 64);
    let kind = ptr_kind(u)?;
    let skew = if kind == PtrKind::Misaligned { 4 } else { 0 };
    let off = ar.take(size, skew);
    let struct_size = if u.ratio(7u8, 8)? { size as u32 } else { u.arbitrary()? };
    ar.bytes()[off..off + 4].copy_from_slice(&struct_size.to_ne_bytes());
    // SAFETY: in bounds.
    let ip = if kind == PtrKind::Null {
        null_mut()
    } else {
        (unsafe { ar.base().add(off) }) as *mut dynq_packed_weights_info
    };
    let valid = !hp.is_null() && kind == PtrKind::Aligned && struct_size as usize == size;
    let snap = ar.snapshot();
    let before = message();
    // SAFETY: the info pointer is NULL or points to sizeof(dynq_packed_weights_info) bytes.
    let st = unsafe { dynq_packed_weights_get_info(hp, ip) };
    judge("get_info", st, Some(valid), &before);
    if st == Status::Ok {
        // SAFETY: written by the call.
        let info = unsafe { ip.read() };
        let h = &s.handles[h.unwrap()];
        assert_eq!((info.n, info.k), (h.n, h.k));
        assert!(!info.kernel_name.is_null());
        // SAFETY: a static NUL-terminated string.
        let name = unsafe { CStr::from_ptr(info.kernel_name) }.to_str().unwrap();
        assert!(name.starts_with("gemm_u8s8_i32_"), "{name}");
        let scales = if info.granularity == 1 { 1 } else { h.n };
        assert_eq!(info.serialized_bytes, 48 + 4 * scales + h.n * h.k + 4);
    } else {
        assert!(snap == ar.snapshot(), "get_info: failed call wrote memory");
    }
    Ok(())
}

/// Serializes a live handle through the ABI (trusted here; checked by op_serialize).
fn blob_of(p: *const dynq_packed_weights) -> Vec<u8> {
    let mut need = 0usize;
    // SAFETY: live handle, valid out-pointer.
    assert_eq!(unsafe { dynq_packed_weights_serialize(p, null_mut(), 0, &mut need) }, Status::Ok);
    let mut v = vec![0u8; need];
    let mut written = 0usize;
    // SAFETY: v has need bytes.
    assert_eq!(unsafe { dynq_packed_weights_serialize(p, v.as_mut_ptr(), need, &mut written) }, Status::Ok);
    assert_eq!(written, need);
    v
}

fn op_serialize(u: &mut Unstructured, s: &mut State) -> Result<()> {
    ensure_handle(u, s)?;
    let h = pick_handle(u, s)?;
    let hp = h.map_or(null(), |i| s.handles[i].p as *const dynq_packed_weights);
    let need = if hp.is_null() { 64 } else { blob_of(hp).len() };
    let buf_len = match u.int_in_range(0u8..=5)? {
        0 => 0,
        1 => need - 1,
        2 => u.int_in_range(0..=need)?,
        3 => need + u.int_in_range(1..=9)?,
        _ => need,
    };
    let mut ar = Arena::new(buf_len + 64);
    let bkind = ptr_kind(u)?;
    let boff = ar.take(buf_len, 0);
    let wkind = ptr_kind(u)?;
    let woff = ar.take(8, if wkind == PtrKind::Misaligned { 3 } else { 0 });
    let base = ar.base();
    // SAFETY: in bounds.
    let (bp, wp) = unsafe { (base.add(boff), base.add(woff) as *mut usize) };
    let bp = if bkind == PtrKind::Null { null_mut() } else { bp };
    let wp = if wkind == PtrKind::Null { null_mut() } else { wp };
    let base_ok = !hp.is_null() && wkind == PtrKind::Aligned;
    let valid = base_ok && (bkind == PtrKind::Null || buf_len >= need);
    let snap = ar.snapshot();
    let before = message();
    // SAFETY: buf is NULL or has buf_len bytes; written is NULL or 8 bytes in the arena.
    let st = unsafe { dynq_packed_weights_serialize(hp, bp, buf_len, wp) };
    judge("serialize", st, Some(valid), &before);
    let after = ar.snapshot();
    if base_ok {
        // *written always receives the size, on success and on BUFFER_TOO_SMALL.
        // SAFETY: aligned, written by the call.
        assert_eq!(unsafe { wp.read() }, need);
        if st != Status::Ok {
            assert_eq!(st, Status::BufferTooSmall);
        }
        let changed: Vec<usize> = (0..after.len()).filter(|&i| snap[i] != after[i]).collect();
        let allowed = |i: usize| {
            (woff..woff + 8).contains(&i) || (st == Status::Ok && !bp.is_null() && (boff..boff + need).contains(&i))
        };
        assert!(changed.iter().all(|&i| allowed(i)), "serialize wrote outside *written and the blob");
        if st == Status::Ok && !bp.is_null() {
            assert_eq!(&after[boff..boff + need], &blob_of(hp)[..]);
        }
    } else {
        assert!(snap == after, "serialize: failed call wrote memory");
    }
    Ok(())
}

fn op_deserialize(u: &mut Unstructured, s: &mut State) -> Result<()> {
    // The blob: a serialized live handle, maybe damaged, or bytes from the input.
    let mut expect_corrupt = false;
    let mut untouched = false;
    if !rare(u, 8)? {
        ensure_handle(u, s)?;
    }
    let mut blob = match pick_handle(u, s)? {
        Some(i) => {
            let mut b = blob_of(s.handles[i].p);
            untouched = true;
            match u.int_in_range(0u8..=7)? {
                0 => {
                    let bit = u.choose_index(b.len() * 8)?;
                    b[bit / 8] ^= 1 << (bit % 8);
                    expect_corrupt = true;
                    untouched = false;
                }
                1 => {
                    let l = u.choose_index(b.len())?;
                    b.truncate(l);
                    expect_corrupt = true;
                    untouched = false;
                }
                2 => {
                    let extra: Vec<u8> = u.arbitrary()?;
                    if !extra.is_empty() {
                        b.extend_from_slice(&extra);
                        expect_corrupt = true;
                        untouched = false;
                    }
                }
                3 if b.len() >= 52 => {
                    // a header or scale field rewritten, with length and CRC made consistent
                    let off = [8usize, 12, 16, 24, 32, 40, 44, 48][u.choose_index(8)?];
                    let v: u32 = u.arbitrary()?;
                    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
                    let body = b.len() - 4;
                    let crc = crc32fast::hash(&b[..body]);
                    b[body..].copy_from_slice(&crc.to_le_bytes());
                    untouched = false;
                }
                _ => {}
            }
            b
        }
        None => u.arbitrary::<Vec<u8>>()?,
    };
    let huge_len = rare(u, 32)?;
    let (cfg_ar, cfg, cfg_ok);
    {
        let mut ar = Arena::new(64);
        let (c, ok) = pack_config(u, &mut ar, s)?;
        cfg_ar = ar;
        cfg = c;
        cfg_ok = ok;
    }
    let bkind = if rare(u, 32)? { PtrKind::Null } else { PtrKind::Aligned };
    if blob.is_empty() {
        blob.reserve(1);
    }
    let bp = if bkind == PtrKind::Null { null() } else { blob.as_ptr() };
    let len = if huge_len { [usize::MAX, isize::MAX as usize + 1][u.choose_index(2)?] } else { blob.len() };
    let mut slot = null_mut();
    let out = out_slot(u, &mut slot)?;
    let before = message();
    let copy = blob.clone();
    // SAFETY: buf is NULL or has `len` readable bytes (or len exceeds isize::MAX).
    let st = unsafe { dynq_packed_weights_deserialize(bp, len, cfg, out) };
    drop(cfg_ar);
    let base = !out.is_null() && !bp.is_null() && cfg_ok && !huge_len;
    let valid = if !base {
        Some(false)
    } else if untouched {
        Some(true)
    } else if expect_corrupt {
        assert!(st == Status::CorruptData, "damaged blob gave {st:?}");
        None
    } else {
        None
    };
    judge("deserialize", st, valid, &before);
    assert!(copy == blob, "deserialize wrote into its input");
    if base && st != Status::Ok {
        assert!(matches!(st, Status::CorruptData | Status::Unsupported), "a bad blob gave {st:?}");
    }
    if huge_len && st != Status::Ok && !out.is_null() && !bp.is_null() {
        // With a valid config, the size is what is wrong.
        if cfg_ok {
            assert_eq!(st, Status::SizeOverflow);
        }
    }
    let (n, k) = if blob.len() >= 40 {
        (
            u64::from_le_bytes(blob[24..32].try_into().unwrap()) as usize,
            u64::from_le_bytes(blob[32..40].try_into().unwrap()) as usize,
        )
    } else {
        (0, 0)
    };
    after_create(s, "deserialize", st, out, slot, n, k);
    Ok(())
}

fn op_misc(u: &mut Unstructured, s: &mut State) -> Result<()> {
    match u.int_in_range(0u8..=6)? {
        0 => {
            let v: u32 = if u.arbitrary()? { u.int_in_range(0..=11)? } else { u.arbitrary()? };
            // SAFETY: a static string.
            let c = unsafe { CStr::from_ptr(dynq_status_str(v)) };
            assert!(!c.to_bytes().is_empty());
            assert_eq!(Status::from_raw(v).is_none(), c.to_bytes() == b"unknown status");
        }
        1 => {
            let v: u32 = if u.arbitrary()? { u.int_in_range(0..=9)? } else { u.arbitrary()? };
            // SAFETY: a static string.
            let c = unsafe { CStr::from_ptr(dynq_isa_name(v)) };
            assert_eq!(Isa::from_raw(v).is_none() && v != 0, c.to_bytes() == b"unknown");
            let avail = dynq_isa_available(v);
            let want = v == 0 || Isa::from_raw(v).is_some_and(|i| s.usable.contains(&i));
            assert_eq!(avail, want as i32, "dynq_isa_available({v})");
        }
        2 => {
            let kind = ptr_kind(u)?;
            let mut slot = [0u32; 2];
            let p = match kind {
                PtrKind::Null => null_mut(),
                PtrKind::Aligned => slot.as_mut_ptr(),
                PtrKind::Misaligned => (slot.as_mut_ptr() as *mut u8).wrapping_add(1) as *mut u32,
            };
            let before = message();
            // SAFETY: NULL or 4+ bytes inside `slot`.
            let st = unsafe { dynq_active_isa(p) };
            judge("active_isa", st, Some(kind == PtrKind::Aligned), &before);
            if st == Status::Ok {
                assert!(Isa::from_raw(slot[0]).is_some_and(|i| s.usable.contains(&i)));
            } else {
                assert_eq!(slot, [0, 0]);
            }
        }
        3 | 4 => {
            let kind = ptr_kind(u)?;
            let mut ar = Arena::new(64);
            let off = ar.take(32, if kind == PtrKind::Misaligned { 1 } else { 0 });
            // SAFETY: in bounds.
            let p = if kind == PtrKind::Null { null_mut() } else { unsafe { ar.base().add(off) } };
            let snap = ar.snapshot();
            let before = message();
            let which = u.int_in_range(0..=2u8)?;
            // The sized pack-config init: the struct's two layouts (12 and 16 bytes) or any
            // size up to the 32 bytes taken, which must be refused.
            let size = match u.int_in_range(0..=2u8)? {
                0 => 12,
                1 => std::mem::size_of::<dynq_pack_config>(),
                _ => u.int_in_range(0..=32usize)?,
            };
            // SAFETY: NULL or 32 bytes: enough for either config struct and any size above.
            let st = unsafe {
                match which {
                    0 => dynq_pack_config_init(p as *mut dynq_pack_config),
                    1 => dynq_pack_config_init_sized(p as *mut dynq_pack_config, size),
                    _ => dynq_gemm_config_init(p as *mut dynq_gemm_config),
                }
            };
            let size_ok = which != 1 || size == 12 || size == std::mem::size_of::<dynq_pack_config>();
            judge("config_init", st, Some(kind == PtrKind::Aligned && size_ok), &before);
            if st != Status::Ok {
                assert!(snap == ar.snapshot());
            }
        }
        5 => {
            let full = message();
            let len = u.int_in_range(0..=80usize)?;
            let null_buf = rare(u, 4)?;
            let claimed = if null_buf { size(u)? } else { len };
            let mut buf = vec![0x5Au8; len + 8];
            let p = if null_buf { null_mut() } else { buf.as_mut_ptr() as *mut _ };
            // SAFETY: NULL or `len` writable bytes.
            let r = unsafe { dynq_last_error_message(p, claimed) };
            assert_eq!(r, full.len());
            if !null_buf && len > 0 {
                let nn = full.len().min(len - 1);
                assert_eq!(&buf[..nn], &full[..nn]);
                assert_eq!(buf[nn], 0);
                assert!(buf[nn + 1..].iter().all(|&b| b == 0x5A), "wrote past the NUL");
            } else {
                assert!(buf.iter().all(|&b| b == 0x5A));
            }
        }
        _ => {
            // SAFETY: static strings.
            let v = unsafe { CStr::from_ptr(dynq_version()) }.to_str().unwrap();
            assert_eq!(v, dynq::VERSION);
            assert_eq!(dynq_abi_version(), DYNQ_ABI_VERSION);
        }
    }
    Ok(())
}

fn op_free(u: &mut Unstructured, s: &mut State) -> Result<()> {
    if s.handles.is_empty() || rare(u, 8)? {
        // SAFETY: NULL is a no-op.
        unsafe { dynq_packed_weights_free(null_mut()) };
        return Ok(());
    }
    let i = u.choose_index(s.handles.len())?;
    let h = s.handles.swap_remove(i);
    // SAFETY: a live handle, freed once.
    unsafe { dynq_packed_weights_free(h.p) };
    Ok(())
}

fn run(u: &mut Unstructured, s: &mut State) -> Result<()> {
    for _ in 0..48 {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0u8..=15)? {
            0 | 1 => op_pack(u, s, false)?,
            2 | 3 => op_pack(u, s, true)?,
            4..=6 => op_gemm(u, s, 0)?,
            7 => op_gemm(u, s, 1)?,
            8 if u.arbitrary::<bool>()? => op_gemm(u, s, 2)?,
            8 => op_gemm_split(u, s)?,
            9 => op_info(u, s)?,
            10 => op_serialize(u, s)?,
            11 | 12 => op_deserialize(u, s)?,
            13 => op_free(u, s)?,
            _ => op_misc(u, s)?,
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut s = State {
        handles: Vec::new(),
        usable: Isa::ALL.iter().copied().filter(|i| dynq::isa::resolve(*i).is_ok()).collect(),
    };
    let mut u = Unstructured::new(data);
    let _ = run(&mut u, &mut s);
    for h in s.handles.drain(..) {
        // SAFETY: live handles, each freed once.
        unsafe { dynq_packed_weights_free(h.p) };
    }
});
