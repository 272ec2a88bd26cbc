#!/usr/bin/env bash
# Cross-builds dynq for s390x (IBM Z: big-endian, scalar kernels) and runs its core Rust tests
# and the C ABI test program under qemu-user. It proves on a big-endian CPU what the x86 and
# aarch64 runs prove on little-endian ones: the integer products equal the reference, the output
# bits equal the recorded digests, the serialized format is the documented little-endian one
# (tests/blob_format.rs), and the C ABI behaves the same.
#
# qemu-s390x must be version 8 or later: 7.2 (Debian 12's) computes MDEB, the multiplication
# of two f32 values into an f64 that LLVM emits for `a as f64 * b as f64`, from the wrong half of
# a register (the test references then disagree with dynq, which does not use it). If the
# installed one is older, the qemu-user package of Debian's bookworm-backports is unpacked
# under target/ (nothing is installed over the system's qemu).
# Prints "SKIPPED: ..." and exits 0 if the toolchain or such a qemu cannot be had here.
set -euo pipefail
cd "$(dirname "$0")/.."

target=s390x-unknown-linux-gnu
if ! rustup target list --installed 2>/dev/null | grep -q "^$target$"; then
  if ! rustup target add "$target"; then
    echo "SKIPPED: s390x tests: rustup could not install the $target target"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! command -v s390x-linux-gnu-gcc >/dev/null; then
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc-s390x-linux-gnu libc6-dev-s390x-cross; }; then
    echo "SKIPPED: s390x tests: could not install gcc-s390x-linux-gnu"
    exit 0
  fi
fi

qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -n 1; }
qemu=$(command -v qemu-s390x || true)
if [[ -z "$qemu" || "$(qemu_major "$qemu")" -lt 8 ]]; then
  qemu=$PWD/target/qemu-bpo/usr/bin/qemu-s390x
  if [[ ! -x "$qemu" ]]; then
    list=/etc/apt/sources.list.d/dynq-bookworm-backports.list
    if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null && [[ ! -e $list ]]; then
      echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$list"
    fi
    rm -rf target/qemu-bpo && mkdir -p target/qemu-bpo
    if ! { apt-get update -qq && (cd target/qemu-bpo && apt-get download -qq -t bookworm-backports qemu-user 2>/dev/null) &&
        dpkg-deb -x target/qemu-bpo/qemu-user_*.deb target/qemu-bpo; } || [[ ! -x "$qemu" ]]; then
      echo "SKIPPED: s390x tests: no qemu-s390x >= 8 here, and none from bookworm-backports"
      exit 0
    fi
  fi
fi
echo "qemu: $qemu ($("$qemu" --version | head -n 1))"
export CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_RUNNER="$qemu -L /usr/s390x-linux-gnu"

tests=(--lib --test gemm --test kernels --test guard_pages --test onnx_vectors --test reproducible
  --test blob_format --test bad_inputs --test ffi_pack_config --test ffi_gemm_ex --test miri_core)
DYNQ_REQUIRE_ISA=scalar cargo test --release --target "$target" "${tests[@]}"

cargo build --release --target "$target" --lib --bin dynq
DYNQ_QEMU_S390X=$qemu DYNQ_LIB_DIR=target/$target/release DYNQ_TEST_ARCH=s390x tests/c/run.sh
"$qemu" -L /usr/s390x-linux-gnu target/$target/release/dynq info
