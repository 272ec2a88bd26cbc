//! Loading serialized packed weights from arbitrary bytes.
//!
//! Input: one mode byte, then the blob.
//! - mode bit 0 set: the length field and the trailing CRC-32 are made consistent before
//!   loading, so that mutations reach the fields behind the checksum (version, shape,
//!   granularity, flags, scales) instead of all dying at the checksum.
//! - mode bits 1..: which ISA to load for (auto, or one this CPU runs).
//!
//! Properties checked, through the Rust API and the C ABI on the same bytes:
//! - no crash, no sanitizer report, no panic (libFuzzer aborts on any panic, even a caught one);
//! - a refusal is CORRUPT_DATA or UNSUPPORTED (a newer version or unknown flags, only behind a
//!   valid checksum), with the same status and message from both entry points, and `*out` NULL;
//! - an accepted blob re-serializes to exactly the same bytes and can be used by a GEMM.

#![no_main]

use dynq::ffi::{dynq_last_error_message, dynq_pack_config, dynq_packed_weights_deserialize, dynq_packed_weights_free};
use dynq::{Epilogue, GemmOptions, Isa, PackOptions, PackedWeights, Status};
use libfuzzer_sys::fuzz_target;

fn usable_isas() -> Vec<Isa> {
    Isa::ALL.iter().copied().filter(|i| dynq::isa::resolve(*i).is_ok()).collect()
}

fn last_message() -> String {
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf has buf.len() writable bytes.
    let len = unsafe { dynq_last_error_message(buf.as_mut_ptr() as *mut _, buf.len()) };
    String::from_utf8_lossy(&buf[..len.min(buf.len() - 1)]).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut blob = rest.to_vec();
    let fixed = mode & 1 == 1 && blob.len() >= 28;
    if fixed {
        let len = blob.len() as u64;
        blob[16..24].copy_from_slice(&len.to_le_bytes());
        let body = blob.len() - 4;
        let crc = crc32fast::hash(&blob[..body]);
        blob[body..].copy_from_slice(&crc.to_le_bytes());
    }
    let isas = usable_isas();
    let isa = match (mode >> 1) as usize % (isas.len() + 1) {
        0 => None,
        i => Some(isas[i - 1]),
    };

    let core = PackedWeights::deserialize(&blob, PackOptions { isa, ..Default::default() });

    let config = dynq_pack_config {
        struct_size: std::mem::size_of::<dynq_pack_config>() as u32,
        granularity: 0,
        isa: isa.map_or(0, |i| i.to_raw()),
        weight_qmax: 0,
    };
    let mut out = 8usize as *mut dynq::ffi::dynq_packed_weights; // non-NULL garbage, must be reset
                                                                 // A zero-length Vec's pointer is dangling but non-null and aligned, valid for 0 bytes.
                                                                 // SAFETY: blob has blob.len() readable bytes; config and out are valid.
    let st = unsafe { dynq_packed_weights_deserialize(blob.as_ptr(), blob.len(), &config, &mut out) };

    match core {
        Ok(pw) => {
            assert_eq!(st, Status::Ok, "C ABI refused a blob the Rust API accepts: {}", last_message());
            assert!(!out.is_null());
            // SAFETY: a live handle from the call above, freed once.
            unsafe { dynq_packed_weights_free(out) };
            assert_eq!(pw.serialize(), blob, "an accepted blob does not re-serialize to itself");
            assert_eq!(pw.serialized_len(), blob.len());
            if let Some(i) = isa {
                assert_eq!(pw.isa(), i);
            }
            let (n, k) = (pw.n(), pw.k());
            if n * k <= 1 << 16 {
                let m = 2;
                let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
                let mut y = vec![0f32; m * n];
                let o = GemmOptions { epilogue: Epilogue::Gelu, num_threads: 1, ..Default::default() };
                dynq::gemm(&pw, &a, m, k, None, &mut y, n, &o).expect("GEMM on loaded weights");
            }
        }
        Err(e) => {
            assert_eq!(st, e.status(), "C ABI and Rust API disagree on {:?}", e);
            assert!(out.is_null(), "*out not reset to NULL on failure");
            assert_eq!(last_message(), e.message());
            match e.status() {
                Status::CorruptData => {}
                Status::Unsupported => {
                    let version = u32::from_le_bytes(blob[8..12].try_into().unwrap());
                    let flags = blob.get(44..48).map_or(0, |f| u32::from_le_bytes(f.try_into().unwrap()));
                    assert!(version > 1 || flags != 0, "UNSUPPORTED for a version-1 blob without flags: {e}");
                    let body = blob.len() - 4;
                    assert_eq!(
                        crc32fast::hash(&blob[..body]).to_le_bytes(),
                        blob[body..],
                        "UNSUPPORTED behind a bad checksum: {e}"
                    );
                }
                s => panic!("a bad blob must be CORRUPT_DATA or UNSUPPORTED, got {s:?}: {e}"),
            }
        }
    }
});
