//! The bad inputs tried at the C ABI, each with the status and the message it gets, written
//! to docs/bad_inputs.md. Every case calls the `extern "C"` functions themselves (as a C
//! caller would, with real buffers), checks the expected status, that nothing was written on
//! failure and that `*out` is NULL, and records the message.
//!
//! The test fails when docs/bad_inputs.md differs from what it generates, so the table cannot
//! go stale; `DYNQ_BLESS=1 cargo test --test bad_inputs` rewrites it. Machine-dependent parts
//! of messages (addresses, the list of ISAs this CPU runs) are replaced by placeholders; the
//! file is compared on x86-64 only (the foreign-ISA cases differ by architecture).

use dynq::ffi::*;
use dynq::Status;
use std::ffi::{c_void, CStr};
use std::fmt::Write as _;
use std::ptr::{null, null_mut};

fn c_name(s: Status) -> &'static str {
    match s {
        Status::Ok => "OK",
        Status::NullPointer => "NULL_POINTER",
        Status::InvalidArgument => "INVALID_ARGUMENT",
        Status::SizeOverflow => "SIZE_OVERFLOW",
        Status::NonFinite => "NON_FINITE",
        Status::Unsupported => "UNSUPPORTED",
        Status::CorruptData => "CORRUPT_DATA",
        Status::BufferTooSmall => "BUFFER_TOO_SMALL",
        Status::OutOfMemory => "OUT_OF_MEMORY",
        Status::Internal => "INTERNAL",
    }
}

/// The thread's last error message, with machine-dependent parts replaced.
fn message() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf has buf.len() writable bytes.
    let len = unsafe { dynq_last_error_message(buf.as_mut_ptr() as *mut _, buf.len()) };
    buf.truncate(len);
    normalize(&String::from_utf8(buf).unwrap())
}

fn normalize(msg: &str) -> String {
    // Addresses (0x followed by 9 or more hex digits; checksums have 8).
    let mut out = String::new();
    let b = msg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"0x") {
            let digits = b[i + 2..].iter().take_while(|c| c.is_ascii_hexdigit()).count();
            if digits >= 9 {
                out.push_str("0x<address>");
                i += 2 + digits;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    // The ISAs this CPU runs.
    if let Some(start) = out.find("(usable here: ") {
        if let Some(end) = out[start..].find(')') {
            out.replace_range(start..start + end + 1, "(usable here: <the ISAs of this CPU>)");
        }
    }
    out
}

struct Table {
    rows: Vec<(String, String, Status, String)>,
    statuses: std::collections::BTreeSet<&'static str>,
}

impl Table {
    /// Records one case: the function, the bad input, the expected and actual status.
    fn case(&mut self, func: &str, input: &str, want: Status, got: Status) {
        assert_eq!(got, want, "{func}: {input}: got {got:?} ({}), expected {want:?}", message());
        let msg = message();
        assert!(!msg.is_empty(), "{func}: {input}: no message");
        assert!(!self.rows.iter().any(|r| r.0 == func && r.1 == input), "duplicate case {func}: {input}");
        self.statuses.insert(c_name(got));
        self.rows.push((func.to_string(), input.to_string(), got, msg));
    }
}

fn pack(w: &[f32], n: usize, k: usize) -> *mut dynq_packed_weights {
    let mut p = null_mut();
    // SAFETY: w has n * k floats.
    assert_eq!(unsafe { dynq_pack_weights(w.as_ptr(), n, k, 0, null(), &mut p) }, Status::Ok);
    p
}

fn fix_crc(b: &mut [u8]) {
    let body = b.len() - 4;
    let crc = crc32fast::hash(&b[..body]);
    b[body..].copy_from_slice(&crc.to_le_bytes());
}

fn gemm_cfg() -> dynq_gemm_config {
    let mut c = unsafe { std::mem::zeroed::<dynq_gemm_config>() };
    // SAFETY: a writable config.
    assert_eq!(unsafe { dynq_gemm_config_init(&mut c) }, Status::Ok);
    c.num_threads = 1;
    c
}

fn pack_cfg() -> dynq_pack_config {
    let mut c = unsafe { std::mem::zeroed::<dynq_pack_config>() };
    // SAFETY: a writable config.
    assert_eq!(unsafe { dynq_pack_config_init_sized(&mut c, std::mem::size_of::<dynq_pack_config>()) }, Status::Ok);
    c
}

#[test]
fn bad_inputs_table() {
    let mut t = Table { rows: Vec::new(), statuses: Default::default() };
    let (n, k) = (4usize, 6usize);
    let w: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 9.0).collect();
    let q: Vec<i8> = (0..64).map(|i| (i * 7 % 255) as u8 as i8).collect();
    let scales = [0.5f32, 0.25, 0.125, 1.0];
    let sentinel = 0x7fc0_dead_u32;

    // SAFETY (whole test): every pointer passed points to a buffer of at least the size
    // claimed, or the claimed size exceeds what any buffer can have (the ABI must refuse it
    // before reading); out-pointers are valid.
    unsafe {
        // ---- dynq_pack_weights ----
        let f = "dynq_pack_weights";
        let mut out = std::ptr::dangling_mut::<dynq_packed_weights>();
        let case = |t: &mut Table, input: &str, want, st, out: &mut *mut dynq_packed_weights| {
            t.case(f, input, want, st);
            assert!(out.is_null(), "{f}: {input}: *out not NULL");
            *out = std::ptr::dangling_mut::<dynq_packed_weights>();
        };
        let st = dynq_pack_weights(null(), n, k, 0, null(), &mut out);
        case(&mut t, "w = NULL", Status::NullPointer, st, &mut out);
        t.case(f, "out = NULL", Status::NullPointer, dynq_pack_weights(w.as_ptr(), n, k, 0, null(), null_mut()));
        let st = dynq_pack_weights(w.as_ptr(), 0, k, 0, null(), &mut out);
        case(&mut t, "n = 0", Status::InvalidArgument, st, &mut out);
        let st = dynq_pack_weights(w.as_ptr(), n, 0, 0, null(), &mut out);
        case(&mut t, "k = 0", Status::InvalidArgument, st, &mut out);
        let st = dynq_pack_weights(w.as_ptr(), n, k, 2, null(), &mut out);
        case(&mut t, "layout = 2 (not a dynq_weight_layout)", Status::InvalidArgument, st, &mut out);
        let mis = (w.as_ptr() as *const u8).add(1) as *const f32;
        let st = dynq_pack_weights(mis, 2, 2, 0, null(), &mut out);
        case(&mut t, "w misaligned (address + 1 byte)", Status::InvalidArgument, st, &mut out);
        let mut pc = pack_cfg();
        pc.struct_size = 0;
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->struct_size = 0 (not initialized)", Status::InvalidArgument, st, &mut out);
        let mut pc = pack_cfg();
        pc.granularity = 7;
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->granularity = 7", Status::InvalidArgument, st, &mut out);
        let mut pc = pack_cfg();
        pc.isa = 99;
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->isa = 99 (not a dynq_isa)", Status::InvalidArgument, st, &mut out);
        let mut pc = pack_cfg();
        pc.weight_qmax = 128;
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->weight_qmax = 128 (past 127)", Status::InvalidArgument, st, &mut out);
        let mut pc = pack_cfg();
        pc.struct_size = 8;
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->struct_size = 8 (no release had it)", Status::InvalidArgument, st, &mut out);
        let foreign = if cfg!(target_arch = "x86_64") { dynq::Isa::NeonI8mm } else { dynq::Isa::Avx512Vnni };
        let mut pc = pack_cfg();
        pc.isa = foreign.to_raw();
        let st = dynq_pack_weights(w.as_ptr(), n, k, 0, &pc, &mut out);
        case(&mut t, "config->isa = an ISA of another architecture", Status::Unsupported, st, &mut out);
        let big = vec![0.5f32; 65537];
        let st = dynq_pack_weights(big.as_ptr(), 1, 65537, 0, null(), &mut out);
        case(&mut t, "k = 65537 (int32 sums no longer exact)", Status::Unsupported, st, &mut out);
        let mut bad = w.clone();
        bad[k + 3] = f32::NAN; // W[1][3]
        let st = dynq_pack_weights(bad.as_ptr(), n, k, 0, null(), &mut out);
        case(&mut t, "NaN weight at [1][3] (layout NK)", Status::NonFinite, st, &mut out);
        let mut bad = w.clone();
        bad[2 * n + 1] = f32::NEG_INFINITY;
        let st = dynq_pack_weights(bad.as_ptr(), n, k, 1, null(), &mut out);
        case(&mut t, "-Inf weight at W^T[2][1] (layout KN)", Status::NonFinite, st, &mut out);
        let st = dynq_pack_weights(w.as_ptr(), usize::MAX / 2, 8, 0, null(), &mut out);
        case(&mut t, "n = SIZE_MAX/2, k = 8 (n * k overflows)", Status::SizeOverflow, st, &mut out);
        let st = dynq_pack_weights(w.as_ptr(), usize::MAX / 16, 4, 0, null(), &mut out);
        case(&mut t, "n = SIZE_MAX/16, k = 4 (n * k * 4 bytes > PTRDIFF_MAX)", Status::SizeOverflow, st, &mut out);
        #[cfg(target_pointer_width = "64")]
        {
            // n is a multiple of every kernel's NR (8, 16, 48), so the message is the same on
            // every CPU.
            let st = dynq_pack_weights(w.as_ptr(), 3 << 25, 65536, 0, null(), &mut out);
            case(&mut t, "n = 3 * 2^25, k = 65536 (24 TiB of floats, tiny w)", Status::OutOfMemory, st, &mut out);
        }

        // ---- dynq_pack_quantized_weights ----
        let f = "dynq_pack_quantized_weights";
        let case = |t: &mut Table, input: &str, want, st, out: &mut *mut dynq_packed_weights| {
            t.case(f, input, want, st);
            assert!(out.is_null(), "{f}: {input}: *out not NULL");
            *out = std::ptr::dangling_mut::<dynq_packed_weights>();
        };
        let st = dynq_pack_quantized_weights(null(), n, k, 0, scales.as_ptr(), n, null(), &mut out);
        case(&mut t, "q = NULL", Status::NullPointer, st, &mut out);
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, null(), n, null(), &mut out);
        case(&mut t, "scales = NULL", Status::NullPointer, st, &mut out);
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, scales.as_ptr(), 2, null(), &mut out);
        case(&mut t, "num_scales = 2 with n = 4", Status::InvalidArgument, st, &mut out);
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, scales.as_ptr(), 0, null(), &mut out);
        case(&mut t, "num_scales = 0", Status::InvalidArgument, st, &mut out);
        let neg = [0.5f32, -0.25, 0.125, 1.0];
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, neg.as_ptr(), n, null(), &mut out);
        case(&mut t, "scales[1] = -0.25", Status::InvalidArgument, st, &mut out);
        let nan = [0.5f32, 0.25, f32::NAN, 1.0];
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, nan.as_ptr(), n, null(), &mut out);
        case(&mut t, "scales[2] = NaN", Status::NonFinite, st, &mut out);
        let inf = [f32::INFINITY];
        let st = dynq_pack_quantized_weights(q.as_ptr(), n, k, 0, inf.as_ptr(), 1, null(), &mut out);
        case(&mut t, "the one per-tensor scale = +Inf", Status::NonFinite, st, &mut out);
        let mis = (scales.as_ptr() as *const u8).add(2) as *const f32;
        let st = dynq_pack_quantized_weights(q.as_ptr(), 1, k, 0, mis, 1, null(), &mut out);
        case(&mut t, "scales misaligned (address + 2 bytes)", Status::InvalidArgument, st, &mut out);

        // ---- dynq_packed_weights_get_info ----
        let p = pack(&w, n, k);
        let f = "dynq_packed_weights_get_info";
        let mut info = std::mem::zeroed::<dynq_packed_weights_info>();
        info.struct_size = std::mem::size_of::<dynq_packed_weights_info>() as u32;
        t.case(f, "packed = NULL", Status::NullPointer, dynq_packed_weights_get_info(null(), &mut info));
        t.case(f, "info = NULL", Status::NullPointer, dynq_packed_weights_get_info(p, null_mut()));
        info.struct_size -= 8;
        t.case(
            f,
            "info->struct_size = sizeof - 8 (older struct)",
            Status::InvalidArgument,
            dynq_packed_weights_get_info(p, &mut info),
        );
        assert_eq!(info.n, 0, "info written on failure");

        // ---- dynq_packed_weights_serialize ----
        let f = "dynq_packed_weights_serialize";
        let mut need = 0usize;
        assert_eq!(dynq_packed_weights_serialize(p, null_mut(), 0, &mut need), Status::Ok);
        let mut blob = vec![0xEEu8; need];
        let mut written = 0usize;
        t.case(
            f,
            "packed = NULL",
            Status::NullPointer,
            dynq_packed_weights_serialize(null(), blob.as_mut_ptr(), need, &mut written),
        );
        t.case(
            f,
            "written = NULL",
            Status::NullPointer,
            dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need, null_mut()),
        );
        let st = dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need - 1, &mut written);
        t.case(f, "buf_len = required size - 1", Status::BufferTooSmall, st);
        assert_eq!(written, need);
        assert!(blob.iter().all(|&b| b == 0xEE), "buffer written on BUFFER_TOO_SMALL");
        assert_eq!(dynq_packed_weights_serialize(p, blob.as_mut_ptr(), need, &mut written), Status::Ok);

        // ---- dynq_packed_weights_deserialize ----
        let f = "dynq_packed_weights_deserialize";
        let case = |t: &mut Table, input: &str, want, b: &[u8], len: usize, cfg: *const dynq_pack_config| {
            let mut out = std::ptr::dangling_mut::<dynq_packed_weights>();
            let st = dynq_packed_weights_deserialize(b.as_ptr(), len, cfg, &mut out);
            t.case(f, input, want, st);
            assert!(out.is_null(), "{f}: {input}: *out not NULL");
        };
        let mut out = std::ptr::dangling_mut::<dynq_packed_weights>();
        t.case(f, "buf = NULL", Status::NullPointer, dynq_packed_weights_deserialize(null(), need, null(), &mut out));
        t.case(
            f,
            "out = NULL",
            Status::NullPointer,
            dynq_packed_weights_deserialize(blob.as_ptr(), need, null(), null_mut()),
        );
        case(&mut t, "len = 0", Status::CorruptData, &blob, 0, null());
        case(&mut t, "truncated by 1 byte", Status::CorruptData, &blob, need - 1, null());
        let mut longer = blob.clone();
        longer.push(0);
        case(&mut t, "1 byte appended", Status::CorruptData, &longer, need + 1, null());
        case(&mut t, "len = SIZE_MAX", Status::SizeOverflow, &blob, usize::MAX, null());
        let text = b"this is not a dynq blob, just some text";
        case(&mut t, "foreign data (text)", Status::CorruptData, text, text.len(), null());
        let mut b = blob.clone();
        b[60] ^= 0x10;
        case(&mut t, "one bit flipped in the weights", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[0] = b'X';
        fix_crc(&mut b);
        case(&mut t, "wrong magic, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[8..12].copy_from_slice(&2u32.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "format version 2, CRC recomputed", Status::Unsupported, &b, need, null());
        let mut b = blob.clone();
        b[8..12].copy_from_slice(&0u32.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "format version 0, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[44..48].copy_from_slice(&1u32.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "unknown flag bit, CRC recomputed", Status::Unsupported, &b, need, null());
        let mut b = blob.clone();
        b[12..16].copy_from_slice(&52u32.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "header length 52, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[24..32].copy_from_slice(&0u64.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "n = 0 in the header, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[32..40].copy_from_slice(&65537u64.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "k = 65537 in the header, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "n = 2^62 in the header, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[24..32].copy_from_slice(&6u64.to_le_bytes());
        b[32..40].copy_from_slice(&4u64.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "shape 6 x 4 instead of 4 x 6, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[40..44].copy_from_slice(&7u32.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "granularity 7, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[52..56].copy_from_slice(&f32::NAN.to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "scale 1 = NaN, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut b = blob.clone();
        b[48..52].copy_from_slice(&(-1.0f32).to_le_bytes());
        fix_crc(&mut b);
        case(&mut t, "scale 0 = -1, CRC recomputed", Status::CorruptData, &b, need, null());
        let mut pc = pack_cfg();
        pc.struct_size += 4;
        case(&mut t, "config->struct_size = sizeof + 4", Status::InvalidArgument, &blob, need, &pc);

        // ---- dynq_gemm and dynq_gemm_ex ----
        let m = 3usize;
        let a: Vec<f32> = (0..m * k + 8).map(|i| (i % 11) as f32 * 0.25 - 1.0).collect();
        let bias = [0.5f32; 8];
        let mut y = vec![f32::from_bits(sentinel); m * n + 8];
        let gc = gemm_cfg();
        let f = "dynq_gemm";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let yp = y.as_mut_ptr();
        let st = dynq_gemm(null(), a.as_ptr(), m, k, null(), yp, n, &gc);
        g(&mut t, "packed = NULL", Status::NullPointer, st, &y);
        let st = dynq_gemm(p, null(), m, k, null(), yp, n, &gc);
        g(&mut t, "a = NULL with m = 3", Status::NullPointer, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), m, k, null(), null_mut(), n, &gc);
        g(&mut t, "y = NULL with m = 3", Status::NullPointer, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), m, k - 1, null(), yp, n, &gc);
        g(&mut t, "lda = k - 1", Status::InvalidArgument, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), m, k, null(), yp, n - 1, &gc);
        g(&mut t, "ldy = n - 1", Status::InvalidArgument, st, &y);
        let st = dynq_gemm(p, null(), 0, 0, null(), null_mut(), n, &gc);
        g(&mut t, "lda = 0 < k with m = 0 (empty batch still checks strides)", Status::InvalidArgument, st, &y);
        let mis = (a.as_ptr() as *const u8).add(1) as *const f32;
        let st = dynq_gemm(p, mis, m, k, null(), yp, n, &gc);
        g(&mut t, "a misaligned (address + 1 byte)", Status::InvalidArgument, st, &y);
        let ymis = (yp as *mut u8).add(2) as *mut f32;
        let st = dynq_gemm(p, a.as_ptr(), 1, k, null(), ymis, n, &gc);
        g(&mut t, "y misaligned (address + 2 bytes)", Status::InvalidArgument, st, &y);
        let bmis = (bias.as_ptr() as *const u8).add(1) as *const f32;
        let st = dynq_gemm(p, a.as_ptr(), m, k, bmis, yp, n, &gc);
        g(&mut t, "bias misaligned (address + 1 byte)", Status::InvalidArgument, st, &y);
        let st = dynq_gemm(p, yp, 1, k, null(), yp.add(2), n, &gc);
        g(&mut t, "y = a + 2 elements (overlap)", Status::InvalidArgument, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), 1, k, yp.add(1), yp, n, &gc);
        g(&mut t, "bias inside y", Status::InvalidArgument, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), usize::MAX / 2, 16, null(), yp, n, &gc);
        g(&mut t, "m = SIZE_MAX/2, lda = 16 (a's extent overflows)", Status::SizeOverflow, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), 2, usize::MAX / 4, null(), yp, n, &gc);
        g(&mut t, "m = 2, lda = SIZE_MAX/4 (a's bytes > PTRDIFF_MAX)", Status::SizeOverflow, st, &y);
        let st = dynq_gemm(p, a.as_ptr(), 2, k, null(), yp, usize::MAX / 2, &gc);
        g(&mut t, "m = 2, ldy = SIZE_MAX/2 (y's extent overflows)", Status::SizeOverflow, st, &y);
        let mut abad = a.clone();
        abad[k + 2] = f32::NAN;
        let st = dynq_gemm(p, abad.as_ptr(), m, k, null(), yp, n, &gc);
        g(&mut t, "NaN activation at A[1][2]", Status::NonFinite, st, &y);
        let mut abad = a.clone();
        abad[2 * k + k - 1] = f32::INFINITY;
        let st = dynq_gemm(p, abad.as_ptr(), m, k, null(), yp, n, &gc);
        g(&mut t, "+Inf activation at A[2][5] (the last element)", Status::NonFinite, st, &y);
        let mut bbad = bias;
        bbad[3] = f32::NEG_INFINITY;
        let st = dynq_gemm(p, a.as_ptr(), m, k, bbad.as_ptr(), yp, n, &gc);
        g(&mut t, "-Inf bias[3]", Status::NonFinite, st, &y);
        for (input, edit) in [
            (
                "config->act_granularity = 2",
                (|c: &mut dynq_gemm_config| c.act_granularity = 2) as fn(&mut dynq_gemm_config),
            ),
            ("config->act_type = 5", |c| c.act_type = 5),
            ("config->epilogue = 6", |c| c.epilogue = 6),
            ("config->num_threads = 1025 (above the maximum)", |c| c.num_threads = 1025),
            ("config->struct_size = sizeof - 4", |c| c.struct_size -= 4),
        ] {
            let mut c = gemm_cfg();
            edit(&mut c);
            let st = dynq_gemm(p, a.as_ptr(), m, k, null(), yp, n, &c);
            g(&mut t, input, Status::InvalidArgument, st, &y);
        }
        let mut cbuf = [0u64; 8];
        let cmis = (cbuf.as_mut_ptr() as *mut u8).add(2) as *mut dynq_gemm_config;
        cmis.write_unaligned(gemm_cfg());
        let st = dynq_gemm(p, a.as_ptr(), m, k, null(), yp, n, cmis);
        g(&mut t, "config misaligned (address + 2 bytes)", Status::InvalidArgument, st, &y);

        let f = "dynq_gemm_ex";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let a16: Vec<u16> = a.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
        let ap = a16.as_ptr() as *const c_void;
        let st = dynq_gemm_ex(p, ap, 3, m, k, null(), yp as *mut c_void, 0, n, &gc);
        g(&mut t, "a_type = 3 (not a dynq_dtype)", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_ex(p, ap, 1, m, k, null(), yp as *mut c_void, 9, n, &gc);
        g(&mut t, "y_type = 9 (not a dynq_dtype)", Status::InvalidArgument, st, &y);
        let st =
            dynq_gemm_ex(p, (ap as *const u8).add(1) as *const c_void, 1, m, k, null(), yp as *mut c_void, 0, n, &gc);
        g(&mut t, "f16 a at an odd address", Status::InvalidArgument, st, &y);
        let mut a16bad = a16.clone();
        a16bad[k] = half::f16::INFINITY.to_bits();
        let st = dynq_gemm_ex(p, a16bad.as_ptr() as *const c_void, 1, m, k, null(), yp as *mut c_void, 0, n, &gc);
        g(&mut t, "f16 +Inf activation at A[1][0]", Status::NonFinite, st, &y);
        let st = dynq_gemm_ex(p, ap, 2, usize::MAX / 4, k, null(), yp as *mut c_void, 2, n, &gc);
        g(&mut t, "bf16, m = SIZE_MAX/4 (a's extent overflows)", Status::SizeOverflow, st, &y);

        let f = "dynq_gemm_smoothed";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let a32 = a.as_ptr() as *const c_void;
        let yv = yp as *mut c_void;
        let mut sm = vec![1.0f32; k];
        sm[2] = 0.0;
        let st = dynq_gemm_smoothed(p, a32, 0, m, k, sm.as_ptr(), null(), yv, 0, n, &gc);
        g(&mut t, "smooth[2] = 0", Status::InvalidArgument, st, &y);
        sm[2] = f32::NAN;
        let st = dynq_gemm_smoothed(p, a32, 0, m, k, sm.as_ptr(), null(), yv, 0, n, &gc);
        g(&mut t, "smooth[2] = NaN", Status::InvalidArgument, st, &y);
        sm[2] = -0.5;
        let st = dynq_gemm_smoothed(p, a32, 0, 0, k, sm.as_ptr(), null(), null_mut(), 0, n, &gc);
        g(
            &mut t,
            "smooth[2] = -0.5 with m = 0 (an empty batch still checks the factors)",
            Status::InvalidArgument,
            st,
            &y,
        );
        let mut big = a.clone();
        big[k + 4] = 3e38;
        let sm = vec![2.0f32; k];
        let st = dynq_gemm_smoothed(p, big.as_ptr() as *const c_void, 0, m, k, sm.as_ptr(), null(), yv, 0, n, &gc);
        g(&mut t, "A[1][4] = 3e38 times smooth 2 (overflows to inf)", Status::NonFinite, st, &y);
        let st =
            dynq_gemm_smoothed(p, a32, 0, m, k, (sm.as_ptr() as *const u8).add(1) as *const f32, null(), yv, 0, n, &gc);
        g(&mut t, "smooth misaligned (address + 1 byte)", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_smoothed(p, a32, 0, m, k, yp as *const f32, null(), yv, 0, n, &gc);
        g(&mut t, "smooth inside y", Status::InvalidArgument, st, &y);

        let f = "dynq_gemm_residual";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let res = vec![1.0f32; m * n];
        let rv = res.as_ptr() as *const c_void;
        let st = dynq_gemm_residual(p, a32, 0, m, k, null(), null(), rv, n - 1, yv, 0, n, &gc);
        g(&mut t, "ldr = n - 1", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_residual(p, a32, 0, m, k, null(), null(), rv, usize::MAX / 2, yv, 0, n, &gc);
        g(&mut t, "ldr = SIZE_MAX/2 (the residual's extent overflows)", Status::SizeOverflow, st, &y);
        let st = dynq_gemm_residual(
            p,
            a32,
            0,
            m,
            k,
            null(),
            null(),
            (rv as *const u8).add(1) as *const c_void,
            n,
            yv,
            0,
            n,
            &gc,
        );
        g(&mut t, "residual misaligned (address + 1 byte)", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_residual(p, a32, 0, m, k, null(), null(), yp as *const c_void, n, yv, 0, n, &gc);
        g(&mut t, "residual = y (in place)", Status::InvalidArgument, st, &y);

        let f = "dynq_gemm_layer_norm";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let ones = vec![1.0f32; n];
        let ln = |scale: *const f32, bias: *const f32, eps: f32, m: usize, y: *mut c_void| {
            dynq_gemm_layer_norm(p, a32, 0, m, k, null(), null(), rv, n, scale, bias, eps, y, 0, n, &gc)
        };
        g(&mut t, "ln_scale = NULL", Status::InvalidArgument, ln(null(), null(), 1e-5, m, yv), &y);
        g(&mut t, "ln_epsilon = -1", Status::InvalidArgument, ln(ones.as_ptr(), null(), -1.0, m, yv), &y);
        g(&mut t, "ln_epsilon = NaN", Status::InvalidArgument, ln(ones.as_ptr(), null(), f32::NAN, m, yv), &y);
        let mut bad = ones.clone();
        bad[1] = f32::INFINITY;
        g(&mut t, "ln_scale[1] = inf", Status::NonFinite, ln(bad.as_ptr(), null(), 1e-5, m, yv), &y);
        g(&mut t, "ln_bias[1] = inf", Status::NonFinite, ln(ones.as_ptr(), bad.as_ptr(), 1e-5, m, yv), &y);
        g(
            &mut t,
            "ln_scale[1] = inf with m = 0 (an empty batch still checks the parameters)",
            Status::NonFinite,
            ln(bad.as_ptr(), null(), 1e-5, 0, null_mut()),
            &y,
        );
        let mis = (ones.as_ptr() as *const u8).add(1) as *const f32;
        g(&mut t, "ln_scale misaligned (address + 1 byte)", Status::InvalidArgument, ln(mis, null(), 1e-5, m, yv), &y);
        g(&mut t, "ln_bias inside y", Status::InvalidArgument, ln(ones.as_ptr(), yp as *const f32, 1e-5, m, yv), &y);

        let f = "dynq_gemm_split";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let half_n = n / 2;
        let mk = |y: *mut f32, ldy: usize, cols: usize| dynq_output { y: y as *mut c_void, ldy, cols };
        let outs = [mk(yp, n, half_n), mk(yp.add(m * n / 2), n, n - half_n + 1)];
        let st = dynq_gemm_split(p, a32, 0, m, k, null(), null(), outs.as_ptr(), 2, 0, &gc);
        g(&mut t, "widths adding up to n + 1", Status::InvalidArgument, st, &y);
        let outs = [mk(yp, n, half_n), mk(yp.add(1), n, n - half_n)];
        let st = dynq_gemm_split(p, a32, 0, m, k, null(), null(), outs.as_ptr(), 2, 0, &gc);
        g(&mut t, "outputs[1].y overlapping outputs[0].y", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_split(p, a32, 0, m, k, null(), null(), outs.as_ptr(), 0, 0, &gc);
        g(&mut t, "num_outputs = 0", Status::InvalidArgument, st, &y);
        let st = dynq_gemm_split(p, a32, 0, m, k, null(), null(), null(), 2, 0, &gc);
        g(&mut t, "outputs = NULL", Status::NullPointer, st, &y);

        let f = "dynq_gemm_split_heads";
        let g = |t: &mut Table, input: &str, want, st, y: &[f32]| {
            t.case(f, input, want, st);
            assert!(y.iter().all(|v| v.to_bits() == sentinel), "{f}: {input}: y written");
        };
        let outs = [mk(yp, n, n)];
        let hd =
            |heads: usize, seq: usize, transposed: u32, reserved: u32| dynq_heads { heads, seq, transposed, reserved };
        let split_heads = |h: &dynq_heads, outs: &[dynq_output]| {
            dynq_gemm_split_heads(p, a32, 0, m, k, null(), null(), outs.as_ptr(), h, 1, 0, &gc)
        };
        let st = split_heads(&hd(n + 1, 1, 0, 0), &outs);
        g(&mut t, "heads not dividing the output's columns", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, m + 1, 0, 0), &outs);
        g(&mut t, "seq not dividing m", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, 0, 0, 0), &outs);
        g(&mut t, "seq = 0", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, 1, 2, 0), &outs);
        g(&mut t, "transposed = 2", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, 1, 0, 7), &outs);
        g(&mut t, "reserved != 0", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, 1, 0, 0), &[mk(yp, n + 1, n)]);
        g(&mut t, "ldy != cols in a head layout", Status::InvalidArgument, st, &y);
        let st = split_heads(&hd(1, 1, 0, 0), &[mk(null_mut(), n, n)]);
        g(&mut t, "y = NULL in a head layout", Status::NullPointer, st, &y);

        // ---- the rest ----
        t.case("dynq_pack_config_init", "config = NULL", Status::NullPointer, dynq_pack_config_init(null_mut()));
        let size = std::mem::size_of::<dynq_pack_config>();
        t.case(
            "dynq_pack_config_init_sized",
            "config = NULL",
            Status::NullPointer,
            dynq_pack_config_init_sized(null_mut(), size),
        );
        let mut pc = pack_cfg();
        let st = dynq_pack_config_init_sized(&mut pc, 8);
        assert_eq!(pc.struct_size as usize, size, "nothing written");
        t.case("dynq_pack_config_init_sized", "size = 8 (no layout of the struct)", Status::InvalidArgument, st);
        t.case("dynq_gemm_config_init", "config = NULL", Status::NullPointer, dynq_gemm_config_init(null_mut()));
        t.case("dynq_active_isa", "isa = NULL", Status::NullPointer, dynq_active_isa(null_mut()));
        let mut slot = [0u32; 2];
        let mis = (slot.as_mut_ptr() as *mut u8).add(1) as *mut u32;
        t.case("dynq_active_isa", "isa misaligned (address + 1 byte)", Status::InvalidArgument, dynq_active_isa(mis));
        assert_eq!(slot, [0, 0]);

        // Functions without a status: out-of-range values give documented answers.
        assert_eq!(CStr::from_ptr(dynq_status_str(1000)).to_str().unwrap(), "unknown status");
        assert_eq!(CStr::from_ptr(dynq_isa_name(42)).to_str().unwrap(), "unknown");
        assert_eq!(dynq_isa_available(42), 0);
        dynq_packed_weights_free(null_mut());
        dynq_packed_weights_free(p);
    }

    // ---- the document ----
    let mut doc = String::new();
    writeln!(doc, "# Bad inputs at the C ABI").unwrap();
    writeln!(doc).unwrap();
    writeln!(
        doc,
        "Generated by `tests/bad_inputs.rs` (`DYNQ_BLESS=1 cargo test --test bad_inputs`); `cargo test` fails when \
         this file differs from what the test produces. Each row is one call of the C ABI with one bad input \
         (all other arguments valid, buffers real), the status it returns and the message \
         `dynq_last_error_message` gives. For every row the test also checks that nothing was written (`y`, \
         `info`, the serialization buffer) and that `*out` was set to NULL. Machine-dependent parts of \
         messages are shown as placeholders."
    )
    .unwrap();
    writeln!(doc).unwrap();
    writeln!(
        doc,
        "{} cases, {} functions, {} distinct statuses: {}.",
        t.rows.len(),
        t.rows.iter().map(|r| &r.0).collect::<std::collections::BTreeSet<_>>().len(),
        t.statuses.len(),
        t.statuses.iter().cloned().collect::<Vec<_>>().join(", ")
    )
    .unwrap();
    writeln!(doc).unwrap();
    writeln!(doc, "| # | function | bad input | status | message |").unwrap();
    writeln!(doc, "|---|---|---|---|---|").unwrap();
    for (i, (func, input, st, msg)) in t.rows.iter().enumerate() {
        let esc = |s: &str| s.replace('|', "\\|");
        writeln!(doc, "| {} | `{func}` | {} | `DYNQ_STATUS_{}` | {} |", i + 1, esc(input), c_name(*st), esc(msg))
            .unwrap();
    }
    assert!(t.rows.len() >= 30, "only {} cases", t.rows.len());

    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bad_inputs.md");
    if std::env::var_os("DYNQ_BLESS").is_some() {
        std::fs::write(&path, &doc).unwrap();
        return;
    }
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED: docs/bad_inputs.md is compared on x86-64 only");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != doc {
        let first = current.lines().zip(doc.lines()).position(|(a, b)| a != b);
        panic!(
            "docs/bad_inputs.md is stale (first difference at line {}): regenerate it with \
             `DYNQ_BLESS=1 cargo test --test bad_inputs` and commit it",
            first.map_or(current.lines().count().min(doc.lines().count()) + 1, |l| l + 1)
        );
    }
}
