//! A process-wide, content-keyed, reference-counted cache of packed weights.
//!
//! Every ONNX Runtime session builds its own kernels, so without sharing, N sessions of one model
//! would hold N packed copies of every weight. Kernels instead ask this cache: the key is the
//! weight's content (shape, a 64-bit hash of the int8 values and the scale bits); on a hash hit the
//! full content is compared, so two different weights never share. Entries hold `Weak` references:
//! a packed copy lives exactly as long as some kernel (some session) holds its `Arc`.

use crate::pack::{PackOptions, PackedWeights, WeightLayout};
use crate::Result;
use once_cell::sync::Lazy;
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, Weak};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    n: usize,
    k: usize,
    num_scales: usize,
    hash: u64,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<Key, Vec<Weak<PackedWeights>>>,
    hits: u64,
    misses: u64,
}

static CACHE: Lazy<Mutex<Cache>> = Lazy::new(Default::default);

/// Counters of the cache, for tests and diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packed weights alive (held by at least one kernel).
    pub live: usize,
    /// Heap bytes of those packed weights.
    pub bytes: usize,
    /// Lookups that found a live packed copy.
    pub hits: u64,
    /// Lookups that had to pack.
    pub misses: u64,
}

fn content_hash(q: &[i8], scales: &[f32]) -> u64 {
    let mut h = DefaultHasher::new();
    // SAFETY: i8 and u8 have the same size and alignment.
    let bytes = unsafe { std::slice::from_raw_parts(q.as_ptr().cast::<u8>(), q.len()) };
    bytes.hash(&mut h);
    for s in scales {
        s.to_bits().hash(&mut h);
    }
    h.finish()
}

/// True when `p` holds exactly these weights (`q` is `[K][N]` row-major).
fn same_content(p: &PackedWeights, q: &[i8], n: usize, k: usize, scales: &[f32]) -> bool {
    if p.n() != n || p.k() != k || p.source_scales().len() != scales.len() {
        return false;
    }
    if p.source_scales().iter().zip(scales).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return false;
    }
    let canon = p.quantized_weights(); // [N][K]
    (0..k).all(|kk| (0..n).all(|nn| canon[nn * k + kk] == q[kk * n + nn]))
}

/// Packed weights for int8 `q` (`[K][N]`, ONNX MatMul layout) with 1 or `n` scales: a shared copy
/// if a live one with the same content exists, else a new one (registered for later lookups).
/// Returns the weights and whether they were shared.
pub fn get_or_pack(q: &[i8], n: usize, k: usize, scales: &[f32]) -> Result<(Arc<PackedWeights>, bool)> {
    let key = Key { n, k, num_scales: scales.len(), hash: content_hash(q, scales) };
    {
        let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let found = c
            .entries
            .get(&key)
            .and_then(|v| v.iter().filter_map(Weak::upgrade).find(|p| same_content(p, q, n, k, scales)));
        if let Some(p) = found {
            c.hits += 1;
            return Ok((p, true));
        }
    }
    // Pack outside the lock: packing a large matrix must not stall other sessions' lookups.
    let packed = Arc::new(PackedWeights::from_quantized(q, n, k, WeightLayout::KN, scales, PackOptions::default())?);
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    // Another thread may have packed the same weights meanwhile: use the first one registered.
    let slot = c.entries.entry(key).or_default();
    slot.retain(|w| w.strong_count() > 0);
    if let Some(p) = slot.iter().filter_map(Weak::upgrade).find(|p| same_content(p, q, n, k, scales)) {
        c.hits += 1;
        return Ok((p, true));
    }
    slot.push(Arc::downgrade(&packed));
    c.misses += 1;
    // Drop keys whose weights are all gone, so the map does not grow with closed sessions.
    c.entries.retain(|_, v| {
        v.retain(|w| w.strong_count() > 0);
        !v.is_empty()
    });
    Ok((packed, false))
}

/// Current counters.
pub fn stats() -> Stats {
    let c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = Stats { hits: c.hits, misses: c.misses, ..Default::default() };
    for p in c.entries.values().flatten().filter_map(Weak::upgrade) {
        s.live += 1;
        s.bytes += p.bytes();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_equal_content_and_frees_with_last_user() {
        let (n, k) = (3, 5);
        let q: Vec<i8> = (0..n * k).map(|i| (i as i8) - 7).collect();
        let scales = vec![0.5f32, 0.25, 0.125];
        let (a, shared_a) = get_or_pack(&q, n, k, &scales).unwrap();
        let (b, shared_b) = get_or_pack(&q, n, k, &scales).unwrap();
        assert!(!shared_a && shared_b);
        assert!(Arc::ptr_eq(&a, &b));
        // Different scales or values: a different copy.
        let (c, shared_c) = get_or_pack(&q, n, k, &[0.5, 0.25, 0.25]).unwrap();
        assert!(!shared_c && !Arc::ptr_eq(&a, &c));
        let mut q2 = q.clone();
        q2[4] = 100;
        let (d, _) = get_or_pack(&q2, n, k, &scales).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        // Once every holder is gone, the next lookup packs again.
        let weak = Arc::downgrade(&a);
        drop((a, b));
        assert!(weak.upgrade().is_none());
        let (_e, shared_e) = get_or_pack(&q, n, k, &scales).unwrap();
        assert!(!shared_e);
    }
}
