//! The portable serialized form of packed weights.
//!
//! A blob holds the canonical int8 weights (`[N][K]` row-major), never a kernel's layout, so a
//! blob written on an AVX-512 machine loads on an AVX2 or NEON machine: it is repacked on load.
//!
//! Format version 1, all integers little-endian:
//!
//! ```text
//! offset  size   field
//!  0      8      magic "DYNQPWT\0"
//!  8      4      format version (u32) = 1
//! 12      4      header length (u32) = 48
//! 16      8      total blob length in bytes (u64), including the trailing checksum
//! 24      8      n, output channels (u64)
//! 32      8      k, inputs (u64)
//! 40      4      weight granularity (u32): 0 per channel, 1 per tensor
//! 44      4      flags (u32), 0; a set bit is a feature this version does not know
//! 48      4*S    scales (f32), S = n per channel, 1 per tensor
//! ..      n*k    weights (i8), [N][K] row-major
//! end-4   4      CRC-32 (IEEE) of every byte before it
//! ```
//!
//! The first 24 bytes and the trailing CRC-32 are the invariant of every format version:
//! a reader checks magic, length and checksum before trusting the version number, so any
//! truncation or single-bit flip is reported as corrupt data, and a genuine newer version as
//! unsupported.

use super::{PackOptions, PackedWeights, Reservation, WeightLayout};
use crate::error::{Error, Result};
use crate::quant::{WeightGranularity, MAX_K};

/// The magic bytes at the start of every blob.
pub const MAGIC: [u8; 8] = *b"DYNQPWT\0";
/// The format version this library writes; it reads versions 1 ..= this.
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
const PREFIX_LEN: usize = 24;
const CRC_LEN: usize = 4;

fn payload_len(n: usize, k: usize, num_scales: usize) -> Option<usize> {
    HEADER_LEN.checked_add(num_scales.checked_mul(4)?)?.checked_add(n.checked_mul(k)?)?.checked_add(CRC_LEN)
}

impl PackedWeights {
    /// Size in bytes of [`Self::serialize`]'s output.
    pub fn serialized_len(&self) -> usize {
        payload_len(self.n, self.k, self.source_scales().len()).expect("sizes were checked at pack time")
    }

    /// Writes the portable blob into `out`, which must hold [`Self::serialized_len`] bytes.
    /// Returns the number of bytes written.
    pub fn serialize_into(&self, out: &mut [u8]) -> Result<usize> {
        let len = self.serialized_len();
        if out.len() < len {
            return Err(Error::BufferTooSmall(format!(
                "serialized packed weights need {len} bytes, buffer has {}",
                out.len()
            )));
        }
        let out = &mut out[..len];
        let scales = self.source_scales();
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        out[16..24].copy_from_slice(&(len as u64).to_le_bytes());
        out[24..32].copy_from_slice(&(self.n as u64).to_le_bytes());
        out[32..40].copy_from_slice(&(self.k as u64).to_le_bytes());
        out[40..44].copy_from_slice(&self.granularity.to_raw().to_le_bytes());
        out[44..48].copy_from_slice(&0u32.to_le_bytes());
        let mut off = HEADER_LEN;
        for s in scales {
            out[off..off + 4].copy_from_slice(&s.to_le_bytes());
            off += 4;
        }
        let q = self.quantized_weights();
        for (o, v) in out[off..off + q.len()].iter_mut().zip(&q) {
            *o = *v as u8;
        }
        off += q.len();
        let crc = crc32fast::hash(&out[..off]);
        out[off..off + 4].copy_from_slice(&crc.to_le_bytes());
        Ok(len)
    }

    /// The portable blob as a new vector.
    pub fn serialize(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.serialized_len()];
        self.serialize_into(&mut v).expect("buffer has the exact size");
        v
    }

    /// Loads a blob written by [`Self::serialize`] (on any machine) and packs it for the ISA
    /// selected by `opts.isa` (or the active one). `opts.granularity` is ignored.
    ///
    /// Errors: [`Error::CorruptData`] for anything truncated, altered or not a dynq blob;
    /// [`Error::Unsupported`] for a valid blob of a newer format version.
    pub fn deserialize(blob: &[u8], opts: PackOptions) -> Result<Self> {
        let h = parse(blob)?;
        let mut pw = Reservation::new(h.n, h.k, opts.isa)?.fill_quantized(h.weights, WeightLayout::NK, &h.scales)?;
        // With n = 1 one scale is both per channel and per tensor: keep what the blob says, so
        // that it re-serializes to the same bytes (found by fuzz/fuzz_targets/deserialize.rs).
        pw.granularity = h.granularity;
        Ok(pw)
    }
}

struct Parsed<'a> {
    n: usize,
    k: usize,
    granularity: WeightGranularity,
    scales: Vec<f32>,
    weights: &'a [i8],
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn parse(blob: &[u8]) -> Result<Parsed<'_>> {
    let corrupt = |msg: String| Err(Error::CorruptData(msg));
    if blob.len() < PREFIX_LEN + CRC_LEN {
        return corrupt(format!(
            "blob of {} bytes is too short to be dynq packed weights (at least {} bytes)",
            blob.len(),
            PREFIX_LEN + CRC_LEN
        ));
    }
    if blob[..8] != MAGIC {
        return corrupt("blob does not start with the dynq packed-weights magic \"DYNQPWT\\0\"".into());
    }
    let total = u64_at(blob, 16);
    if total != blob.len() as u64 {
        return corrupt(format!(
            "blob length is {} bytes but its header says {total} (truncated or padded)",
            blob.len()
        ));
    }
    let body = blob.len() - CRC_LEN;
    let stored = u32_at(blob, body);
    let actual = crc32fast::hash(&blob[..body]);
    if stored != actual {
        return corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {actual:#010x}): the blob was altered"
        ));
    }
    let version = u32_at(blob, 8);
    if version == 0 {
        return corrupt("format version 0 is not valid".into());
    }
    if version > FORMAT_VERSION {
        return Err(Error::Unsupported(format!(
            "blob has format version {version}; this dynq ({}) reads versions up to {FORMAT_VERSION}",
            crate::VERSION
        )));
    }
    // From here on the checksum matched, so a bad field means the writer was broken or
    // malicious: still corrupt data, never a crash.
    let header_len = u32_at(blob, 12) as usize;
    if header_len != HEADER_LEN || blob.len() < HEADER_LEN + CRC_LEN {
        return corrupt(format!("header length {header_len} is not {HEADER_LEN} for format version 1"));
    }
    let (n64, k64) = (u64_at(blob, 24), u64_at(blob, 32));
    if n64 == 0 || k64 == 0 || k64 > MAX_K as u64 || n64 > usize::MAX as u64 {
        return corrupt(format!("blob declares an invalid shape n={n64} x k={k64}"));
    }
    let (n, k) = (n64 as usize, k64 as usize);
    let granularity = match WeightGranularity::from_raw(u32_at(blob, 40)) {
        Some(g) => g,
        None => return corrupt(format!("unknown weight granularity {}", u32_at(blob, 40))),
    };
    let flags = u32_at(blob, 44);
    if flags != 0 {
        return Err(Error::Unsupported(format!("blob uses feature flags {flags:#x} unknown to this version")));
    }
    let num_scales = match granularity {
        WeightGranularity::PerChannel => n,
        WeightGranularity::PerTensor => 1,
    };
    if payload_len(n, k, num_scales) != Some(blob.len()) {
        return corrupt(format!(
            "blob of {} bytes does not match its shape n={n} x k={k} and its number of scales ({num_scales})",
            blob.len()
        ));
    }
    let scales: Vec<f32> = blob[HEADER_LEN..HEADER_LEN + 4 * num_scales]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    if let Some((i, s)) = scales.iter().enumerate().find(|(_, s)| !s.is_finite() || **s < 0.0) {
        return corrupt(format!("scale {i} is {s}; scales must be finite and non-negative"));
    }
    let off = HEADER_LEN + 4 * num_scales;
    let bytes = &blob[off..off + n * k];
    let weights = as_i8(bytes);
    Ok(Parsed { n, k, granularity, scales, weights })
}

/// Views bytes as `i8`.
fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have identical size, alignment and validity (every bit pattern).
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(gran: WeightGranularity) -> PackedWeights {
        let (n, k) = (3, 5);
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 - 7.0) / 3.0).collect();
        PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions { granularity: gran, ..Default::default() })
            .unwrap()
    }

    #[test]
    fn round_trip() {
        for g in [WeightGranularity::PerChannel, WeightGranularity::PerTensor] {
            let p = sample(g);
            let blob = p.serialize();
            assert_eq!(blob.len(), p.serialized_len());
            let q = PackedWeights::deserialize(&blob, PackOptions::default()).unwrap();
            assert_eq!(q.quantized_weights(), p.quantized_weights());
            assert_eq!(q.scales(), p.scales());
            assert_eq!(q.granularity(), g);
            assert_eq!(q.serialize(), blob);
        }
    }

    #[test]
    fn every_bit_flip_and_truncation_is_corrupt() {
        let blob = sample(WeightGranularity::PerChannel).serialize();
        for byte in 0..blob.len() {
            for bit in 0..8 {
                let mut b = blob.clone();
                b[byte] ^= 1 << bit;
                let e = PackedWeights::deserialize(&b, PackOptions::default()).unwrap_err();
                assert_eq!(e.status(), crate::Status::CorruptData, "byte {byte} bit {bit}: {e}");
            }
        }
        for len in 0..blob.len() {
            let e = PackedWeights::deserialize(&blob[..len], PackOptions::default()).unwrap_err();
            assert_eq!(e.status(), crate::Status::CorruptData, "len {len}: {e}");
        }
    }

    #[test]
    fn future_version_is_unsupported() {
        let mut blob = sample(WeightGranularity::PerTensor).serialize();
        blob[8..12].copy_from_slice(&2u32.to_le_bytes());
        let body = blob.len() - 4;
        let crc = crc32fast::hash(&blob[..body]);
        blob[body..].copy_from_slice(&crc.to_le_bytes());
        let e = PackedWeights::deserialize(&blob, PackOptions::default()).unwrap_err();
        assert_eq!(e.status(), crate::Status::Unsupported);
        assert!(e.message().contains("version 2"), "{e}");
    }

    #[test]
    fn small_buffer() {
        let p = sample(WeightGranularity::PerChannel);
        let mut buf = vec![0u8; p.serialized_len() - 1];
        assert_eq!(p.serialize_into(&mut buf).unwrap_err().status(), crate::Status::BufferTooSmall);
    }
}
