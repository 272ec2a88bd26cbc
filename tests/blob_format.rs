//! The serialized format is the one the README documents, byte for byte, on every platform:
//! blobs written by one machine (or one version) load on another. The blobs here are built by
//! hand from the README's table (little-endian fields, CRC-32 at the end), independently of
//! `src/pack/serialize.rs`, and one is also pinned as recorded bytes. CI runs this on x86-64,
//! under qemu-aarch64 and under qemu-s390x (big-endian).

use dynq::{PackOptions, PackedWeights, WeightGranularity, WeightLayout};

/// A version-1 blob laid out as the README's table says.
fn by_hand(n: u64, k: u64, per_tensor: bool, scales: &[f32], q: &[i8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"DYNQPWT\0");
    b.extend_from_slice(&1u32.to_le_bytes()); // format version
    b.extend_from_slice(&48u32.to_le_bytes()); // header length
    let total = 48 + 4 * scales.len() + q.len() + 4;
    b.extend_from_slice(&(total as u64).to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    b.extend_from_slice(&k.to_le_bytes());
    b.extend_from_slice(&u32::from(per_tensor).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // flags
    for s in scales {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b.extend(q.iter().map(|&v| v as u8));
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(b.len(), total);
    b
}

/// Weights with every byte value's extremes, a sign change per row and no symmetry that a
/// swapped field or a reversed scale could hide behind.
fn weights(n: usize, k: usize) -> Vec<i8> {
    (0..n * k)
        .map(|i| match i % 7 {
            0 => 127,
            1 => -128,
            _ => ((i * 37 + 11) % 255) as i32 as i8,
        })
        .collect()
}

#[test]
fn serialize_writes_the_documented_layout_and_reads_it_back() {
    for (n, k) in [(3usize, 5usize), (1, 1), (17, 33), (64, 130)] {
        let q = weights(n, k);
        let per_channel: Vec<f32> = (0..n).map(|j| 0.001 * (j as f32 + 1.5)).collect();
        for scales in [per_channel, vec![0.0625f32]] {
            let per_tensor = scales.len() == 1 && n > 1;
            let pw = PackedWeights::from_quantized(&q, n, k, WeightLayout::NK, &scales, PackOptions::default())
                .expect("pack");
            let want = by_hand(n as u64, k as u64, per_tensor, &scales, &q);
            assert_eq!(pw.serialize(), want, "{n}x{k}, {} scale(s)", scales.len());
            let back = PackedWeights::deserialize(&want, PackOptions::default()).expect("load");
            assert_eq!((back.n(), back.k()), (n, k));
            assert_eq!(back.quantized_weights(), q);
            assert_eq!(
                back.source_scales().iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>()
            );
            let g = if per_tensor { WeightGranularity::PerTensor } else { WeightGranularity::PerChannel };
            assert_eq!(back.granularity(), g);
        }
    }
}

/// A blob recorded from this version (2 x 3, per channel), so that a change of the format, of
/// the CRC or of the byte order anywhere is caught even if writer and reader change together.
const RECORDED: &str = "44594e5150575400010000003000000042000000000000000200000000000000\
                        030000000000000000000000000000000000803e0000c03f7f80fd0c9c0a1ef6af12";

#[test]
fn a_recorded_blob_loads_and_is_written_again_byte_for_byte() {
    let blob: Vec<u8> =
        (0..RECORDED.len() / 2).map(|i| u8::from_str_radix(&RECORDED[2 * i..2 * i + 2], 16).unwrap()).collect();
    let q: Vec<i8> = vec![127, -128, -3, 12, -100, 10];
    let scales = [0.25f32, 1.5];
    assert_eq!(blob, by_hand(2, 3, false, &scales, &q));
    let pw = PackedWeights::deserialize(&blob, PackOptions::default()).expect("load");
    assert_eq!(pw.quantized_weights(), q);
    assert_eq!(pw.source_scales(), &scales);
    assert_eq!(pw.serialize(), blob);
}
