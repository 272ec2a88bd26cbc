#!/usr/bin/env bash
# Builds libdynq (release), compiles tests/c/test_abi.c as C99, C++11 and C++17 against
# include/dynq.h and target/release/libdynq.so, and runs each binary: the full suite, then the
# environment-variable modes (DYNQ_ISA, DYNQ_NUM_THREADS are read once per process).
#
# Usage (from anywhere): tests/c/run.sh        SKIP_BUILD=1 skips `cargo build --release`.
# Outputs go to target/ctest/. Fails if any compile or any check fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release
fi
if [[ ! -e target/release/libdynq.so ]]; then
    echo "run.sh: target/release/libdynq.so not found (build first)" >&2
    exit 1
fi

out=target/ctest
mkdir -p "$out/lib"

# libdynq.so carries a SONAME (libdynq.so.0.<minor>, see build.rs), which is the name the test
# binaries look up at run time; cargo does not create that link (ldconfig or an installer
# would), so provide it next to the test binaries.
soname=$( (readelf -d target/release/libdynq.so 2>/dev/null || objdump -p target/release/libdynq.so 2>/dev/null || true) |
    grep -i soname | grep -o 'libdynq\.so[.0-9]*' | head -n 1 || true)
if [[ -n "$soname" && "$soname" != libdynq.so ]]; then
    ln -sfn ../../release/libdynq.so "$out/lib/$soname"
fi
libpath="$out/lib:target/release"
CC=${CC:-cc}
CXX=${CXX:-c++}
common=(-O2 -g -Wall -Wextra -Werror -pedantic -ffp-contract=off -Iinclude)
link=(-Ltarget/release -ldynq -lm -lpthread)

echo "== compiling (C99, C++11, C++17)"
"$CC" -std=c99 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_c99" "${link[@]}"
"$CXX" -x c++ -std=c++11 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_cxx11" "${link[@]}"
"$CXX" -x c++ -std=c++17 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_cxx17" "${link[@]}"

case "$(uname -m)" in
    x86_64 | i?86) foreign=neon_i8mm ;;
    *) foreign=avx512_vnni ;;
esac

failed=0
run() { # run <log name> <binary> [mode]: with the given extra environment in ENVV
    local log="$out/$1.log"
    shift
    if env -u DYNQ_ISA -u DYNQ_NUM_THREADS "${ENVV[@]}" LD_LIBRARY_PATH="$libpath" "$@" >"$log" 2>&1; then
        echo "ok    $* ${ENVV[*]}: $(tail -n 1 "$log")"
    else
        echo "FAIL  $* ${ENVV[*]}: $(tail -n 1 "$log") (log: $log)"
        grep '^FAIL' "$log" | head -n 50 || true
        failed=1
    fi
}

for bin in test_abi_c99 test_abi_cxx11 test_abi_cxx17; do
    echo "== $bin"
    ENVV=()
    run "$bin" "$out/$bin"
    ENVV=(DYNQ_ISA=no_such_isa)
    run "$bin.env-isa-invalid" "$out/$bin" env-isa-invalid
    ENVV=(DYNQ_ISA=$foreign)
    run "$bin.env-isa-unsupported" "$out/$bin" env-isa-unsupported
    ENVV=(DYNQ_ISA=scalar)
    run "$bin.env-isa-scalar" "$out/$bin" env-isa-scalar
    ENVV=(DYNQ_NUM_THREADS=0)
    run "$bin.env-threads-invalid" "$out/$bin" env-threads-invalid
    ENVV=(DYNQ_NUM_THREADS=2)
    run "$bin.env-threads-2" "$out/$bin" env-threads-2
done

# The full suite once more on every other kernel this CPU can run, forced with DYNQ_ISA.
for isa in $(target/release/dynq info | awk '/usable$/ { sub("isa=", "", $2); print $2 }'); do
    ENVV=(DYNQ_ISA=$isa)
    run "test_abi_c99.isa-$isa" "$out/test_abi_c99"
done

if [[ $failed != 0 ]]; then
    echo "C ABI tests FAILED"
    exit 1
fi
echo "C ABI tests passed: $(tail -n 1 "$out/test_abi_c99.log") (full suite, each of C99, C++11, C++17)"
