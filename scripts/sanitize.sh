#!/usr/bin/env bash
# Sanitizers over dynq:
#
# 1. The C ABI test programs (tests/c/test_abi.c: every check of tests/c/run.sh, as C99 and as
#    C++17; tests/c/test_robustness.c: large-blob corruption and a many-thread stress on one
#    handle) built with -fsanitize=address,undefined and linked against the normal release
#    libdynq.so. What that instruments: every memory access and every operation with undefined
#    behaviour in the C/C++ test code, i.e. each read and write the C side makes of buffers
#    dynq filled or reported sizes for; and, through ASan's interposed malloc/free/memcpy/
#    memset, every heap allocation of the whole process, libdynq's included (double or invalid
#    frees, leaks at exit, memcpy/memset out of bounds of a heap block, also when libdynq calls
#    them). What it does not instrument: the loads and stores of libdynq's own Rust code (it is
#    not compiled with ASan). Hence:
# 2. asan-dynq: the same programs against a libdynq.so compiled with -Zsanitizer=address
#    (nightly), the ASan runtime coming from the C program. Now dynq's own loads and stores,
#    SIMD kernels included, are checked too. (UBSan has no Rust counterpart; Miri covers that.)
#    The fuzz targets also build dynq with ASan (scripts/fuzz.sh).
# 3. Miri (pinned nightly) over the library's unit tests (quantization, packing and unpacking
#    for every kernel layout, serialization incl. every bit flip of a small blob, the C ABI
#    helpers) and tests/miri_core.rs (the scalar GEMM end to end, also on two worker threads,
#    gemm_i32, f16/bf16, serialization, and the C ABI shell with raw pointers). Tree Borrows:
#    rayon's crossbeam-epoch trips Stacked Borrows; leaks are ignored because the worker pool
#    lives for the whole process.
#
# Usage: scripts/sanitize.sh [asan|asan-dynq|miri]...   (default: all three)
#   SKIP_BUILD=1 skips `cargo build --release` (part asan). Outputs go to target/sanitize/.
set -euo pipefail
cd "$(dirname "$0")/.."

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(asan asan-dynq miri)
nightly=${DYNQ_NIGHTLY:-nightly-2026-10-30}
failed=0

# build_and_run <variant> <libdir>: compiles the C programs with ASan+UBSan against
# <libdir>/libdynq.so and runs them (all modes of tests/c/run.sh, every usable ISA).
build_and_run() {
  local variant=$1 libdir=$2
  local out=target/sanitize/$variant
  mkdir -p "$out/lib"
  # The SONAME link the binaries look up (see tests/c/run.sh).
  soname=$(readelf -d "$libdir/libdynq.so" | grep -i soname | grep -o 'libdynq\.so[.0-9]*' | head -n 1 || true)
  if [[ -n "$soname" && "$soname" != libdynq.so ]]; then
    ln -sfn "$PWD/$libdir/libdynq.so" "$out/lib/$soname"
  fi
  CC=${CC:-cc}
  CXX=${CXX:-c++}
  flags=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
    -Wall -Wextra -Werror -pedantic -ffp-contract=off -Iinclude)
  link=(-L"$libdir" -ldynq -lm -lpthread)
  echo "== $variant: compiling with -fsanitize=address,undefined ($("$CC" --version | head -n 1))"
  "$CC" -std=c99 "${flags[@]}" tests/c/test_abi.c -o "$out/test_abi_c99" "${link[@]}"
  "$CXX" -x c++ -std=c++17 "${flags[@]}" tests/c/test_abi.c -o "$out/test_abi_cxx17" "${link[@]}"
  "$CC" -std=c99 "${flags[@]}" tests/c/test_robustness.c -o "$out/test_robustness_c99" "${link[@]}"
  "$CXX" -x c++ -std=c++11 "${flags[@]}" tests/c/test_robustness.c -o "$out/test_robustness_cxx11" "${link[@]}"

  # allocator_may_return_null: the 4 TiB request of the OUT_OF_MEMORY test returns NULL to dynq
  # (as the normal allocator does) instead of aborting.
  export ASAN_OPTIONS="allocator_may_return_null=1:detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  local foreign
  case "$(uname -m)" in
    x86_64 | i?86) foreign=neon_i8mm ;;
    *) foreign=avx512_vnni ;;
  esac
  local total=0
  run() { # run <log> <env...> -- <binary> [mode]
    local log="$out/$1.log"
    shift
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    if env -u DYNQ_ISA -u DYNQ_NUM_THREADS "${envs[@]}" LD_LIBRARY_PATH="$out/lib:$libdir" "$@" >"$log" 2>&1 &&
      ! grep -q -E 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$log"; then
      echo "ok    ${envs[*]} ${*#$out/}: $(tail -n 1 "$log")"
      total=$((total + $(tail -n 1 "$log" | awk '{print $1}')))
    else
      echo "FAIL  ${envs[*]} $*: (log: $log)"
      grep -E '^FAIL|ERROR|SUMMARY|runtime error' "$log" | head -n 30 || true
      failed=1
    fi
  }
  for bin in test_abi_c99 test_abi_cxx17; do
    run "$bin" -- "$out/$bin"
    run "$bin.env-isa-invalid" DYNQ_ISA=no_such_isa -- "$out/$bin" env-isa-invalid
    run "$bin.env-isa-unsupported" "DYNQ_ISA=$foreign" -- "$out/$bin" env-isa-unsupported
    run "$bin.env-isa-scalar" DYNQ_ISA=scalar -- "$out/$bin" env-isa-scalar
    run "$bin.env-threads-invalid" DYNQ_NUM_THREADS=0 -- "$out/$bin" env-threads-invalid
    run "$bin.env-threads-2" DYNQ_NUM_THREADS=2 -- "$out/$bin" env-threads-2
  done
  for isa in $(target/release/dynq info 2>/dev/null | awk '/usable$/ { sub("isa=", "", $2); print $2 }' | sort -u); do
    run "test_abi_c99.isa-$isa" "DYNQ_ISA=$isa" -- "$out/test_abi_c99"
  done
  run test_robustness_c99 -- "$out/test_robustness_c99"
  run test_robustness_cxx11 -- "$out/test_robustness_cxx11"
  echo "$variant: $total checks passed with no sanitizer report"
}

run_asan() {
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release --quiet
  fi
  build_and_run asan target/release
}

run_asan_dynq() {
  # libdynq itself compiled with AddressSanitizer (nightly -Zsanitizer=address), its runtime
  # coming from the ASan C programs that load it: now the loads and stores of dynq's own code,
  # the SIMD kernels included, are checked too.
  local target=x86_64-unknown-linux-gnu
  [ "$(uname -m)" = x86_64 ] || target=aarch64-unknown-linux-gnu
  echo "== asan-dynq: building libdynq with -Zsanitizer=address ($nightly)"
  RUSTFLAGS="-Zsanitizer=address" cargo "+$nightly" build --quiet --release --lib --target "$target" \
    --target-dir target/asan-lib
  build_and_run asan-dynq "target/asan-lib/$target/release"
}

run_miri() {
  export MIRIFLAGS="${MIRIFLAGS:--Zmiri-tree-borrows -Zmiri-ignore-leaks -Zmiri-permissive-provenance}"
  echo "== Miri ($nightly, MIRIFLAGS=$MIRIFLAGS): library unit tests and tests/miri_core.rs"
  local log=target/sanitize/miri.log
  mkdir -p target/sanitize
  if cargo "+$nightly" miri test --quiet --lib --test miri_core >"$log" 2>&1; then
    grep -E '^test result' "$log" | sed 's/^/miri: /'
  else
    grep -v -E '^\s+(at |[0-9]+: )' "$log" | grep -E -B2 -A20 'error|panicked|FAILED' | head -n 60 || tail -n 40 "$log"
    echo "FAIL  Miri (log: $log)"
    failed=1
  fi
}

for p in "${parts[@]}"; do
  case $p in
    asan) run_asan ;;
    asan-dynq) run_asan_dynq ;;
    miri) run_miri ;;
    *) echo "sanitize.sh: unknown part $p (asan, asan-dynq, miri)"; exit 2 ;;
  esac
done
if [[ $failed != 0 ]]; then
  echo "sanitizers: FAILED"
  exit 1
fi
echo "sanitizers: clean"
