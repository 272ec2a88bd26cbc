//! Packed weights: the int8 weights of one linear layer in the layout of one kernel, with
//! everything the GEMM needs precomputed (per-channel scales and column sums).
//!
//! A `PackedWeights` records the kernel (ISA, tile geometry, layout version) it was packed
//! for; the GEMM always runs that kernel, so data and kernel cannot mismatch. It is immutable
//! once built, hence `Send + Sync`: one handle serves any number of threads at once.

pub mod serialize;

use crate::error::{advise_huge_pages, checked_mul, try_zeroed_vec, try_zeroed_vec_advised, Error, Result};
use crate::isa::{self, Isa};
use crate::kernels::{kernel_for, Kernel};
use crate::quant::weights::{check_finite, check_qmax, check_scales, quantize_weights, WEIGHT_QMAX};
use crate::quant::{WeightGranularity, MAX_K};

/// Memory layout of the weight matrix given to the packing functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// `[N][K]` row-major: one row per output channel. PyTorch `Linear.weight`, ONNX `Gemm`
    /// with `transB = 1`.
    NK,
    /// `[K][N]` row-major: one row per input feature. ONNX `MatMul`, `Gemm` with `transB = 0`.
    KN,
}

impl WeightLayout {
    /// The C ABI value (`dynq_weight_layout`).
    pub fn to_raw(self) -> u32 {
        match self {
            WeightLayout::NK => 0,
            WeightLayout::KN => 1,
        }
    }
    /// From the C ABI value.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(WeightLayout::NK),
            1 => Some(WeightLayout::KN),
            _ => None,
        }
    }
    /// Index of `W[n][k]` (output channel n, input k) in a buffer of this layout.
    #[inline(always)]
    fn index(self, n: usize, k: usize, dim_n: usize, dim_k: usize) -> usize {
        match self {
            WeightLayout::NK => n * dim_k + k,
            WeightLayout::KN => k * dim_n + n,
        }
    }
}

/// Options for packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackOptions {
    /// Weight scale granularity for f32 weights (ignored for pre-quantized weights, whose
    /// granularity follows the number of scales given).
    pub granularity: WeightGranularity,
    /// Force a kernel family; `None` uses [`isa::active`].
    pub isa: Option<Isa>,
    /// Largest quantized magnitude for f32 weights, 1..=127 (ignored for pre-quantized
    /// weights): 127 by default; 64 (ONNX Runtime's `reduce_range`) halves the resolution and
    /// lets AVX2 CPUs without VNNI run a faster kernel, with the same results on every CPU.
    pub weight_qmax: u8,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions { granularity: WeightGranularity::PerChannel, isa: None, weight_qmax: WEIGHT_QMAX }
    }
}

/// Int8 weights packed for one kernel.
#[derive(Clone, Debug)]
pub struct PackedWeights {
    n: usize,
    k: usize,
    granularity: WeightGranularity,
    /// One scale per output channel (a per-tensor scale is repeated).
    scales: Vec<f32>,
    /// `colsum[n] = sum_k qw[n][k]`, for the activation zero-point correction.
    col_sums: Vec<i32>,
    kernel: &'static Kernel,
    data: AlignedI8,
}

/// One cache line of packed weights; a `Vec` of them starts on a 64-byte boundary.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

impl Default for Line {
    fn default() -> Self {
        Line([0; 64])
    }
}

/// Zeroed int8 storage whose first byte is 64-byte aligned, so that every panel of a kernel
/// (a multiple of 64 bytes) starts on a cache line and no full-width vector load of the weight
/// stream straddles two lines. With the 16-byte alignment `malloc` gives, each zmm load of a
/// panel touched two lines: the AVX-512 micro-kernel ran at 571 GOPS against 658 aligned
/// (K = 640, one tile, interleaved runs), 600 against 695 at K = 3072.
///
/// Buffers of several MiB are also asked to be backed by 2 MiB pages (see
/// [`advise_huge_pages`]).
struct AlignedI8 {
    lines: Vec<Line>,
    len: usize,
}

impl Clone for AlignedI8 {
    fn clone(&self) -> Self {
        // A fresh buffer (advised like the first) rather than `Vec::clone`, which writes its
        // pages before any advice could be given.
        let mut copy = AlignedI8::zeroed(self.len).expect("memory for a copy of the packed weights");
        let lines = copy.lines.len(); // `self` may hold more storage than its length needs
        copy.lines.copy_from_slice(&self.lines[..lines]);
        copy
    }
}

impl AlignedI8 {
    fn zeroed(len: usize) -> Result<Self> {
        Ok(AlignedI8 {
            lines: try_zeroed_vec_advised::<Line>(len.div_ceil(64), "packed weights", advise_huge_pages)?,
            len,
        })
    }
    fn capacity(&self) -> usize {
        self.lines.capacity() * 64
    }
    /// Shortens the visible length (the storage stays).
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for AlignedI8 {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `Line` is `repr(C)` over `[i8; 64]` (no padding), so the vector holds
        // `64 * lines.len() >= len` initialized bytes, contiguous, borrowed for `&self`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<i8>(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedI8 {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as in `deref`, borrowed mutably for `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<i8>(), self.len) }
    }
}

impl std::fmt::Debug for AlignedI8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedI8({} bytes)", self.len)
    }
}

/// Memory reserved for packing an `n x k` matrix, obtained before any input is read so that a
/// size that cannot be allocated is reported as such (and the C ABI never builds a slice over
/// an input it cannot process).
pub struct Reservation {
    n: usize,
    k: usize,
    kernel: &'static Kernel,
    /// Whether packing may pick the kernel's narrow-weight entry ([`Kernel::narrow`]) when
    /// the weights allow it (`data` has room for either layout then).
    allow_narrow: bool,
    canonical: Vec<i8>,
    data: AlignedI8,
}

/// Validates the shape of a weight matrix.
fn check_shape(n: usize, k: usize) -> Result<()> {
    if n == 0 || k == 0 {
        return Err(Error::InvalidArgument(format!("weight shape n={n} x k={k}: both dimensions must be at least 1")));
    }
    if k > MAX_K {
        return Err(Error::Unsupported(format!(
            "k={k} exceeds the maximum reduction length {MAX_K} for which int32 accumulation is \
             exact; split the layer along K"
        )));
    }
    let bytes = checked_mul(checked_mul(n, k, "weight elements n * k")?, 4, "weight bytes n * k * 4")?;
    // No buffer can be larger than isize::MAX bytes: refuse such a shape as an overflow before
    // trying to allocate anything for it (found by fuzz/fuzz_targets/ffi.rs).
    if bytes > isize::MAX as usize {
        return Err(Error::SizeOverflow(format!(
            "weight shape n={n} x k={k}: n * k * 4 = {bytes} bytes exceed the address space"
        )));
    }
    Ok(())
}

impl Reservation {
    /// Validates the shape, selects the kernel and allocates the packed storage.
    pub fn new(n: usize, k: usize, isa: Option<Isa>) -> Result<Self> {
        check_shape(n, k)?;
        let isa = isa::select(isa)?;
        Self::with_kernel(n, k, kernel_for(isa).expect("resolve() guarantees a kernel"), true)
    }

    /// Storage for exactly this kernel, a table entry or one that is not (the stand-in of an
    /// ISA this CPU lacks, `kernels::stand_in_for`, which `dynq bench` measures), never its
    /// narrow-weight entry. The CPU must run the ISA the kernel names; a kernel with a
    /// [`Kernel::weight_pair_limit`] refuses weights beyond it when they are filled in. The
    /// weights then work like any others (a GEMM runs the kernel they are packed for;
    /// serialized, they hold no trace of it).
    #[doc(hidden)]
    pub fn for_kernel(n: usize, k: usize, kernel: &'static Kernel) -> Result<Self> {
        check_shape(n, k)?;
        isa::resolve(kernel.isa)?;
        Self::with_kernel(n, k, kernel, false)
    }

    fn with_kernel(n: usize, k: usize, kernel: &'static Kernel, allow_narrow: bool) -> Result<Self> {
        let overflow = || Error::SizeOverflow(format!("packed size of n={n} x k={k} overflows usize"));
        let mut len = kernel.packed_len(n, k).ok_or_else(overflow)?;
        let narrow = kernel.narrow.filter(|_| allow_narrow);
        if let Some(nk) = narrow {
            len = len.max(nk.packed_len(n, k).ok_or_else(overflow)?);
        }
        let data = AlignedI8::zeroed(len)?;
        let canonical = try_zeroed_vec::<i8>(n * k, "quantized weights")?;
        Ok(Reservation { n, k, kernel, allow_narrow: narrow.is_some(), canonical, data })
    }

    /// Number of f32 (or int8) elements the input must have: `n * k`.
    pub fn input_len(&self) -> usize {
        self.n * self.k
    }

    /// Quantizes f32 weights to [-qmax, qmax] and packs them. `w.len()` must be `n * k`.
    pub fn fill_f32(
        mut self,
        w: &[f32],
        layout: WeightLayout,
        granularity: WeightGranularity,
        qmax: u8,
    ) -> Result<PackedWeights> {
        check_qmax(qmax)?;
        let (n, k) = (self.n, self.k);
        if w.len() != n * k {
            return Err(Error::InvalidArgument(format!("weights have {} values, expected n * k = {}", w.len(), n * k)));
        }
        let idx = |nn, kk| layout.index(nn, kk, n, k);
        check_finite(w, n, k, idx)?;
        let scales = quantize_weights(w, n, k, idx, granularity, qmax, &mut self.canonical);
        self.finish(scales, granularity)
    }

    /// Packs already-quantized int8 weights with their scales (1 scale: per tensor; n scales:
    /// per channel). `q.len()` must be `n * k`.
    pub fn fill_quantized(mut self, q: &[i8], layout: WeightLayout, scales: &[f32]) -> Result<PackedWeights> {
        let (n, k) = (self.n, self.k);
        if q.len() != n * k {
            return Err(Error::InvalidArgument(format!(
                "quantized weights have {} values, expected n * k = {}",
                q.len(),
                n * k
            )));
        }
        let granularity = if scales.len() == n {
            WeightGranularity::PerChannel
        } else if scales.len() == 1 {
            WeightGranularity::PerTensor
        } else {
            return Err(Error::InvalidArgument(format!(
                "number of weight scales is {}; expected 1 (per tensor) or n = {n} (per channel)",
                scales.len()
            )));
        };
        check_scales(scales)?;
        match layout {
            WeightLayout::NK => self.canonical.copy_from_slice(q),
            WeightLayout::KN => {
                for nn in 0..n {
                    for kk in 0..k {
                        self.canonical[nn * k + kk] = q[kk * n + nn];
                    }
                }
            }
        }
        self.finish(scales.to_vec(), granularity)
    }

    fn finish(mut self, scales: Vec<f32>, granularity: WeightGranularity) -> Result<PackedWeights> {
        let (n, k) = (self.n, self.k);
        // The weights are checked once: for the narrow entry when it may be picked, else for the
        // kernel asked for (which refuses them if it has a limit they exceed).
        let kernel = match self.kernel.narrow {
            Some(nk) if self.allow_narrow && nk.accepts_weights(&self.canonical, k) => nk,
            _ if self.kernel.accepts_weights(&self.canonical, k) => self.kernel,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "kernel {} is exact only for weights whose K pairs have |w[2j]| + |w[2j+1]| <= {}, \
                     and these weights exceed that",
                    self.kernel.name,
                    self.kernel.weight_pair_limit.unwrap_or(0)
                )))
            }
        };
        let len = kernel.packed_len(n, k).expect("checked when reserved");
        self.data.truncate(len);
        (kernel.pack)(&self.canonical, n, k, &mut self.data);
        let col_sums = self.canonical.chunks_exact(k).map(|row| row.iter().map(|&v| v as i32).sum()).collect();
        let scales = if scales.len() == n { scales } else { vec![scales[0]; n] };
        Ok(PackedWeights { n, k, granularity, scales, col_sums, kernel, data: self.data })
    }
}

impl PackedWeights {
    /// Quantizes f32 weights (`n` output channels, `k` inputs, in `layout`) to symmetric int8
    /// and packs them for the selected kernel. NaN or infinite weights are refused.
    pub fn from_f32(w: &[f32], n: usize, k: usize, layout: WeightLayout, opts: PackOptions) -> Result<Self> {
        Reservation::new(n, k, opts.isa)?.fill_f32(w, layout, opts.granularity, opts.weight_qmax)
    }

    /// Packs weights quantized elsewhere: int8 values (all of [-128, 127] accepted) and their
    /// scales, `W ~= scale * q`. `opts.granularity` is ignored (it follows `scales.len()`).
    pub fn from_quantized(
        q: &[i8],
        n: usize,
        k: usize,
        layout: WeightLayout,
        scales: &[f32],
        opts: PackOptions,
    ) -> Result<Self> {
        Reservation::new(n, k, opts.isa)?.fill_quantized(q, layout, scales)
    }

    /// The same weights packed for another ISA (validated against the CPU).
    pub fn repack(&self, isa: Isa) -> Result<Self> {
        let q = self.quantized_weights();
        let mut pw =
            Reservation::new(self.n, self.k, Some(isa))?.fill_quantized(&q, WeightLayout::NK, self.source_scales())?;
        pw.granularity = self.granularity; // n = 1: one scale fits both granularities
        Ok(pw)
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
    /// Inputs per output channel.
    pub fn k(&self) -> usize {
        self.k
    }
    /// Scale granularity.
    pub fn granularity(&self) -> WeightGranularity {
        self.granularity
    }
    /// The ISA whose kernel these weights are packed for.
    pub fn isa(&self) -> Isa {
        self.kernel.isa
    }
    /// The kernel-table entry these weights are packed for.
    pub fn kernel(&self) -> &'static Kernel {
        self.kernel
    }
    /// Per-output-channel scales (length n).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    /// The scales as given or computed: 1 for per-tensor, n for per-channel.
    pub fn source_scales(&self) -> &[f32] {
        match self.granularity {
            WeightGranularity::PerTensor => &self.scales[..1],
            WeightGranularity::PerChannel => &self.scales,
        }
    }
    /// Per-output-channel sums of the int8 weights.
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums
    }
    /// The packed int8 data in the kernel's layout.
    pub fn packed_data(&self) -> &[i8] {
        &self.data
    }
    /// Heap bytes held by this object (packed data, scales, column sums).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.data.capacity() + self.scales.capacity() * 4 + self.col_sums.capacity() * 4
    }
    /// The canonical int8 weights, `[N][K]` row-major.
    pub fn quantized_weights(&self) -> Vec<i8> {
        let mut q = vec![0i8; self.n * self.k];
        (self.kernel.unpack)(&self.data, self.n, self.k, &mut q);
        q
    }
    /// Dequantized weights `scale[n] * q[n][k]`, `[N][K]` row-major.
    pub fn dequantized_weights(&self) -> Vec<f32> {
        let q = self.quantized_weights();
        q.chunks_exact(self.k).zip(&self.scales).flat_map(|(row, &s)| row.iter().map(move |&v| v as f32 * s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every panel starts on a cache line (the micro-kernels' full-width loads never straddle
    /// two), for every kernel this CPU runs, also after a clone.
    #[test]
    fn packed_data_is_cache_line_aligned() {
        for isa in Isa::ALL.into_iter().filter(|i| crate::isa::resolve(*i).is_ok()) {
            // (Miri runs this test too: small shapes there.)
            let shapes: &[(usize, usize)] =
                if cfg!(miri) { &[(1, 1), (5, 7), (50, 9)] } else { &[(1, 1), (5, 7), (97, 300), (256, 768)] };
            for &(n, k) in shapes {
                let w: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 - 8.0).collect();
                let opts = PackOptions { isa: Some(isa), ..Default::default() };
                let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, opts).unwrap();
                let kern = pw.kernel();
                let panel = kern.nr * kern.padded_k(k);
                for p in [pw.clone(), pw] {
                    let data = p.packed_data();
                    assert_eq!(data.as_ptr() as usize % 64, 0, "{isa:?} {n}x{k}");
                    assert_eq!(data.len(), n.div_ceil(kern.nr) * panel);
                    if panel.is_multiple_of(64) {
                        assert!(data.chunks(panel).all(|c| (c.as_ptr() as usize).is_multiple_of(64)));
                    }
                }
            }
        }
    }

    /// Large packed weights (and their clones) are advised for transparent huge pages: the
    /// 2 MiB-aligned part of the buffer is a mapping of its own whose flags include `hg`
    /// (MADV_HUGEPAGE), read from /proc/self/smaps. Whether the kernel then finds free huge
    /// pages is its business; the advice is what dynq controls.
    #[cfg(all(target_os = "linux", not(miri)))]
    #[test]
    fn large_packed_weights_are_advised_for_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !thp.contains("[always]") && !thp.contains("[madvise]") {
            eprintln!("SKIPPED: huge-page advice: transparent huge pages are off here ({})", thp.trim());
            return;
        }
        // The mapping of /proc/self/smaps that holds `addr`, and whether its flags say `hg`.
        let advised = |addr: usize| -> bool {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
                let bounds = range
                    .and_then(|(a, b)| Some((usize::from_str_radix(a, 16).ok()?, usize::from_str_radix(b, 16).ok()?)));
                if let Some((a, b)) = bounds.filter(|_| !line.starts_with("VmFlags")) {
                    inside = (a..b).contains(&addr);
                } else if inside && line.starts_with("VmFlags:") {
                    return line.split_whitespace().any(|f| f == "hg");
                }
            }
            panic!("no mapping holds {addr:#x}");
        };
        // Where madvise is not passed on to a kernel that records it (qemu-user drops it), the
        // flag cannot show: a probe of 4 MiB of fresh memory tells.
        {
            let len = 4 << 20;
            // SAFETY: a fresh private anonymous mapping, advised, inspected and unmapped here.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                let a = (p as usize).next_multiple_of(2 << 20);
                libc::madvise(a as *mut libc::c_void, 2 << 20, libc::MADV_HUGEPAGE);
                let shown = advised(a);
                libc::munmap(p, len);
                if !shown {
                    eprintln!("SKIPPED: huge-page advice: madvise(MADV_HUGEPAGE) leaves no trace here (an emulator?)");
                    return;
                }
            }
        }
        let (n, k) = (1024, 4096); // 4 MiB of int8 weights and more once packed
        let w: Vec<f32> = (0..n * k).map(|i| (i % 17) as f32 - 8.0).collect();
        let pw = PackedWeights::from_f32(&w, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
        for p in [pw.clone(), pw] {
            let data = p.packed_data();
            let aligned = (data.as_ptr() as usize).next_multiple_of(2 << 20);
            assert!(aligned + (2 << 20) <= data.as_ptr() as usize + data.len());
            assert!(advised(aligned), "the packed weights at {aligned:#x} are not advised for huge pages");
        }
    }

    #[test]
    fn layouts_agree() {
        let (n, k) = (5, 7);
        let w_nk: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
        let mut w_kn = vec![0.0; n * k];
        for nn in 0..n {
            for kk in 0..k {
                w_kn[kk * n + nn] = w_nk[nn * k + kk];
            }
        }
        let a = PackedWeights::from_f32(&w_nk, n, k, WeightLayout::NK, PackOptions::default()).unwrap();
        let b = PackedWeights::from_f32(&w_kn, n, k, WeightLayout::KN, PackOptions::default()).unwrap();
        assert_eq!(a.quantized_weights(), b.quantized_weights());
        assert_eq!(a.scales(), b.scales());
        assert_eq!(a.col_sums(), b.col_sums());
    }

    #[test]
    fn shape_errors() {
        let o = PackOptions::default();
        assert_eq!(
            PackedWeights::from_f32(&[], 0, 3, WeightLayout::NK, o).unwrap_err().status(),
            crate::Status::InvalidArgument
        );
        assert_eq!(
            PackedWeights::from_f32(&[], 3, 0, WeightLayout::NK, o).unwrap_err().status(),
            crate::Status::InvalidArgument
        );
        assert_eq!(
            PackedWeights::from_f32(&[], 1, MAX_K + 1, WeightLayout::NK, o).unwrap_err().status(),
            crate::Status::Unsupported
        );
        assert_eq!(
            PackedWeights::from_f32(&[], usize::MAX / 2, 4, WeightLayout::NK, o).unwrap_err().status(),
            crate::Status::SizeOverflow
        );
        let e = PackedWeights::from_f32(&[1.0, f32::INFINITY], 1, 2, WeightLayout::NK, o).unwrap_err();
        assert_eq!(e.status(), crate::Status::NonFinite);
        assert!(e.message().contains("input 1"), "{}", e.message());
        let e = PackedWeights::from_quantized(&[1, 2], 1, 2, WeightLayout::NK, &[1.0, 2.0, 3.0], o).unwrap_err();
        assert_eq!(e.status(), crate::Status::InvalidArgument);
    }
}
