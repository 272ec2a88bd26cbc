//! Damaged serialized blobs are refused with CORRUPT_DATA, through the Rust API and the C ABI:
//! - every single-bit flip and every truncation of a medium blob (4.4 KB), exhaustively;
//! - on a large blob (263 KB: 256 x 1024 per channel), every flip in the header, the scales
//!   and the first and last 4 KB, a random sample of flips elsewhere, every truncation to
//!   the first and last 4 KB of lengths and a sample in between, extensions, two-bit flips,
//!   bursts of up to 32 bits and overwritten bytes.
//!
//! The unit test in src/pack/serialize.rs does the same exhaustively on a 79-byte blob.
//! Counts are printed (`cargo test --test corruption -- --nocapture`).

use dynq::ffi::{dynq_packed_weights, dynq_packed_weights_deserialize, dynq_packed_weights_free};
use dynq::{PackOptions, PackedWeights, Status, WeightGranularity, WeightLayout};
use std::ptr::null;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn blob(n: usize, k: usize, gran: WeightGranularity, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let w: Vec<f32> = (0..n * k).map(|_| (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).collect();
    PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions { granularity: gran, ..Default::default() })
        .unwrap()
        .serialize()
}

/// Loads `b` through the Rust API (`ffi == false`) or the C ABI, returning the status.
fn load(b: &[u8], ffi: bool) -> Status {
    if !ffi {
        return match PackedWeights::deserialize(b, PackOptions::default()) {
            Ok(_) => Status::Ok,
            Err(e) => e.status(),
        };
    }
    let mut out = std::ptr::dangling_mut::<dynq_packed_weights>();
    // SAFETY: b has b.len() readable bytes; out is a valid slot.
    let st = unsafe { dynq_packed_weights_deserialize(b.as_ptr(), b.len(), null(), &mut out) };
    if st == Status::Ok {
        // SAFETY: a live handle, freed once.
        unsafe { dynq_packed_weights_free(out) };
    } else {
        assert!(out.is_null(), "*out not NULL after a failure");
    }
    st
}

#[derive(Default)]
struct Count {
    tried: usize,
    refused: usize,
}

impl Count {
    fn check(&mut self, what: &str, st: Status) {
        self.tried += 1;
        assert_eq!(st, Status::CorruptData, "{what} was not refused as corrupt data");
        self.refused += 1;
    }
}

#[test]
fn medium_blob_every_bit_flip_and_truncation() {
    for (gran, ffi) in [(WeightGranularity::PerChannel, true), (WeightGranularity::PerTensor, false)] {
        let mut b = blob(64, 64, gran, 1);
        assert_eq!(load(&b, ffi), Status::Ok);
        let (mut flips, mut cuts) = (Count::default(), Count::default());
        for bit in 0..b.len() * 8 {
            b[bit / 8] ^= 1 << (bit % 8);
            flips.check(&format!("flip of bit {bit}"), load(&b, ffi));
            b[bit / 8] ^= 1 << (bit % 8);
        }
        for len in 0..b.len() {
            cuts.check(&format!("truncation to {len} bytes"), load(&b[..len], ffi));
        }
        println!(
            "medium blob ({} bytes, {gran:?}, {}): {}/{} single-bit flips and {}/{} truncations refused",
            b.len(),
            if ffi { "C ABI" } else { "Rust API" },
            flips.refused,
            flips.tried,
            cuts.refused,
            cuts.tried
        );
    }
}

#[test]
fn large_blob_sampled_damage() {
    let mut b = blob(256, 1024, WeightGranularity::PerChannel, 2);
    let len = b.len();
    assert_eq!(len, 48 + 4 * 256 + 256 * 1024 + 4);
    assert_eq!(load(&b, true), Status::Ok);
    let mut rng = Rng(3);
    let mut c = Count::default();
    // Single-bit flips: exhaustive over the header, the scales and the first and last 4 KB,
    // then a sample anywhere; the C ABI and the Rust API alternate.
    let mut bits: Vec<usize> = (0..(48 + 4 * 256 + 4096) * 8).chain((len - 4096) * 8..len * 8).collect();
    bits.extend((0..20_000).map(|_| rng.below(len * 8)));
    for (i, &bit) in bits.iter().enumerate() {
        b[bit / 8] ^= 1 << (bit % 8);
        c.check(&format!("flip of bit {bit}"), load(&b, i % 2 == 0));
        b[bit / 8] ^= 1 << (bit % 8);
    }
    let single = c.tried;
    // Truncations: every length in the first and last 4 KB, and a sample in between.
    let mut lens: Vec<usize> = (0..4096).chain(len - 4096..len).collect();
    lens.extend((0..2000).map(|_| rng.below(len)));
    for (i, &l) in lens.iter().enumerate() {
        c.check(&format!("truncation to {l} bytes"), load(&b[..l], i % 2 == 1));
    }
    let truncations = c.tried - single;
    // Extensions by 1..=64 bytes (zeros, or a copy of the tail).
    for extra in 1..=64 {
        let mut e = b.clone();
        e.extend(std::iter::repeat_n(0u8, extra));
        c.check(&format!("{extra} zero bytes appended"), load(&e, extra % 2 == 0));
    }
    // Two-bit flips anywhere (CRC-32 detects all of them at this length), bursts of 2..=32
    // bits, and one byte overwritten with a different value.
    for i in 0..3000 {
        let (x, y) = (rng.below(len * 8), rng.below(len * 8));
        if x == y {
            continue;
        }
        b[x / 8] ^= 1 << (x % 8);
        b[y / 8] ^= 1 << (y % 8);
        c.check(&format!("flips of bits {x} and {y}"), load(&b, i % 2 == 0));
        b[x / 8] ^= 1 << (x % 8);
        b[y / 8] ^= 1 << (y % 8);
    }
    for i in 0..3000 {
        let width = 2 + rng.below(31);
        let start = rng.below(len * 8 - width);
        // First and last bit of the burst flipped, the ones between at random.
        let pattern: Vec<bool> = (0..width).map(|j| j == 0 || j == width - 1 || rng.next() & 1 == 1).collect();
        for (j, &f) in pattern.iter().enumerate() {
            if f {
                b[(start + j) / 8] ^= 1 << ((start + j) % 8);
            }
        }
        c.check(&format!("burst of {width} bits at bit {start}"), load(&b, i % 2 == 1));
        for (j, &f) in pattern.iter().enumerate() {
            if f {
                b[(start + j) / 8] ^= 1 << ((start + j) % 8);
            }
        }
    }
    for i in 0..3000 {
        let at = rng.below(len);
        let old = b[at];
        b[at] = old ^ (1 + rng.below(255)) as u8;
        c.check(&format!("byte {at} overwritten"), load(&b, i % 2 == 0));
        b[at] = old;
    }
    assert_eq!(load(&b, true), Status::Ok, "the blob was restored");
    println!(
        "large blob ({len} bytes): {} single-bit flips, {truncations} truncations, {} other damages: \
         {}/{} refused as CORRUPT_DATA",
        single,
        c.tried - single - truncations,
        c.refused,
        c.tried
    );
}

#[test]
fn per_tensor_blob_with_one_channel_round_trips() {
    // n = 1: one scale is both per channel and per tensor; the blob's choice is kept (a
    // re-serialization used to flip the granularity field; found by fuzz/deserialize).
    let w = [0.5f32, -1.0, 0.25];
    for gran in [WeightGranularity::PerTensor, WeightGranularity::PerChannel] {
        let pw = PackedWeights::from_f32(
            &w,
            1,
            3,
            WeightLayout::NK,
            PackOptions { granularity: gran, ..Default::default() },
        )
        .unwrap();
        let b = pw.serialize();
        let back = PackedWeights::deserialize(&b, PackOptions::default()).unwrap();
        assert_eq!(back.granularity(), gran);
        assert_eq!(back.serialize(), b);
        for isa in dynq::Isa::ALL.iter().filter(|i| dynq::isa::resolve(**i).is_ok()) {
            assert_eq!(pw.repack(*isa).unwrap().serialize(), b, "{isa}");
        }
    }
}
