#!/usr/bin/env bash
# Runs dynq's integer kernel tests (tests/kernels.rs, every ISA forced in turn) on an emulated
# Intel Tiger Lake (AVX-512 F/BW/VL and AVX-512 VNNI) under Bochs, on any x86-64 Linux host: for
# a machine without AVX-512 VNNI (e.g. AMD Zen 3), the way to check that the AVX-512 VNNI kernel
# (and the EVEX twin of the AVX-VNNI one) still equals the integer reference exactly. QEMU's TCG
# cannot do this: it implements no AVX-512 and no AVX-VNNI. Not part of CI: about 8 minutes in
# all, 4 of them the emulated boot (Bochs interprets about 45 million instructions per second).
# A mutation of the AVX-512 K loop (one vpdpbusd given the wrong K group) fails 4 of its 6 tests.
#
# What it does: Debian's bochs 2.7 and its BIOS, the Debian kernel (linux-image-amd64, unpacked
# under target/bochs-vm, not installed), the tests built as static executables, an initramfs
# whose init (scripts/bochs/init.c) runs them and powers off, booted from an ISOLINUX CD image.
# The console goes to target/bochs-vm/serial.log. Exits non-zero unless every program passed.
#
# The kernel command line works around defects of Bochs 2.7's Tiger Lake model, found one by
# one (each made Linux 6.1 stop booting or run without AVX-512):
# - CPUID leaf 0xD sub-leaf 9 (PKRU) reads as zeros (a misspelt `#if BX_SUPPPORT_PKEYS` in its
#   cpuid code), so the kernel's XSAVE size check failed and disabled XSAVE, hence all of AVX:
#   clear pku and ospke (515, 516);
# - CPUID 0xD sub-leaf 1 reports standard-format sizes for the compacted format: clear xsaves,
#   xsavec and xsaveopt (320, 321, 323), so the kernel uses the standard format;
# - the boot stopped at the first context switches with rdpid and fsrm advertised: clear them
#   (534, 580); also arch_perfmon, aperfmperf and umip (107, 124, 514), whose MSRs or checks
#   Bochs does not implement.
# Caution: floating-point results under this emulator are not trustworthy: tests/reproducible.rs
# gets a different digest there even for the scalar kernel (session 14), so only the integer
# tests are run. Their references are integer too.
#
#   scripts/avx512-under-bochs.sh            [TEST_FILTER...]   (arguments go to the test binary)
set -euo pipefail
cd "$(dirname "$0")/.."

vm=target/bochs-vm
mkdir -p "$vm"
export DEBIAN_FRONTEND=noninteractive
need=()
command -v bochs >/dev/null || need+=(bochs bochsbios)
[ -e /usr/lib/ISOLINUX/isolinux.bin ] || need+=(isolinux)
[ -e /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || need+=(syslinux-common)
command -v genisoimage >/dev/null || need+=(genisoimage)
command -v cpio >/dev/null || need+=(cpio)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# The kernel: the current Debian kernel package, unpacked (its vmlinuz only).
if [ ! -e "$vm/iso/vmlinuz" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ { print $2; exit }')
  (cd "$vm" && rm -f linux-image-*.deb && apt-get download "$pkg")
  mkdir -p "$vm/iso" "$vm/kernel"
  dpkg-deb --fsys-tarfile "$vm"/linux-image-*.deb | tar -x -C "$vm/kernel" --wildcards './boot/vmlinuz-*'
  cp "$vm"/kernel/boot/vmlinuz-* "$vm/iso/vmlinuz"
fi

# The tests and the dynq command, as static executables (their own target directory, so the
# usual build is not invalidated).
exes=$(RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/bochs \
  cargo test --release --target x86_64-unknown-linux-gnu --test kernels --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    d = json.loads(line)
    if d.get("reason") == "compiler-artifact" and d.get("executable") and d["target"]["kind"] == ["test"]:
        print(d["executable"])')
[ "$(echo "$exes" | wc -w)" = 1 ] || { echo "expected one test executable, got: $exes" >&2; exit 1; }
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=target/bochs \
  cargo build --release --quiet --target x86_64-unknown-linux-gnu --bin dynq
root=$vm/root
rm -rf "$root" && mkdir -p "$root/t"
gcc -O2 -static -Wall -o "$root/init" scripts/bochs/init.c
strip -o "$root/t/dynq" target/bochs/x86_64-unknown-linux-gnu/release/dynq
strip -o "$root/t/kernels" "$exes"
printf 'DYNQ_REQUIRE_ISA=scalar,avx2,avx512_vnni\nRUST_BACKTRACE=1\n' >"$root/t/env"
{
  echo "/t/dynq info"
  echo "/t/kernels --test-threads=1 $*"
} >"$root/t/list"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"../iso/initrd.gz")

cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$vm/iso/"
cat >"$vm/iso/isolinux.cfg" <<'EOF'
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL vmlinuz
  APPEND initrd=initrd.gz console=ttyS0 loglevel=4 mitigations=off nopku ibt=off lsm=capability nmi_watchdog=0 nowatchdog clearcpuid=107,124,320,321,323,514,515,516,534,580
EOF
genisoimage -quiet -o "$vm/boot.iso" -b isolinux.bin -c boot.cat -no-emul-boot -boot-load-size 4 \
  -boot-info-table "$vm/iso"
cat >"$vm/bochsrc" <<EOF
megs: 2048
cpu: model=tigerlake, count=1, ips=200000000, reset_on_triple_fault=0
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest
ata0-master: type=cdrom, path=$PWD/$vm/boot.iso, status=inserted
boot: cdrom
display_library: rfb, options="timeout=0"
com1: enabled=1, mode=file, dev=$PWD/$vm/serial.log
log: $PWD/$vm/bochs.log
panic: action=fatal
clock: sync=none, time0=local
EOF
rm -f "$vm/serial.log"
echo "booting the emulated Tiger Lake (console: $vm/serial.log) ..."
# Debian's bochs has its debugger built in and waits at the first instruction: 'c' continues.
printf 'c\n' | timeout "${DYNQ_BOCHS_TIMEOUT:-3600}" bochs -q -f "$vm/bochsrc" >"$vm/bochs.out" 2>&1 || true
grep -a -E '^(DYNQ-|test |flags|selected ISA|ISAs this CPU)' "$vm/serial.log" | grep -v -- '---' || true
grep -a -q '^DYNQ-INIT-DONE ok' "$vm/serial.log"
