#!/usr/bin/env bash
# The library and the dynq command compile, without warnings, for targets CI cannot run:
# macOS (arm64 and x86-64), Windows (x86-64), riscv64, and 32-bit x86 and ARM. There dynq runs
# its NEON kernels (macOS arm64), its x86-64 kernels (macOS and Windows on x86-64) or the scalar
# ones (the rest); these builds keep platform-specific code (huge pages, fork handling, the ISA
# detection) behind the right cfg. Prints "SKIPPED: <target>" for a target rustup cannot install.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in aarch64-apple-darwin x86_64-apple-darwin x86_64-pc-windows-gnu riscv64gc-unknown-linux-gnu \
  i686-unknown-linux-gnu armv7-unknown-linux-gnueabihf; do
  if ! rustup target list --installed 2>/dev/null | grep -q "^$t$" && ! rustup target add "$t" >/dev/null 2>&1; then
    echo "SKIPPED: $t (rustup could not install it)"
    continue
  fi
  RUSTFLAGS="-D warnings" cargo check --quiet --release --target "$t" --lib --bins
  echo "ok: $t"
done
