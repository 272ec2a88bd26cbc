#!/usr/bin/env bash
# Builds dynq for 32-bit x86 Linux (i686: 32-bit usize and pointers, scalar kernels) and runs
# its core Rust tests and the C ABI test program natively: the size checks that refuse
# overflowing shapes, strides and blobs must hold where usize is 32 bits as well as 64, and the
# output bits must still equal the recorded digests. Needs the 32-bit C runtime (gcc-multilib), installed here if missing.
# Prints "SKIPPED: ..." and exits 0 if the target or that runtime cannot be had, or the host
# cannot run 32-bit x86 programs.
set -euo pipefail
cd "$(dirname "$0")/.."

target=i686-unknown-linux-gnu
if [ "$(uname -m)" != x86_64 ]; then
  echo "SKIPPED: i686 tests: this host ($(uname -m)) does not run 32-bit x86 programs"
  exit 0
fi
if ! rustup target list --installed 2>/dev/null | grep -q "^$target$"; then
  if ! rustup target add "$target"; then
    echo "SKIPPED: i686 tests: rustup could not install the $target target"
    exit 0
  fi
fi
# The 32-bit crt files and libgcc that rustc's link step (through cc -m32) needs. The
# versioned package (gcc-12-multilib) and not the gcc-multilib metapackage: Debian's
# metapackage conflicts with the aarch64 and s390x cross compilers, so installing it removed
# them and the later steps that compile C for those targets failed.
if ! echo 'int main(void){return 0;}' | cc -m32 -x c - -o /dev/null 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  multilib="gcc-$(gcc -dumpversion 2>/dev/null | cut -d. -f1)-multilib"
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$multilib"; }; then
    echo "SKIPPED: i686 tests: could not install gcc-multilib"
    exit 0
  fi
fi

tests=(--lib --test bad_inputs --test gemm --test kernels --test reproducible --test blob_format
  --test ffi_pack_config --test ffi_gemm_ex --test corruption --test guard_pages --test miri_core)
DYNQ_REQUIRE_ISA=scalar cargo test --release --target "$target" "${tests[@]}"
cargo build --release --target "$target" --lib --bin dynq
DYNQ_LIB_DIR=target/$target/release DYNQ_TEST_ARCH=i686 tests/c/run.sh
target/$target/release/dynq info
