#!/usr/bin/env bash
# Cross-builds dynq for aarch64 and runs its Rust tests under qemu-user on three CPU models, so
# every NEON kernel really runs: `max` (dotprod + i8mm), `neoverse-n1` (dotprod, no i8mm) and
# `cortex-a53` (plain NEON). DYNQ_REQUIRE_ISA makes a kernel that is not detected a failure.
# Prints "SKIPPED: ..." and exits 0 if the cross toolchain cannot be installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
if ! rustup target list --installed 2>/dev/null | grep -q "^$target$"; then
  if ! rustup target add "$target"; then
    echo "SKIPPED: aarch64 tests: rustup could not install the $target target"
    exit 0
  fi
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
      gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; }; then
    echo "SKIPPED: aarch64 tests: could not install gcc-aarch64-linux-gnu / qemu-user"
    exit 0
  fi
fi

tests=(--lib --test kernels --test gemm --test onnx_vectors --test reproducible --test ffi_pack_config --test blob_format)
cargo test --target "$target" --no-run "${tests[@]}"
for model in max:scalar,neon,neon_dotprod,neon_i8mm neoverse-n1:scalar,neon,neon_dotprod cortex-a53:scalar,neon; do
  cpu=${model%%:*}
  echo "--- qemu-aarch64, QEMU_CPU=$cpu, DYNQ_REQUIRE_ISA=${model#*:}"
  QEMU_CPU=$cpu DYNQ_REQUIRE_ISA=${model#*:} cargo test --target "$target" "${tests[@]}"
done

# On a CPU without the dot-product extension a forced NEON dotprod/i8mm kernel must be refused
# with an error, never executed (qemu enforces the model: an sdot there is SIGILL).
cargo build --target "$target" --release --bin dynq
bin=target/$target/release/dynq
for isa in neon_dotprod neon_i8mm; do
  if out=$(QEMU_CPU=cortex-a53 DYNQ_ISA=$isa qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" bench --shapes 2x8x8 --min-time 0 2>&1); then
    echo "FAIL: DYNQ_ISA=$isa ran on cortex-a53"; exit 1
  fi
  echo "$out" | grep -q "does not support" || { echo "FAIL: unexpected message: $out"; exit 1; }
  echo "ok: DYNQ_ISA=$isa refused on cortex-a53: $(echo "$out" | tail -1)"
done
QEMU_CPU=max qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" info
