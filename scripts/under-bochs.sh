#!/usr/bin/env bash
# Runs dynq's tests on an Intel CPU emulated by Bochs 3.0, on any x86-64 Linux host: on a machine
# without AVX-512 VNNI or AVX-VNNI (e.g. AMD Zen 3), the way to run those kernels at all. QEMU's
# TCG cannot: it implements neither. CI runs it when its CPU lacks either (scripts/test.sh).
#
#   DYNQ_BOCHS_CPU=sapphire_rapids (default) AVX-512 VNNI and AVX-VNNI: requires scalar, avx2,
#                                  avx_vnni and avx512_vnni (and runs the EVEX twin of AVX-VNNI)
#   DYNQ_BOCHS_CPU=tigerlake       AVX-512 VNNI without AVX-VNNI
#   DYNQ_BOCHS_CPU=arrow_lake      AVX-VNNI without AVX-512 (the dispatch of client CPUs)
#   DYNQ_BOCHS_TESTS="kernels reproducible"        the test files to run ("" runs none; the
#                                  default: kernels reproducible gemm guard_pages ffi_gemm_ex
#                                  blob_format; gemm takes about 4 minutes, the others 5-10 s
#                                  each; corruption would take 10.5 minutes)
#   DYNQ_BOCHS_C=0                                 leaves out the C ABI test program (run once
#                                  per ISA of the model, each forced with DYNQ_ISA)
#   DYNQ_BOCHS_TIMEOUT=900                         seconds before the emulator is stopped
#   DYNQ_BOCHS_JOBS=N                              make jobs for building Bochs (default: nproc)
#   DYNQ_BOCHS_BUILD_ONLY=1                        only build Bochs (no apt, no test)
#   scripts/under-bochs.sh [TEST_FILTER...]        (arguments go to every test executable)
#
# Bochs 2.7 (Debian bookworm's package) is not used: it has no AVX-VNNI model and its results
# were wrong in floating point (tests/reproducible.rs got another digest even on the scalar
# kernel). Under Bochs 3.0 every digest equals the one recorded on real CPUs. A mutation of the
# AVX-512 K loop fails 4 of the 6 kernel tests (and 5 checks of the C ABI program with
# DYNQ_ISA=avx512_vnni), and one of the AVX-VNNI K loop fails 4 of 6.
#
# Time on 2 cores: building Bochs about 3 minutes, once (target/bochs-3.0); the default tests
# about 6 minutes, 40 s of it the emulated boot and 4 the GEMM tests (Bochs runs about 100
# million instructions a second here).
#
# What it does: builds Bochs 3.0 from Debian's source package (trixie's; checksum pinned) with
# Debian's bochsbios and vgabios; unpacks the Debian kernel (linux-image-amd64) under
# target/bochs-vm; puts the test executables (cargo's test profile, as `cargo test` builds them),
# `dynq`, the C ABI test program with the release libdynq.so, and the shared libraries they load
# into an initramfs whose init (scripts/bochs/init.c)
# runs them with DYNQ_REQUIRE_ISA set to the model's ISAs and powers off; boots it from an
# ISOLINUX CD image. The console goes to target/bochs-vm/serial.log. Exits non-zero unless every
# program passed.
#
# The kernel command line works around defects of Bochs' models, found one by one (each made
# Linux 6.1 stop booting, or run without AVX-512):
# - CPUID leaf 0xD sub-leaf 1 reports standard-format sizes for the compacted XSAVE format: clear
#   xsaves, xsavec and xsaveopt (320, 321, 323), so the kernel uses the standard format;
# - protection keys: Bochs 2.7 reported zeros for their XSAVE component; clear pku and ospke
#   (515, 516) and boot with nopku;
# - the boot stopped at the first context switches with rdpid and fsrm advertised: clear them
#   (534, 580); also arch_perfmon, aperfmperf and umip (107, 124, 514), whose MSRs or checks
#   Bochs does not implement;
# - Sapphire Rapids: returning from system management mode (an SMI from the ACPI code) with
#   5-level paging on stops Bochs ("attempt to change CR4.LA57 when EFER.LMA=1"): no5lvl.
# A boot with only no5lvl of these printed nothing in 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=${DYNQ_BOCHS_CPU:-sapphire_rapids}
case "$cpu" in
  tigerlake) isas=scalar,avx2,avx512_vnni ;;
  sapphire_rapids) isas=scalar,avx2,avx_vnni,avx512_vnni ;;
  arrow_lake) isas=scalar,avx2,avx_vnni ;;
  *) echo "DYNQ_BOCHS_CPU: sapphire_rapids, tigerlake or arrow_lake, not $cpu" >&2; exit 2 ;;
esac
tests=${DYNQ_BOCHS_TESTS-kernels reproducible gemm guard_pages ffi_gemm_ex blob_format}
vm=target/bochs-vm
mkdir -p "$vm"
export DEBIAN_FRONTEND=noninteractive
# DYNQ_BOCHS_BUILD_ONLY=1: build Bochs and stop, installing nothing (scripts/test.sh runs it in
# the background early, so that the later run only boots); without curl or xz it does nothing.
if [ "${DYNQ_BOCHS_BUILD_ONLY:-0}" = 1 ] && ! { command -v curl && command -v xz; } >/dev/null; then
  echo "DYNQ_BOCHS_BUILD_ONLY: no curl or xz yet; the full run will build Bochs"
  exit 0
fi
need=()
[ -e /usr/share/bochs/BIOS-bochs-latest ] || need+=(bochsbios)
[ -e /usr/share/vgabios/vgabios.bin ] || need+=(vgabios)
[ -e /usr/lib/ISOLINUX/isolinux.bin ] || need+=(isolinux)
[ -e /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || need+=(syslinux-common)
command -v genisoimage >/dev/null || need+=(genisoimage)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v curl >/dev/null || need+=(curl ca-certificates)
if [ ${#need[@]} -gt 0 ] && [ "${DYNQ_BOCHS_BUILD_ONLY:-0}" != 1 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Bochs 3.0 from Debian's source package: headless, no plugins, with AVX, EVEX, protection keys
# and CET (the models advertise them). About 3 minutes on 2 cores, once.
bochs=target/bochs-3.0/bochs
if [ ! -x "$bochs" ]; then
  src=bochs_3.0+dfsg.orig.tar.xz
  sum=78f6c73d4a6472d5130a87ab9dc306d02c7c71ed8e25b3a8ef642e2a7acd282b
  mkdir -p target/bochs-src
  [ -e "target/bochs-src/$src" ] ||
    curl -fsS -o "target/bochs-src/$src" "http://deb.debian.org/debian/pool/main/b/bochs/$src"
  echo "$sum  target/bochs-src/$src" | sha256sum -c --quiet
  rm -rf target/bochs-3.0 && mkdir -p target/bochs-3.0
  tar -xJf "target/bochs-src/$src" -C target/bochs-3.0 --strip-components=1
  (cd target/bochs-3.0 &&
    CXXFLAGS=-O2 CFLAGS=-O2 ./configure --enable-x86-64 --enable-cpu-level=6 --enable-avx --enable-evex \
      --enable-protection-keys --enable-cet --enable-uintr --enable-vmx=2 \
      --enable-all-optimizations --with-nogui --disable-plugins >configure.log 2>&1 &&
    make -j"${DYNQ_BOCHS_JOBS:-$(nproc)}" >make.log 2>&1) || { echo "building Bochs failed: see target/bochs-3.0/*.log" >&2; exit 1; }
fi
if [ "${DYNQ_BOCHS_BUILD_ONLY:-0}" = 1 ]; then
  echo "Bochs built: $bochs"
  exit 0
fi

# The kernel: the current Debian kernel package, unpacked (its vmlinuz only).
if [ ! -e "$vm/iso/vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
  (cd "$vm" && rm -f linux-image-*.deb && apt-get download "$pkg")
  mkdir -p "$vm/iso" "$vm/kernel"
  dpkg-deb --fsys-tarfile "$vm"/linux-image-*.deb | tar -x -C "$vm/kernel" --wildcards './boot/vmlinuz-*'
  cp "$vm"/kernel/boot/vmlinuz-* "$vm/iso/vmlinuz"
fi

# The test executables (cargo's test profile, as `cargo test` builds them) and the dynq command,
# with the shared libraries they load copied to the same paths in the initramfs.
root=$vm/root
rm -rf "$root" && mkdir -p "$root/t"
echo "/t/dynq info" >"$root/t/list"
# One cargo call for every test file: "name executable" per line.
: >"$vm/executables"
if [ -n "${tests// /}" ]; then
  cargo test $(printf -- '--test %s ' $tests) --no-run --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    d = json.loads(line)
    if d.get("reason") == "compiler-artifact" and d.get("executable") and d["target"]["kind"] == ["test"]:
        print(d["target"]["name"], d["executable"])' >"$vm/executables"
fi
for t in $tests; do
  exe=$(awk -v t="$t" '$1 == t { print $2 }' "$vm/executables")
  [ -n "$exe" ] || { echo "no test executable for $t" >&2; exit 1; }
  strip -o "$root/t/$t" "$exe"
  echo "/t/$t --test-threads=1 $*" >>"$root/t/list"
done
cargo build --release --quiet --bin dynq --lib
strip -o "$root/t/dynq" target/release/dynq
programs=("$root/t/dynq")
for t in $tests; do programs+=("$root/t/$t"); done
# The C ABI test program (tests/c/test_abi.c as C99, as tests/c/run.sh builds it) against the
# release libdynq.so, once for each ISA of the model (forced with DYNQ_ISA; the program checks
# that the library took it). DYNQ_BOCHS_C=0 leaves it out. (tests/c/test_robustness.c is not
# run here: its many threads on the one emulated CPU took 2.5 minutes.)
if [ "${DYNQ_BOCHS_C:-1}" = 1 ]; then
  mkdir -p "$root/t/lib"
  strip -o "$root/t/lib/libdynq.so" target/release/libdynq.so
  soname=$(readelf -d target/release/libdynq.so | grep -o 'libdynq\.so[.0-9]*' | head -n 1)
  [ "$soname" = libdynq.so ] || ln -s libdynq.so "$root/t/lib/$soname"
  gcc -std=c99 -O2 -Wall -Wextra -Werror -pedantic -ffp-contract=off -Iinclude tests/c/test_abi.c \
    -o "$root/t/test_abi_c99" -Ltarget/release -ldynq -lm -lpthread
  for isa in ${isas//,/ }; do echo "DYNQ_ISA=$isa /t/test_abi_c99" >>"$root/t/list"; done
  programs+=("$root/t/test_abi_c99" "$root/t/lib/libdynq.so")
fi
for lib in $(for p in "${programs[@]}"; do LD_LIBRARY_PATH=$root/t/lib ldd "$p"; done |
    awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | grep -v "^$root/" | sort -u); do
  mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"
done
gcc -O2 -static -Wall -o "$root/init" scripts/bochs/init.c
printf 'DYNQ_REQUIRE_ISA=%s\nRUST_BACKTRACE=1\nLD_LIBRARY_PATH=/t/lib\n' "$isas" >"$root/t/env"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"../iso/initrd.gz")

cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$vm/iso/"
cmdline=${DYNQ_BOCHS_CMDLINE-mitigations=off nopku ibt=off lsm=capability nmi_watchdog=0 nowatchdog clearcpuid=107,124,320,321,323,514,515,516,534,580 no5lvl}
printf 'DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n  APPEND %s\n' \
  "initrd=initrd.gz console=ttyS0 loglevel=4 $cmdline" >"$vm/iso/isolinux.cfg"
genisoimage -quiet -o "$vm/boot.iso" -b isolinux.bin -c boot.cat -no-emul-boot -boot-load-size 4 \
  -boot-info-table "$vm/iso"
printf '%s\n' "megs: 2048" \
  "cpu: model=$cpu, count=1, ips=200000000, reset_on_triple_fault=0" \
  "romimage: file=/usr/share/bochs/BIOS-bochs-latest" \
  "vgaromimage: file=/usr/share/vgabios/vgabios.bin" \
  "ata0-master: type=cdrom, path=$PWD/$vm/boot.iso, status=inserted" \
  "boot: cdrom" \
  "display_library: nogui" \
  "com1: enabled=1, mode=file, dev=$PWD/$vm/serial.log" \
  "log: $PWD/$vm/bochs.log" \
  "panic: action=fatal" \
  "clock: sync=none, time0=local" >"$vm/bochsrc"
rm -f "$vm/serial.log"
echo "booting the emulated $cpu (console: $vm/serial.log) ..."
timeout "${DYNQ_BOCHS_TIMEOUT:-900}" "$bochs" -q -f "$vm/bochsrc" >"$vm/bochs.out" 2>&1 || true
grep -a -E '^(DYNQ-|test |flags|selected ISA|ISAs this CPU|FAIL|[0-9]+ passed, [0-9]+ failed)' "$vm/serial.log" | grep -v -- '---' || true
grep -a -q '^DYNQ-INIT-DONE ok' "$vm/serial.log"
