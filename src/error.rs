//! Errors of the Rust API and their mapping to the C ABI's `dynq_status`.
//!
//! Every failure carries a status (stable number, part of the ABI) and a message written for
//! the person reading a server's log: what was wrong, with the offending values.

/// Status codes of the C ABI. The numbers are stable and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
#[allow(non_camel_case_types)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullPointer = 1,
    /// An argument had a value outside its domain (zero size, stride smaller than a row,
    /// unknown enum value, mismatching layout, overlapping buffers, ...).
    InvalidArgument = 2,
    /// A size computation (such as m * lda, or n * k * sizeof(float)) overflowed.
    SizeOverflow = 3,
    /// An input contained NaN or infinity where finite values are required.
    NonFinite = 4,
    /// The request is valid but not supported here (an ISA the CPU lacks, a newer blob format).
    Unsupported = 5,
    /// A serialized blob is truncated, corrupted or not a dynq blob.
    CorruptData = 6,
    /// A caller-provided buffer is too small; the required size was reported.
    BufferTooSmall = 7,
    /// Memory could not be allocated.
    OutOfMemory = 8,
    /// A bug in dynq (a caught panic). Please report it with the message.
    Internal = 9,
}

const ALL_STATUSES: [Status; 10] = [
    Status::Ok,
    Status::NullPointer,
    Status::InvalidArgument,
    Status::SizeOverflow,
    Status::NonFinite,
    Status::Unsupported,
    Status::CorruptData,
    Status::BufferTooSmall,
    Status::OutOfMemory,
    Status::Internal,
];

impl Status {
    /// Every status, in numeric order.
    pub fn all() -> [Status; 10] {
        ALL_STATUSES
    }

    /// The status with this C ABI number.
    pub fn from_raw(raw: u32) -> Option<Status> {
        ALL_STATUSES.iter().copied().find(|s| *s as u32 == raw)
    }

    /// A static, human-readable description of the status, NUL-terminated for the C ABI.
    pub fn c_str(self) -> &'static std::ffi::CStr {
        match self {
            Status::Ok => c"ok",
            Status::NullPointer => c"null pointer argument",
            Status::InvalidArgument => c"invalid argument",
            Status::SizeOverflow => c"size overflow",
            Status::NonFinite => c"non-finite value (NaN or infinity) in input",
            Status::Unsupported => c"unsupported",
            Status::CorruptData => c"corrupt or truncated data",
            Status::BufferTooSmall => c"buffer too small",
            Status::OutOfMemory => c"out of memory",
            Status::Internal => c"internal error",
        }
    }

    /// A static, human-readable description of the status.
    pub fn as_str(self) -> &'static str {
        self.c_str().to_str().expect("ASCII")
    }
}

/// An error of the Rust API. Each variant maps to one [`Status`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("null pointer: {0}")]
    NullPointer(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("size overflow: {0}")]
    SizeOverflow(String),
    #[error("non-finite value: {0}")]
    NonFinite(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("corrupt data: {0}")]
    CorruptData(String),
    #[error("buffer too small: {0}")]
    BufferTooSmall(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The C ABI status of this error.
    pub fn status(&self) -> Status {
        match self {
            Error::NullPointer(_) => Status::NullPointer,
            Error::InvalidArgument(_) => Status::InvalidArgument,
            Error::SizeOverflow(_) => Status::SizeOverflow,
            Error::NonFinite(_) => Status::NonFinite,
            Error::Unsupported(_) => Status::Unsupported,
            Error::CorruptData(_) => Status::CorruptData,
            Error::BufferTooSmall(_) => Status::BufferTooSmall,
            Error::OutOfMemory(_) => Status::OutOfMemory,
            Error::Internal(_) => Status::Internal,
        }
    }

    /// The detailed message, without the status prefix.
    pub fn message(&self) -> &str {
        match self {
            Error::NullPointer(m)
            | Error::InvalidArgument(m)
            | Error::SizeOverflow(m)
            | Error::NonFinite(m)
            | Error::Unsupported(m)
            | Error::CorruptData(m)
            | Error::BufferTooSmall(m)
            | Error::OutOfMemory(m)
            | Error::Internal(m) => m,
        }
    }
}

/// Result alias of the Rust API.
pub type Result<T> = std::result::Result<T, Error>;

/// `a * b` or a [`Error::SizeOverflow`] naming what was computed.
pub(crate) fn checked_mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::SizeOverflow(format!("{what}: {a} * {b} overflows usize")))
}

/// `a + b` or a [`Error::SizeOverflow`] naming what was computed.
pub(crate) fn checked_add(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_add(b).ok_or_else(|| Error::SizeOverflow(format!("{what}: {a} + {b} overflows usize")))
}

/// A zero-filled `Vec` of `len` elements, or [`Error::OutOfMemory`] instead of aborting.
/// `v` resized to `len` elements, reusing its allocation: the elements it already had keep
/// their (stale) values, only new ones are zeroed; allocation failure is an error, not an abort.
pub(crate) fn try_resize_reused<T: Copy + Default>(mut v: Vec<T>, len: usize, what: &str) -> Result<Vec<T>> {
    if v.len() >= len {
        v.truncate(len);
        return Ok(v);
    }
    if v.capacity() < len {
        // A fresh zeroed buffer rather than growing (which would copy the stale elements).
        return try_zeroed_vec(len, what);
    }
    v.resize(len, T::default());
    Ok(v)
}

/// Buffers from this size on are advised to the kernel for 2 MiB pages.
#[cfg_attr(not(all(target_os = "linux", not(miri))), allow(dead_code))]
const HUGE_PAGES_MIN: usize = 4 << 20;

/// Asks Linux to back the whole 2 MiB pages inside `buf` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`, honoured when `/sys/kernel/mm/transparent_hugepage/enabled` is
/// `always` or `madvise`), before anything is written to them (see [`try_zeroed_vec_advised`]).
/// Streaming packed weights then takes
/// one TLB entry per 2 MiB instead of one per 4 KiB: measured in one process against the same
/// weights in 4 KiB pages, 1 thread, decoding 1x4096x4096 0.93x the time, 4x4096x4096
/// 0.88-0.94x, 8x4096x4096 0.87-0.93x, 4x4096x4096 on 2 threads 0.92-0.96x, 16x11008x4096
/// 0.97-0.99x; compute-bound shapes unchanged. Buffers below [`HUGE_PAGES_MIN`] are left
/// alone (at most one whole huge page inside them). Elsewhere, and under Miri, nothing.
pub(crate) fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(all(target_os = "linux", not(miri)))]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < HUGE_PAGES_MIN {
            return;
        }
        let start = buf.as_mut_ptr() as usize;
        let (a, b) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if b > a {
            // SAFETY: [a, b) lies inside `buf`, memory this process owns (a vector's spare
            // capacity, not yet handed out), and MADV_HUGEPAGE only states how it should be
            // backed: it changes neither its contents nor its validity. A refusal (a kernel
            // without transparent huge pages) changes nothing and is ignored.
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(all(target_os = "linux", not(miri))))]
    let _ = buf;
}

pub(crate) fn try_zeroed_vec<T: Copy + Default>(len: usize, what: &str) -> Result<Vec<T>> {
    try_zeroed_vec_advised(len, what, |_| {})
}

/// [`try_zeroed_vec`], calling `advise` on the allocation (still untouched when it was just
/// mapped) before the zeros are written: the moment to say how the memory should be backed.
pub(crate) fn try_zeroed_vec_advised<T: Copy + Default>(
    len: usize,
    what: &str,
    advise: impl FnOnce(&mut [std::mem::MaybeUninit<T>]),
) -> Result<Vec<T>> {
    let bytes = len.checked_mul(std::mem::size_of::<T>()).filter(|b| *b <= isize::MAX as usize);
    if bytes.is_none() {
        return Err(Error::SizeOverflow(format!(
            "{what}: {len} elements of {} bytes exceed the address space",
            std::mem::size_of::<T>()
        )));
    }
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        Error::OutOfMemory(format!("{what}: could not allocate {} bytes", len * std::mem::size_of::<T>()))
    })?;
    advise(&mut v.spare_capacity_mut()[..len]);
    v.resize(len, T::default());
    Ok(v)
}
