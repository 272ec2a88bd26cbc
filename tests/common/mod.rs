//! Shared helpers of the integration tests: the ISA list under test (with DYNQ_REQUIRE_ISA),
//! a deterministic RNG, and buffers that end at a guard page.
#![allow(dead_code)]

use dynq::Isa;

/// Every ISA with a kernel in this build that this CPU can run. An ISA the CPU lacks is
/// skipped with a message, unless `DYNQ_REQUIRE_ISA` (comma-separated names, or `all` for
/// every ISA with a kernel in this build) names it: then the test fails, so CI proves the path
/// ran.
pub fn isas_under_test() -> Vec<Isa> {
    let required: Vec<String> = std::env::var("DYNQ_REQUIRE_ISA")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for r in &required {
        if r != "all" && Isa::from_name(r).is_none() {
            panic!("DYNQ_REQUIRE_ISA names unknown ISA {r:?}");
        }
    }
    let is_required = |isa: Isa| {
        required
            .iter()
            .any(|r| (r == "all" && dynq::kernels::kernel_for(isa).is_some()) || Isa::from_name(r) == Some(isa))
    };
    let mut out = Vec::new();
    for isa in Isa::ALL {
        let has_kernel = dynq::kernels::kernel_for(isa).is_some();
        match dynq::isa::resolve(isa) {
            Ok(_) => out.push(isa),
            Err(e) if is_required(isa) => panic!("DYNQ_REQUIRE_ISA requires {isa} but it cannot run here: {e}"),
            Err(_) if has_kernel => eprintln!("SKIPPED: ISA {isa}: this CPU does not support it"),
            Err(_) => {}
        }
    }
    assert!(out.contains(&Isa::Scalar));
    out
}

/// xorshift64*: deterministic, seedable.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn u8(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }
    pub fn i8(&mut self) -> i8 {
        self.u8() as i8
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A buffer of `len` elements whose last element is immediately followed by an inaccessible
/// page, so any read or write past the end faults.
pub struct GuardBuf<T: Copy> {
    base: *mut libc::c_void,
    map_len: usize,
    ptr: *mut T,
    len: usize,
}

impl<T: Copy> GuardBuf<T> {
    pub fn new(len: usize, fill: T) -> Self {
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = len * std::mem::size_of::<T>();
        let data_pages = bytes.div_ceil(page).max(1);
        let map_len = (data_pages + 1) * page;
        // SAFETY: anonymous private mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: the last page lies inside the mapping.
        let guard = unsafe { (base as *mut u8).add(data_pages * page) };
        assert_eq!(unsafe { libc::mprotect(guard as *mut libc::c_void, page, libc::PROT_NONE) }, 0);
        assert_eq!(bytes % std::mem::align_of::<T>(), 0);
        // SAFETY: the data ends exactly at the guard page.
        let ptr = unsafe { guard.sub(bytes) } as *mut T;
        let mut b = GuardBuf { base, map_len, ptr, len };
        b.as_mut_slice().fill(fill);
        b
    }
    pub fn as_slice(&self) -> &[T] {
        // SAFETY: ptr..ptr+len is mapped read-write and owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn as_ptr(&self) -> *const T {
        self.ptr
    }
    pub fn as_mut_ptr(&mut self) -> *mut T {
        self.ptr
    }
}

impl<T: Copy> Drop for GuardBuf<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}
