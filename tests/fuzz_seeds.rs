//! Seeds for the fuzz targets (fuzz/): valid serialized blobs of many shapes, granularities
//! and extreme values, each checked here to load. The corpus is generated, never committed:
//! `scripts/fuzz.sh` runs this test with `DYNQ_FUZZ_SEED_DIR=fuzz/corpus`, which writes
//! `deserialize/seed-*` (each blob twice: as is, and in the target's "fix up length and CRC"
//! mode) and a few starting inputs for `ffi` and `differential`.

use dynq::{PackOptions, PackedWeights, WeightLayout};
use std::path::Path;

/// (name, blob): every blob is valid and at most a few KB.
fn seed_blobs() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for &(n, k) in &[(1, 1), (1, 4), (3, 5), (8, 4), (9, 3), (16, 2), (17, 33), (32, 12), (33, 65), (64, 100)] {
        for per_tensor in [false, true] {
            let q: Vec<i8> = (0..n * k)
                .map(|i| match i % 5 {
                    0 => -128,
                    1 => 127,
                    _ => next() as i8,
                })
                .collect();
            let scales: Vec<f32> = if per_tensor {
                vec![0.015625]
            } else {
                (0..n).map(|j| [0.0, f32::from_bits(1), 1e-3, 0.5, 3.0e38][j % 5]).collect()
            };
            let pw = PackedWeights::from_quantized(&q, n, k, WeightLayout::NK, &scales, PackOptions::default())
                .expect("valid seed");
            let tag = if per_tensor { "tensor" } else { "channel" };
            out.push((format!("q-{n}x{k}-{tag}"), pw.serialize()));
        }
        // From f32 weights, as a user would pack them.
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0).collect();
        let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::KN, PackOptions::default()).expect("valid seed");
        out.push((format!("f32-{n}x{k}"), pw.serialize()));
    }
    out
}

#[test]
fn seed_blobs_are_valid_and_small() {
    let seeds = seed_blobs();
    for (name, blob) in &seeds {
        let pw = PackedWeights::deserialize(blob, PackOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&pw.serialize(), blob, "{name}");
        assert!(blob.len() < 16 << 10, "{name}: {} bytes", blob.len());
    }
    let Some(dir) = std::env::var_os("DYNQ_FUZZ_SEED_DIR") else { return };
    let dir = Path::new(&dir);
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
    };
    for (name, blob) in &seeds {
        // deserialize: a mode byte, then the blob (mode bit 0: fix up length and CRC).
        for mode in [0u8, 1] {
            let mut v = vec![mode];
            v.extend_from_slice(blob);
            write("deserialize", &format!("{name}-mode{mode}"), &v);
        }
    }
    // ffi and differential decode their input as a sequence of choices; a few patterns give
    // libFuzzer a start (it finds the rest from coverage).
    for (i, len) in [16usize, 64, 256, 1024].iter().enumerate() {
        let bytes: Vec<u8> = (0..*len).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 * 7)).collect();
        write("ffi", &format!("pattern-{len}"), &bytes);
        write("differential", &format!("pattern-{len}"), &bytes);
    }
    for (name, blob) in seeds.iter().take(6) {
        write("ffi", &format!("blob-{name}"), blob);
    }
    println!("wrote {} deserialize seeds to {}", 2 * seeds.len(), dir.display());
}
