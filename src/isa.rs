//! Instruction-set detection and the one dispatch decision.
//!
//! This module owns the question "which kernel family may run on this CPU". The answer is
//! computed once per process from the CPU's feature flags and the optional `DYNQ_ISA`
//! environment variable. A forced ISA is validated against the CPU: asking for a path the
//! CPU lacks is an error reported by every call that needs dispatch, never a SIGILL.

use crate::error::Error;
use once_cell::sync::OnceCell;
use std::fmt;

/// A family of kernels. The numeric values are part of the C ABI (`dynq_isa`) and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, runs everywhere; the reference path.
    Scalar = 1,
    /// x86-64 AVX2 without VNNI.
    Avx2 = 2,
    /// x86-64 AVX-VNNI (VEX-encoded `vpdpbusd` on ymm, e.g. Alder Lake).
    AvxVnni = 3,
    /// x86-64 AVX-512 VNNI (`vpdpbusd` on zmm).
    Avx512Vnni = 4,
    /// AArch64 Advanced SIMD without dot-product instructions.
    Neon = 5,
    /// AArch64 with `sdot`/`udot` (FEAT_DotProd).
    NeonDotprod = 6,
    /// AArch64 with `smmla` (FEAT_I8MM).
    NeonI8mm = 7,
    /// x86-64 AMX-INT8 (`tdpbusd` on tile registers, e.g. Sapphire Rapids), with AVX-512 VNNI
    /// for the row operations, the epilogue and the row tails. Usable only where Linux grants
    /// the process the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.
    AmxInt8 = 8,
}

impl Isa {
    /// Every ISA dynq knows, from the most portable to the most specialised.
    pub const ALL: [Isa; 8] = [
        Isa::Scalar,
        Isa::Avx2,
        Isa::AvxVnni,
        Isa::Avx512Vnni,
        Isa::Neon,
        Isa::NeonDotprod,
        Isa::NeonI8mm,
        Isa::AmxInt8,
    ];

    /// The lower-case name used by `DYNQ_ISA`, the CLI and `dynq_isa_name`, NUL-terminated.
    pub fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            Isa::Scalar => c"scalar",
            Isa::Avx2 => c"avx2",
            Isa::AvxVnni => c"avx_vnni",
            Isa::Avx512Vnni => c"avx512_vnni",
            Isa::Neon => c"neon",
            Isa::NeonDotprod => c"neon_dotprod",
            Isa::NeonI8mm => c"neon_i8mm",
            Isa::AmxInt8 => c"amx_int8",
        }
    }

    /// The lower-case name used by `DYNQ_ISA`, the CLI and `dynq_isa_name`.
    pub fn name(self) -> &'static str {
        self.c_name().to_str().expect("ASCII")
    }

    /// Parses a name as accepted by `DYNQ_ISA` (case-insensitive, `-` and `_` alike).
    pub fn from_name(name: &str) -> Option<Isa> {
        let norm = name.trim().to_ascii_lowercase().replace('-', "_");
        Isa::ALL.iter().copied().find(|isa| isa.name() == norm)
    }

    /// The C ABI value.
    pub fn to_raw(self) -> u32 {
        self as u32
    }

    /// From the C ABI value; `None` for values that name no ISA (0 means "auto" at the ABI).
    pub fn from_raw(raw: u32) -> Option<Isa> {
        Isa::ALL.iter().copied().find(|isa| isa.to_raw() == raw)
    }

    /// Whether this CPU can execute the instructions of this ISA's kernels.
    pub fn is_supported(self) -> bool {
        cpu_supports(self)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn cpu_supports(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        // FMA3 as well: the epilogue's GELU is defined with fused multiply-adds (every CPU with
        // AVX2 so far has FMA3; a virtual machine that hides it gets the scalar kernels).
        Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        Isa::AvxVnni => {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("avxvnni")
        }
        Isa::Avx512Vnni => {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        Isa::AmxInt8 => cpu_supports(Isa::Avx512Vnni) && amx::usable(),
        Isa::Neon | Isa::NeonDotprod | Isa::NeonI8mm => false,
    }
}

/// AMX detection: the CPU's flags, the operating system's, and the process's permission.
#[cfg(target_arch = "x86_64")]
mod amx {
    use once_cell::sync::OnceCell;

    /// `ARCH_REQ_XCOMP_PERM` and the tile data component (Linux `asm/prctl.h`).
    #[cfg(target_os = "linux")]
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    #[cfg(target_os = "linux")]
    const XFEATURE_XTILEDATA: libc::c_long = 18;

    /// CPUID.(EAX=7, ECX=0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8).
    pub(super) fn cpu_has_amx_int8() -> bool {
        // Leaf 7 is read only when the maximum leaf reaches it.
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    }

    /// Whether the OS has enabled the tile state in XCR0 (bits 17 TILECFG and 18 TILEDATA).
    fn os_enables_tiles() -> bool {
        if !std::arch::is_x86_feature_detected!("xsave") || !std::arch::is_x86_feature_detected!("avx") {
            return false;
        }
        #[target_feature(enable = "xsave")]
        unsafe fn xcr0() -> u64 {
            // SAFETY: XGETBV with ECX = 0 is valid when the OS enabled XSAVE (checked above
            // via OSXSAVE, which the `xsave`/`avx` detection requires).
            unsafe { std::arch::x86_64::_xgetbv(0) }
        }
        // SAFETY: see xcr0.
        let x = unsafe { xcr0() };
        x & (0b11 << 17) == 0b11 << 17
    }

    /// Whether this process may execute AMX instructions: asks Linux for the tile data state
    /// once (the permission is per process and covers every thread). Where the request is
    /// refused (an older kernel, or a thread whose alternate signal stack is too small for the
    /// larger signal frame), AMX is reported as unsupported and the AVX-512 kernels run.
    pub(super) fn usable() -> bool {
        static OK: OnceCell<bool> = OnceCell::new();
        *OK.get_or_init(|| {
            if !cpu_has_amx_int8() || !os_enables_tiles() {
                return false;
            }
            #[cfg(target_os = "linux")]
            {
                // SAFETY: a plain system call with integer arguments.
                let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
                r == 0
            }
            #[cfg(not(target_os = "linux"))]
            false
        })
    }
}

#[cfg(target_arch = "aarch64")]
fn cpu_supports(isa: Isa) -> bool {
    match isa {
        Isa::Scalar => true,
        Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        Isa::NeonDotprod => {
            std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("dotprod")
        }
        Isa::NeonI8mm => {
            std::arch::is_aarch64_feature_detected!("neon") && std::arch::is_aarch64_feature_detected!("i8mm")
        }
        Isa::Avx2 | Isa::AvxVnni | Isa::Avx512Vnni | Isa::AmxInt8 => false,
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn cpu_supports(isa: Isa) -> bool {
    isa == Isa::Scalar
}

/// CPU feature flags relevant to dynq, as `(name, present)`, for `dynq info`.
pub fn cpu_features() -> Vec<(&'static str, bool)> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as d;
        v.push(("sse4.1", d!("sse4.1")));
        v.push(("avx2", d!("avx2")));
        v.push(("fma", d!("fma")));
        v.push(("f16c", d!("f16c")));
        v.push(("avxvnni", d!("avxvnni")));
        v.push(("avx512f", d!("avx512f")));
        v.push(("avx512bw", d!("avx512bw")));
        v.push(("avx512vl", d!("avx512vl")));
        v.push(("avx512vnni", d!("avx512vnni")));
        v.push(("avx512bf16", d!("avx512bf16")));
        v.push(("amx-int8", amx::cpu_has_amx_int8()));
    }
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as d;
        v.push(("neon", d!("neon")));
        v.push(("dotprod", d!("dotprod")));
        v.push(("i8mm", d!("i8mm")));
        v.push(("fp16", d!("fp16")));
        v.push(("bf16", d!("bf16")));
        v.push(("sve", d!("sve")));
    }
    v
}

/// The best ISA this CPU supports that has kernels in this build.
pub fn best_supported() -> Isa {
    crate::kernels::KERNELS
        .iter()
        .map(|k| k.isa)
        .filter(|isa| isa.is_supported())
        .max_by_key(|isa| preference(*isa))
        .unwrap_or(Isa::Scalar)
}

/// Higher is preferred when several ISAs are available.
fn preference(isa: Isa) -> u32 {
    match isa {
        Isa::Scalar => 0,
        Isa::Avx2 | Isa::Neon => 1,
        Isa::AvxVnni | Isa::NeonDotprod => 2,
        Isa::Avx512Vnni | Isa::NeonI8mm => 3,
        Isa::AmxInt8 => 4,
    }
}

/// Resolves a requested ISA: it must name an ISA with kernels in this build and the CPU must
/// support it. This is the single check behind `DYNQ_ISA` and the `isa` field of the C configs.
pub fn resolve(requested: Isa) -> Result<Isa, Error> {
    if !requested.is_supported() {
        return Err(Error::Unsupported(format!(
            "ISA '{}' was requested but this CPU does not support it (usable here: {})",
            requested,
            supported_list()
        )));
    }
    if crate::kernels::kernel_for(requested).is_none() {
        return Err(Error::Unsupported(format!(
            "ISA '{}' is supported by this CPU but this build of dynq has no kernel for it \
             (kernels here: {})",
            requested,
            crate::kernels::KERNELS
                .iter()
                .filter(|k| k.weight_pair_limit.is_none())
                .map(|k| k.isa.name())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(requested)
}

fn supported_list() -> String {
    Isa::ALL
        .iter()
        .filter(|i| i.is_supported() && crate::kernels::kernel_for(**i).is_some())
        .map(|i| i.name())
        .collect::<Vec<_>>()
        .join(", ")
}

static ACTIVE: OnceCell<Result<Isa, Error>> = OnceCell::new();

/// The ISA used when a call does not force one: `DYNQ_ISA` if set (validated), else the best
/// the CPU supports. Decided once per process; an invalid `DYNQ_ISA` makes every call that
/// needs dispatch fail with the same message.
pub fn active() -> Result<Isa, Error> {
    ACTIVE
        .get_or_init(|| match std::env::var("DYNQ_ISA") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "auto" => match Isa::from_name(&v) {
                Some(isa) => {
                    resolve(isa).map_err(|e| Error::Unsupported(format!("DYNQ_ISA={}: {}", v.trim(), e.message())))
                }
                None => Err(Error::InvalidArgument(format!(
                    "DYNQ_ISA={:?} names no ISA; use one of auto, {}",
                    v,
                    Isa::ALL.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                ))),
            },
            _ => Ok(best_supported()),
        })
        .clone()
}

/// The ISA a call runs on: `forced` when given (validated), else [`active`].
pub fn select(forced: Option<Isa>) -> Result<Isa, Error> {
    match forced {
        Some(isa) => resolve(isa),
        None => active(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
            assert_eq!(Isa::from_raw(isa.to_raw()), Some(isa));
        }
        assert_eq!(Isa::from_name("AVX512-VNNI"), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::from_name("sse9"), None);
        assert_eq!(Isa::from_raw(0), None);
        assert_eq!(Isa::from_raw(9), None);
        assert_eq!(Isa::from_name("AMX-INT8"), Some(Isa::AmxInt8));
    }

    #[test]
    fn scalar_always_resolves() {
        assert_eq!(resolve(Isa::Scalar).unwrap(), Isa::Scalar);
    }

    #[test]
    fn foreign_isa_is_refused_with_message() {
        #[cfg(target_arch = "x86_64")]
        let foreign = Isa::NeonDotprod;
        #[cfg(not(target_arch = "x86_64"))]
        let foreign = Isa::Avx512Vnni;
        let err = resolve(foreign).unwrap_err();
        assert_eq!(err.status(), crate::Status::Unsupported);
        assert!(err.message().contains(foreign.name()), "{}", err.message());
    }
}
