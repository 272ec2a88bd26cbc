//! Dynamic activation quantization: the parameters come from the range seen in each call.
//!
//! Two schemes, each per row (per token) or per tensor. Both produce `u8` values `qa` and a
//! zero point `za` per row, so the kernels see one representation: `x ~= scale * (qa - za)`.
//!
//! Asymmetric uint8 (the default), exactly ONNX `DynamicQuantizeLinear`:
//!
//! ```text
//! lo = min(0, min x), hi = max(0, max x)          (range widened to include 0)
//! scale = (hi - lo) / 255
//! za    = saturate_u8(round_half_even(-lo / scale))
//! qa    = saturate_u8(round_half_even(x / scale) + za)
//! ```
//!
//! It is the default because it spends all 256 levels on the range actually seen: the inputs
//! of most linear layers are skewed (outputs of GELU/ReLU, of softmax-weighted sums, of layer
//! norms with a bias), and a symmetric scheme then wastes up to half its levels.
//!
//! Symmetric int8 (`ActType::SymmetricI8`): `scale = max|x| / 127`,
//! `q = clamp(round_half_even(x / scale), -127, 127)`, stored as `qa = q + 128` with `za = 128`.
//! Offered for compatibility with models and tools that assume symmetric activations.
//!
//! Degenerate ranges: an all-zero range gives `scale = 0`, `za = 0` (or 128) and every
//! `qa = za`, so the row contributes exactly 0. A non-zero range whose scale would underflow
//! uses the smallest positive subnormal. A range `hi - lo` that overflows f32 is computed as
//! `hi / 255 - lo / 255`, which cannot overflow.
//!
//! Non-finite values are refused ([`crate::Error::NonFinite`], naming the row and column):
//! one NaN would otherwise poison the scale of its whole row (or tensor) and silently turn
//! every output of that row into garbage.

use super::{round_i32, TINY_SCALE};
use crate::error::{Error, Result};
use crate::gemm::Exec;
use crate::kernels::RowOps;

/// Over what the activation range is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActGranularity {
    /// One scale (and zero point) per row of A, i.e. per token. The default: one outlier token
    /// no longer flattens the resolution of every other token in the batch.
    PerRow,
    /// One scale for the whole of A, as ONNX `DynamicQuantizeLinear` does.
    PerTensor,
}

/// How activations are mapped to integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ActType {
    /// uint8 with a zero point (ONNX `DynamicQuantizeLinear`). The default.
    AsymmetricU8,
    /// int8 in [-127, 127] without zero point.
    SymmetricI8,
}

impl ActGranularity {
    /// The C ABI value (`dynq_act_granularity`).
    pub fn to_raw(self) -> u32 {
        match self {
            ActGranularity::PerRow => 0,
            ActGranularity::PerTensor => 1,
        }
    }
    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(ActGranularity::PerRow),
            1 => Some(ActGranularity::PerTensor),
            _ => None,
        }
    }
}

impl ActType {
    /// The C ABI value (`dynq_act_type`).
    pub fn to_raw(self) -> u32 {
        match self {
            ActType::AsymmetricU8 => 0,
            ActType::SymmetricI8 => 1,
        }
    }
    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(ActType::AsymmetricU8),
            1 => Some(ActType::SymmetricI8),
            _ => None,
        }
    }
}

/// Quantization parameters of one range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

/// Parameters of ONNX `DynamicQuantizeLinear` for a range with minimum `min` and maximum `max`
/// (both finite; they are widened to include 0 here).
pub fn asymmetric_params(min: f32, max: f32) -> QParams {
    let lo = min.min(0.0);
    let hi = max.max(0.0);
    let range = hi - lo;
    if range == 0.0 {
        return QParams { scale: 0.0, zero_point: 0 };
    }
    let mut scale = if range.is_finite() { range / 255.0 } else { hi / 255.0 - lo / 255.0 };
    if scale == 0.0 {
        scale = TINY_SCALE;
    }
    let zero_point = round_i32(-lo / scale).clamp(0, 255);
    QParams { scale, zero_point }
}

/// Parameters of the symmetric scheme for a range with largest magnitude `amax`.
pub fn symmetric_params(amax: f32) -> QParams {
    QParams { scale: super::weights::symmetric_scale(amax), zero_point: 128 }
}

/// Quantizes one value with the given parameters into the common `u8` representation.
#[inline(always)]
pub fn quantize_value(x: f32, p: QParams, ty: ActType) -> u8 {
    if p.scale == 0.0 {
        return p.zero_point as u8;
    }
    let r = round_i32(x / p.scale);
    match ty {
        ActType::AsymmetricU8 => r.saturating_add(p.zero_point).clamp(0, 255) as u8,
        ActType::SymmetricI8 => (r.clamp(-127, 127) + 128) as u8,
    }
}

/// Definition of `RowOps::quantize_row`: every element through [`quantize_value`].
pub fn quantize_row(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
    let p = QParams { scale, zero_point };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize_value(v, p, ty);
    }
}

/// Definition of `RowOps::row_stats`: `(min(0, min x), max(0, max x))`, or `None` when the
/// row holds a NaN or an infinity.
pub fn row_stats(row: &[f32]) -> Option<(f32, f32)> {
    let mut lo = 0.0f32;
    let mut hi = 0.0f32;
    let mut bad = false;
    for &x in row {
        bad |= !x.is_finite();
        lo = lo.min(x);
        hi = hi.max(x);
    }
    (!bad).then_some((lo, hi))
}

fn params_for(lo: f32, hi: f32, ty: ActType) -> QParams {
    match ty {
        ActType::AsymmetricU8 => asymmetric_params(lo, hi),
        ActType::SymmetricI8 => symmetric_params(hi.max(-lo)),
    }
}

/// Activations quantized for the kernels: `rows` rows of `kp` values (K padded with zeros to
/// the kernel's KR) of `a_bytes` bytes each, plus per-row scale and zero point.
#[derive(Clone, Debug)]
pub struct QuantizedActivations {
    /// Row-major, `rows_padded * row_bytes` bytes; rows past `m` and columns past `k` are 0.
    pub data: Vec<u8>,
    /// Values per row of `data` (>= k, a multiple of the kernel's KR).
    pub kp: usize,
    /// Bytes per row of `data`: `kp * a_bytes`.
    pub row_bytes: usize,
    /// Scale of each of the `m` rows.
    pub scales: Vec<f32>,
    /// Zero point of each of the `m` rows.
    pub zero_points: Vec<i32>,
}

/// Quantizes `m` rows of `k` values, row `i` starting at `a[i * lda]`, with the scalar
/// definitions. See [`quantize_activations_with`].
#[allow(clippy::too_many_arguments)]
pub fn quantize_activations(
    a: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    granularity: ActGranularity,
    ty: ActType,
    kp: usize,
    rows_padded: usize,
) -> Result<QuantizedActivations> {
    quantize_activations_with(&crate::kernels::scalar::OPS, 1, a, m, k, lda, granularity, ty, kp, rows_padded)
}

/// Quantizes `m` rows of `k` values, row `i` starting at `a[i * lda]`, with the row
/// operations of one kernel-table entry (all entries give identical results) into its
/// activation format (`a_bytes` per value, see `RowOps::quantize_row`).
///
/// `kp >= k` is the padded row length of the output and `rows_padded >= m` its row count.
/// Errors: [`Error::NonFinite`] naming the first non-finite element (in row order), or
/// [`Error::OutOfMemory`].
#[allow(clippy::too_many_arguments)]
pub fn quantize_activations_with<T: crate::dtype::Element>(
    ops: &RowOps,
    a_bytes: usize,
    a: &[T],
    m: usize,
    k: usize,
    lda: usize,
    granularity: ActGranularity,
    ty: ActType,
    kp: usize,
    rows_padded: usize,
) -> Result<QuantizedActivations> {
    quantize_activations_reusing(ops, a_bytes, a, m, k, lda, granularity, ty, kp, rows_padded, Vec::new())
}

/// [`quantize_activations_with`] into the allocation of `reuse` (for example the `data` of a
/// previous result), which saves allocating, and for large buffers mapping, a new one per call.
#[allow(clippy::too_many_arguments)]
pub fn quantize_activations_reusing<T: crate::dtype::Element>(
    ops: &RowOps,
    a_bytes: usize,
    a: &[T],
    m: usize,
    k: usize,
    lda: usize,
    granularity: ActGranularity,
    ty: ActType,
    kp: usize,
    rows_padded: usize,
    reuse: Vec<u8>,
) -> Result<QuantizedActivations> {
    quantize_activations_rows(
        ops,
        a_bytes,
        a,
        m,
        k,
        Rows::Strided(lda),
        None,
        granularity,
        ty,
        kp,
        rows_padded,
        reuse,
        &Exec::SERIAL,
    )
}

/// Appends row `src` to `buf` as f32, multiplied element by element by `smooth` when given.
fn extend_f32<T: crate::dtype::Element>(buf: &mut Vec<f32>, src: &[T], smooth: Option<&[f32]>) {
    match (smooth, T::as_f32(src)) {
        // A copy (the gathered rows of the head layout take this path).
        (None, Some(f)) => buf.extend_from_slice(f),
        (None, None) => buf.extend(src.iter().map(|v| v.to_f32())),
        (Some(s), Some(f)) => {
            // Sized up front, then one multiplication per element (vectorized).
            let start = buf.len();
            buf.resize(start + f.len(), 0.0);
            for ((o, v), m) in buf[start..].iter_mut().zip(f).zip(s) {
                *o = v * m;
            }
        }
        (Some(s), None) => buf.extend(src.iter().zip(s).map(|(v, f)| v.to_f32() * f)),
    }
}

/// Row `src` as f32, multiplied element by element by `smooth` when given (`buf` holds the
/// result unless the row is already f32 and unscaled).
fn smoothed_row<'a, T: crate::dtype::Element>(
    src: &'a [T],
    smooth: Option<&[f32]>,
    buf: &'a mut Vec<f32>,
) -> &'a [f32] {
    if let (None, Some(row)) = (smooth, T::as_f32(src)) {
        return row;
    }
    buf.clear();
    extend_f32(buf, src, smooth);
    buf
}

/// Where row `i` of A (its `k` values) lies in the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    /// At `a[i * lda..]`.
    Strided(usize),
    /// In the attention-head layout `[batch, heads, seq, k / heads]`: row `i = b * seq + s` is
    /// the `heads` runs `a[((b * heads + h) * seq + s) * d..][..d]`, `d = k / heads` (the
    /// `Transpose(perm = [0, 2, 1, 3])` and reshape to `[batch * seq, k]` that attention applies
    /// to its context before the output projection, fused into the read).
    Heads { heads: usize, seq: usize },
}

impl Rows {
    /// The index in A of element `col` of row `i`.
    #[inline]
    pub(crate) fn at(self, i: usize, col: usize, k: usize) -> usize {
        match self {
            Rows::Strided(lda) => i * lda + col,
            Rows::Heads { heads, seq } => {
                let d = k / heads;
                let (b, s) = (i / seq, i % seq);
                ((b * heads + col / d) * seq + s) * d + col % d
            }
        }
    }

    /// The elements A must hold for `m` rows of `k` values.
    pub(crate) fn extent(self, m: usize, k: usize) -> usize {
        match self {
            _ if m == 0 => 0,
            Rows::Strided(lda) => (m - 1) * lda + k,
            Rows::Heads { .. } => m * k,
        }
    }

    /// Appends row `i` to `buf` as f32, multiplied by `smooth` when given.
    fn extend<T: crate::dtype::Element>(self, buf: &mut Vec<f32>, a: &[T], i: usize, k: usize, smooth: Option<&[f32]>) {
        match self {
            Rows::Strided(lda) => extend_f32(buf, &a[i * lda..i * lda + k], smooth),
            Rows::Heads { heads, .. } => {
                let d = k / heads;
                for h in 0..heads {
                    let start = self.at(i, h * d, k);
                    extend_f32(buf, &a[start..start + d], smooth.map(|s| &s[h * d..(h + 1) * d]));
                }
            }
        }
    }
}

/// Elements of A below which quantizing on more than one worker does not pay.
const MIN_PARALLEL_ELEMENTS: usize = 1 << 16;

/// [`quantize_activations_with`] on the workers of `exec`, each taking a
/// contiguous range of rows (per-row ranges: one pass, each row's range then its quantization;
/// per-tensor: a pass for the ranges, then one to quantize). Every row is computed by the same
/// operations whatever the split, so the result does not depend on the workers.
///
/// Row `i` lies where `rows` says (every layout gives the bytes of the same values at a
/// stride).
#[allow(clippy::too_many_arguments)]
pub(crate) fn quantize_activations_rows<T: crate::dtype::Element>(
    ops: &RowOps,
    a_bytes: usize,
    a: &[T],
    m: usize,
    k: usize,
    rows: Rows,
    smooth: Option<&[f32]>,
    granularity: ActGranularity,
    ty: ActType,
    kp: usize,
    rows_padded: usize,
    reuse: Vec<u8>,
    exec: &Exec<'_>,
) -> Result<QuantizedActivations> {
    use std::sync::Mutex;
    assert!(kp >= k && rows_padded >= m);
    match rows {
        Rows::Strided(lda) => assert!(lda >= k),
        Rows::Heads { heads, seq } => assert!(heads > 0 && k.is_multiple_of(heads) && seq > 0 && m.is_multiple_of(seq)),
    }
    assert!(smooth.is_none_or(|s| s.len() == k));
    assert!(a.len() >= rows.extent(m, k));
    // Rows at a stride can be read where they are; gathered rows go through `conv`.
    let lda = match rows {
        Rows::Strided(lda) => Some(lda),
        Rows::Heads { .. } => None,
    };
    let tasks = if m.saturating_mul(k) >= MIN_PARALLEL_ELEMENTS { exec.threads().clamp(1, m.max(1)) } else { 1 };
    let rows_per = m.div_ceil(tasks).max(1);
    let row_bytes = crate::error::checked_mul(kp, a_bytes, "quantized activation row")?;
    let len = crate::error::checked_mul(rows_padded, row_bytes, "quantized activation buffer")?;
    // `reuse` (a previous call's buffer) saves the allocation and zeroing: every byte of the
    // result is written below (each row's values and K padding, and the rows past m).
    let mut data = crate::error::try_resize_reused::<u8>(reuse, len, "quantized activation buffer")?;
    data[m * row_bytes..].fill(0);
    let mut params = vec![QParams { scale: 0.0, zero_point: 0 }; m];
    // Smoothed f32 rows go to the ISA's scaled row operations when it has them (the products
    // are never written out); otherwise they are multiplied into a buffer first.
    // `(factors, operations, A as f32)`.
    let scaled = match (smooth, ops.scaled, T::as_f32(a), lda) {
        (Some(s), Some(so), Some(af), Some(_)) => Some((s, so, af)),
        _ => None,
    };
    // Quantizes a row into `out` (its `row_bytes` bytes: `k * a_bytes` values, then zeros):
    // `row` is already smoothed, or is A's own row when `scaled`.
    let quantize = |row: &[f32], p: QParams, out: &mut [u8]| {
        let (out, pad) = out.split_at_mut(k * a_bytes);
        pad.fill(0);
        if p.scale == 0.0 {
            // Every byte of each value (a_bytes = 2 holds it little-endian).
            for v in out.chunks_exact_mut(a_bytes) {
                v.fill(0);
                v[0] = p.zero_point as u8;
            }
        } else if let Some((sm, so, _)) = scaled {
            // SAFETY: as below; `sm` has k = row.len() values.
            unsafe { (so.quantize_row)(row, sm, p.scale, p.zero_point, ty, out) };
        } else {
            // SAFETY: `ops` comes from a kernel-table entry whose ISA was resolved for this
            // CPU (packed weights exist only for such entries) or is the scalar table.
            unsafe { (ops.quantize_row)(row, p.scale, p.zero_point, ty, out) };
        }
    };
    let per_row = granularity == ActGranularity::PerRow;

    // Pass 1: the range of every row; a task stops at its first non-finite row. With per-row
    // ranges the row is quantized right away, while it is still in L1: one pass over A.
    let mut stats = vec![(0f32, 0f32); m];
    let bad: Mutex<Option<(usize, usize, f32)>> = Mutex::new(None);
    {
        type Chunk<'c> = (&'c mut [(f32, f32)], &'c mut [QParams], &'c mut [u8]);
        let chunks: Vec<Mutex<Chunk<'_>>> = stats
            .chunks_mut(rows_per)
            .zip(params.chunks_mut(rows_per))
            .zip(data.chunks_mut(rows_per * row_bytes))
            .map(|((s, p), d)| Mutex::new((s, p, d)))
            .collect();
        exec.run(chunks.len(), |c| {
            let mut guard = chunks[c].lock().unwrap_or_else(|e| e.into_inner());
            let (st, ps, out) = &mut *guard;
            // Rows go in small blocks: the ranges of the block, then its parameters, then its
            // quantization. A row's range ends in a reduction and its parameters in divisions,
            // a chain of latencies that one row at a time would leave exposed (it costs as much
            // as quantizing a row of a few hundred values); a block's rows are independent and
            // overlap. A block is kept small enough to stay in L1 for the second read. Rows
            // that are not f32 already, or are smoothed without scaled row operations, are
            // converted once into `conv`.
            let block = (16 * 1024 / (k * 4).max(1)).clamp(1, 8);
            // A itself when its rows can be read as they are (unsmoothed, or smoothed by the
            // scaled row operations).
            let direct = match (scaled, lda) {
                (Some((.., af)), Some(lda)) => Some((af, lda)),
                (None, Some(lda)) if smooth.is_none() => T::as_f32(a).map(|af| (af, lda)),
                _ => None,
            };
            // Row r of this task is bad: the first non-finite element goes to `bad` (the caller
            // reports the lowest row of all tasks), and the task stops.
            let report = |r: usize, row: &[f32]| {
                let i = c * rows_per + r;
                let col = match scaled {
                    Some((sm, ..)) => row.iter().zip(sm).position(|(x, f)| !(x * f).is_finite()),
                    None => row.iter().position(|x| !x.is_finite()),
                }
                .unwrap_or(0);
                let mut b = bad.lock().unwrap_or_else(|e| e.into_inner());
                if b.is_none_or(|(bi, _, _)| i < bi) {
                    *b = Some((i, col, a[rows.at(i, col, k)].to_f32()));
                }
            };
            // Per-row f32 rows read in place, with an ISA that quantizes a row and takes the range
            // of another in one loop: row r is quantized while the range of row r + 2 is taken,
            // so the reads of A (from L2 or L3 for most layers) overlap the quantization's
            // arithmetic, and the parameters of row r + 1 are computed meanwhile. The same
            // operations on every value as the blocks below, so the same bytes.
            if let (true, Some(fused), Some((af, lda)), None) = (per_row, ops.quantize_and_stats, direct, scaled) {
                let n = st.len();
                let row = |r: usize| {
                    let i = c * rows_per + r;
                    &af[i * lda..i * lda + k]
                };
                for r in 0..n.min(2) {
                    // SAFETY: as in `quantize`.
                    match unsafe { (ops.row_stats)(row(r)) } {
                        Some(s) => st[r] = s,
                        None => return report(r, row(r)),
                    }
                }
                if n > 0 {
                    ps[0] = params_for(st[0].0, st[0].1, ty);
                }
                for r in 0..n {
                    if r + 1 < n {
                        ps[r + 1] = params_for(st[r + 1].0, st[r + 1].1, ty);
                    }
                    let (p, ahead) = (ps[r], r + 2);
                    let dst = &mut out[r * row_bytes..(r + 1) * row_bytes];
                    let range = if ahead >= n {
                        quantize(row(r), p, dst);
                        continue;
                    } else if p.scale == 0.0 {
                        // (The row operations want a positive scale.)
                        quantize(row(r), p, dst);
                        // SAFETY: as in `quantize`.
                        unsafe { (ops.row_stats)(row(ahead)) }
                    } else {
                        let (dst, pad) = dst.split_at_mut(k * a_bytes);
                        pad.fill(0);
                        // SAFETY: as in `quantize` (a positive scale; `row(r)` and `row(ahead)`
                        // have k values, `dst` k values of a_bytes bytes).
                        unsafe { fused(row(r), p.scale, p.zero_point, ty, dst, row(ahead)) }
                    };
                    match range {
                        Some(s) => st[ahead] = s,
                        None => return report(ahead, row(ahead)),
                    }
                }
                return;
            }
            let mut conv: Vec<f32> = Vec::new();
            let mut r0 = 0;
            while r0 < st.len() {
                let r1 = (r0 + block).min(st.len());
                if direct.is_none() {
                    conv.clear();
                    for r in r0..r1 {
                        rows.extend(&mut conv, a, c * rows_per + r, k, smooth);
                    }
                }
                let row_of = |r: usize| -> &[f32] {
                    let i = c * rows_per + r;
                    match direct {
                        Some((af, lda)) => &af[i * lda..i * lda + k],
                        None => &conv[(r - r0) * k..(r - r0 + 1) * k],
                    }
                };
                for r in r0..r1 {
                    let row = row_of(r);
                    let stats = match scaled {
                        // SAFETY: as in `quantize`; `sm` has k values.
                        Some((sm, so, _)) => unsafe { (so.row_stats)(row, sm) },
                        // SAFETY: as in `quantize`.
                        None => unsafe { (ops.row_stats)(row) },
                    };
                    match stats {
                        Some(s) => st[r] = s,
                        None => return report(r, row),
                    }
                }
                if per_row {
                    for r in r0..r1 {
                        ps[r] = params_for(st[r].0, st[r].1, ty);
                    }
                    for r in r0..r1 {
                        quantize(row_of(r), ps[r], &mut out[r * row_bytes..(r + 1) * row_bytes]);
                    }
                }
                r0 = r1;
            }
        })?;
    }
    if let Some((i, col, v)) = bad.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(Error::NonFinite(match smooth {
            Some(s) if v.is_finite() => format!(
                "activation A[{i}][{col}] = {v:e} times its smoothing factor {} overflows; scaled activations must be finite",
                s[col]
            ),
            _ => format!("activation A[{i}][{col}] is {v}; activations must be finite"),
        }));
    }

    // Pass 2 (per-tensor ranges only): quantize every row with the parameters of the whole.
    if !per_row {
        let (lo, hi) = stats.iter().fold((0.0f32, 0.0f32), |(l, h), &(lo, hi)| (l.min(lo), h.max(hi)));
        let p = params_for(lo, hi, ty);
        params.fill(p);
        let chunks: Vec<Mutex<&mut [u8]>> = data.chunks_mut(rows_per * row_bytes).map(Mutex::new).collect();
        exec.run(tasks.min(chunks.len()), |c| {
            let mut chunk = chunks[c].lock().unwrap_or_else(|e| e.into_inner());
            let mut buf = Vec::new();
            for r in 0..rows_per {
                let i = c * rows_per + r;
                if i >= m {
                    break;
                }
                let out = &mut chunk[r * row_bytes..(r + 1) * row_bytes];
                match (scaled, lda) {
                    (Some((.., af)), Some(lda)) => quantize(&af[i * lda..i * lda + k], p, out),
                    (None, Some(lda)) => quantize(smoothed_row(&a[i * lda..i * lda + k], smooth, &mut buf), p, out),
                    _ => {
                        buf.clear();
                        rows.extend(&mut buf, a, i, k, smooth);
                        quantize(&buf, p, out)
                    }
                }
            }
        })?;
    }
    Ok(QuantizedActivations {
        data,
        kp,
        row_bytes,
        scales: params.iter().map(|p| p.scale).collect(),
        zero_points: params.iter().map(|p| p.zero_point).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onnx_formula_simple() {
        // ONNX DynamicQuantizeLinear doc example: [0, 2, -3, -2.5, 1.34, 0.5]
        let x = [0.0f32, 2.0, -3.0, -2.5, 1.34, 0.5];
        let q = quantize_activations(&x, 1, 6, 6, ActGranularity::PerTensor, ActType::AsymmetricU8, 6, 1).unwrap();
        assert_eq!(q.scales[0], 5.0f32 / 255.0);
        assert_eq!(q.zero_points[0], 153);
        assert_eq!(q.data, vec![153, 255, 0, 26, 221, 179]); // as numpy computes the ONNX formula
    }

    #[test]
    fn zero_row_and_symmetric() {
        let x = [0.0f32; 4];
        let q = quantize_activations(&x, 1, 4, 4, ActGranularity::PerRow, ActType::AsymmetricU8, 4, 1).unwrap();
        assert_eq!((q.scales[0], q.zero_points[0]), (0.0, 0));
        assert_eq!(q.data, vec![0; 4]);
        let x = [1.0f32, -2.0, 0.5, 2.0];
        let q = quantize_activations(&x, 1, 4, 4, ActGranularity::PerRow, ActType::SymmetricI8, 4, 1).unwrap();
        assert_eq!(q.zero_points[0], 128);
        assert_eq!(q.data, vec![128 + 64, 128 - 127, 128 + 32, 128 + 127]);
    }

    /// Two bytes per value (little-endian u16), as the AVX2 kernel's row operations write them.
    unsafe fn quantize_row_u16(x: &[f32], scale: f32, zero_point: i32, ty: ActType, out: &mut [u8]) {
        for (o, &v) in out.chunks_exact_mut(2).zip(x) {
            o[0] = quantize_value(v, QParams { scale, zero_point }, ty);
            o[1] = 0;
        }
    }

    /// A reused buffer full of stale bytes gives exactly the fresh result: every byte (values,
    /// both bytes of 2-byte values, zero rows, K padding, rows past m) is written, in both
    /// modes, whether the buffer shrinks or grows.
    #[test]
    fn reused_buffer_is_fully_overwritten() {
        let (m, k, kp, rows_padded) = (5, 13, 16, 8);
        let mut a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3).collect();
        a[2 * k..3 * k].fill(0.0); // a zero row: scale 0, every value the zero point
        let scalar = &crate::kernels::scalar::OPS;
        let ops16 = RowOps { quantize_row: quantize_row_u16, ..*scalar };
        for (ops, a_bytes) in [(scalar, 1), (&ops16, 2)] {
            for g in [ActGranularity::PerRow, ActGranularity::PerTensor] {
                for t in [ActType::AsymmetricU8, ActType::SymmetricI8] {
                    let len = rows_padded * kp * a_bytes;
                    let fresh = quantize_activations_with(ops, a_bytes, &a, m, k, k, g, t, kp, rows_padded).unwrap();
                    for stale_len in [0, 7, len, 3 * len] {
                        let mut stale = vec![0xABu8; stale_len];
                        stale.reserve(len);
                        let q = quantize_activations_rows(
                            ops,
                            a_bytes,
                            &a,
                            m,
                            k,
                            Rows::Strided(k),
                            None,
                            g,
                            t,
                            kp,
                            rows_padded,
                            stale,
                            &Exec::SERIAL,
                        )
                        .unwrap();
                        assert_eq!(
                            q.data, fresh.data,
                            "{a_bytes} bytes, {g:?} {t:?}, stale buffer of {stale_len} bytes"
                        );
                    }
                }
            }
        }
    }

    /// The rows of an ISA whose row operations quantize one row while taking the range of
    /// the next (`RowOps::quantize_and_stats`, the AVX-512 entry) give the bytes, scales, zero
    /// points and errors of the scalar definition: tails of every length, K padding, strides,
    /// zero rows (scale 0) at every position of the pipeline, NaN and infinities in the first
    /// rows, the middle and the last, and 1-3 workers (each of which starts its own pipeline).
    #[test]
    fn fused_quantize_and_stats_matches_the_definition() {
        // (row operations, bytes per value): every kernel's the CPU runs, and the AVX2 u8
        // operations of the AVX-VNNI kernel, which the CPU may lack.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut fused: Vec<(&RowOps, usize)> = crate::isa::Isa::ALL
            .into_iter()
            .filter(|i| crate::isa::resolve(*i).is_ok())
            .filter_map(crate::kernels::kernel_for)
            .map(|kern| (kern.ops, kern.a_bytes))
            .filter(|(ops, _)| ops.quantize_and_stats.is_some())
            .collect();
        #[cfg(target_arch = "x86_64")]
        if crate::isa::Isa::Avx2.is_supported() {
            fused.push((&crate::kernels::avx2::OPS_U8, 1));
        }
        if fused.is_empty() {
            eprintln!("SKIPPED: no row operations with quantize_and_stats on this CPU");
            return;
        }
        let scalar = &crate::kernels::scalar::OPS;
        let scalar16 = RowOps { quantize_row: quantize_row_u16, ..*scalar };
        let mut seed = 0x9E37_79B9u32;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for (ops, a_bytes) in fused {
            let reference = if a_bytes == 2 { &scalar16 } else { scalar };
            for &k in &[1usize, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 130, 384] {
                for &m in &[1usize, 2, 3, 4, 7, 12] {
                    let lda = k + (rnd() % 3) as usize;
                    let kp = k.next_multiple_of(4) + 4 * (rnd() % 2) as usize;
                    let base: Vec<f32> =
                        (0..m * lda).map(|_| (rnd() >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 3.0).collect();
                    let mut cases = vec![base.clone()];
                    for zero_row in [0, 1.min(m - 1), m / 2, m - 1] {
                        let mut a = base.clone();
                        a[zero_row * lda..zero_row * lda + k].fill(0.0);
                        cases.push(a);
                    }
                    for (bad_row, bad) in
                        [(0, f32::NAN), (1.min(m - 1), f32::INFINITY), (m - 1, f32::NEG_INFINITY), (m / 2, f32::NAN)]
                    {
                        let mut a = base.clone();
                        a[bad_row * lda + (rnd() as usize % k)] = bad;
                        cases.push(a);
                    }
                    for a in &cases {
                        for t in [ActType::AsymmetricU8, ActType::SymmetricI8] {
                            let want = quantize_activations_with(
                                reference,
                                a_bytes,
                                a,
                                m,
                                k,
                                lda,
                                ActGranularity::PerRow,
                                t,
                                kp,
                                m + 1,
                            );
                            for workers in 1..=3 {
                                let exec = Exec::on_pool(workers);
                                let got = quantize_activations_rows(
                                    ops,
                                    a_bytes,
                                    a,
                                    m,
                                    k,
                                    Rows::Strided(lda),
                                    None,
                                    ActGranularity::PerRow,
                                    t,
                                    kp,
                                    m + 1,
                                    Vec::new(),
                                    &exec,
                                );
                                let what =
                                    format!("m={m} k={k} lda={lda} kp={kp} {t:?} workers={workers} a_bytes={a_bytes}");
                                match (&want, &got) {
                                    (Ok(w), Ok(g)) => {
                                        assert_eq!(w.data, g.data, "{what}");
                                        assert_eq!(w.scales, g.scales, "{what}");
                                        assert_eq!(w.zero_points, g.zero_points, "{what}");
                                    }
                                    (Err(w), Err(g)) => assert_eq!(w.message(), g.message(), "{what}"),
                                    _ => panic!("{what}: {:?} against {:?}", want.as_ref().err(), got.as_ref().err()),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn huge_range_does_not_overflow() {
        let x = [f32::MAX, -f32::MAX];
        let q = quantize_activations(&x, 1, 2, 2, ActGranularity::PerRow, ActType::AsymmetricU8, 2, 1).unwrap();
        assert!(q.scales[0].is_finite() && q.scales[0] > 0.0);
        assert_eq!(q.data[0], 255);
        assert_eq!(q.data[1], 0);
    }

    #[test]
    fn non_finite_is_located() {
        let x = [1.0f32, 2.0, 3.0, 4.0, f32::NAN, 6.0];
        let e = quantize_activations(&x, 2, 3, 3, ActGranularity::PerRow, ActType::AsymmetricU8, 4, 2).unwrap_err();
        assert_eq!(e.status(), crate::Status::NonFinite);
        assert!(e.message().contains("A[1][1]"), "{}", e.message());
    }

    #[test]
    fn padding_is_zero_and_stride_respected() {
        let x = [1.0f32, 2.0, 99.0, 3.0, 4.0, 99.0];
        let q = quantize_activations(&x, 2, 2, 3, ActGranularity::PerRow, ActType::AsymmetricU8, 4, 3).unwrap();
        assert_eq!(q.data.len(), 12);
        assert_eq!(&q.data[2..4], &[0, 0]);
        assert_eq!(&q.data[8..12], &[0, 0, 0, 0]);
        assert_eq!(q.data[1], 255);
        assert_eq!(q.data[5], 255);
    }
}
