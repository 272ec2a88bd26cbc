#!/usr/bin/env bash
# Builds libdynq (release), compiles tests/c/test_abi.c as C99, C++11 and C++17 against
# include/dynq.h and target/release/libdynq.so, and runs each binary: the full suite, then the
# environment-variable modes (DYNQ_ISA, DYNQ_NUM_THREADS are read once per process).
#
# Usage (from anywhere): tests/c/run.sh        SKIP_BUILD=1 skips `cargo build --release`.
# Outputs go to target/ctest/. Fails if any compile or any check fails.
#
# Another build of the library (scripts/build-portable.sh) is tested with
#   DYNQ_LIB_DIR=dist/linux-x86_64 tests/c/run.sh
#   DYNQ_LIB_DIR=dist/linux-aarch64 DYNQ_TEST_ARCH=aarch64 tests/c/run.sh
# (aarch64 from another machine: compiled with aarch64-linux-gnu-gcc, as C99 only, and run
# under qemu-aarch64 with QEMU_CPU=max; outputs in target/ctest-<arch>-<dir name>), and a
# big-endian s390x build likewise with DYNQ_TEST_ARCH=s390x (scripts/test-s390x.sh), and a
# 32-bit x86 one, natively, with DYNQ_TEST_ARCH=i686 (scripts/test-i686.sh).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."

lib=${DYNQ_LIB_DIR:-target/release}
arch=${DYNQ_TEST_ARCH:-$(uname -m)}
runner=()
if [[ -z "${DYNQ_LIB_DIR:-}" && "${SKIP_BUILD:-0}" != 1 ]]; then
    cargo build --release
fi
if [[ ! -e $lib/libdynq.so ]]; then
    echo "run.sh: $lib/libdynq.so not found (build first)" >&2
    exit 1
fi

out=target/ctest
[[ -z "${DYNQ_LIB_DIR:-}" ]] || out=target/ctest-$arch-$(basename "$lib")
mkdir -p "$out/lib"
rel=$(realpath --relative-to="$out/lib" "$lib")

# libdynq.so carries a SONAME (libdynq.so.0.<minor>, see build.rs), which is the name the test
# binaries look up at run time; cargo does not create that link (ldconfig or an installer
# would), so provide it next to the test binaries.
soname=$( (readelf -d "$lib/libdynq.so" 2>/dev/null || objdump -p "$lib/libdynq.so" 2>/dev/null || true) |
    grep -i soname | grep -o 'libdynq\.so[.0-9]*' | head -n 1 || true)
if [[ -n "$soname" && "$soname" != libdynq.so ]]; then
    ln -sfn "$rel/libdynq.so" "$out/lib/$soname"
fi
libpath="$out/lib:$lib"
CC=${CC:-cc}
CXX=${CXX:-c++}
langs=(c99 cxx11 cxx17)
archflags=()
if [[ "$arch" != "$(uname -m)" ]]; then
    langs=(c99)
    case $arch in
        aarch64)
            CC=aarch64-linux-gnu-gcc
            runner=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
            export QEMU_CPU=max
            ;;
        s390x) # big-endian; DYNQ_QEMU_S390X names a qemu-s390x of version 8 or later
            CC=s390x-linux-gnu-gcc
            runner=("${DYNQ_QEMU_S390X:-qemu-s390x}" -L /usr/s390x-linux-gnu)
            # GCC for s390x evaluates float expressions in double under -std=c99
            # (FLT_EVAL_METHOD 1), so the test's float references would carry extra precision
            # that dynq's f32 arithmetic does not have.
            archflags=(-fexcess-precision=fast)
            ;;
        i686) # 32-bit x86, run natively on an x86_64 host (scripts/test-i686.sh); SSE
            # arithmetic, since the x87 default evaluates float expressions in long double
            [[ "$(uname -m)" == x86_64 ]] || { echo "run.sh: cannot run i686 binaries here" >&2; exit 2; }
            archflags=(-m32 -msse2 -mfpmath=sse)
            ;;
        *) echo "run.sh: cannot run $arch binaries here" >&2; exit 2 ;;
    esac
fi
common=(-O2 -g -Wall -Wextra -Werror -pedantic -ffp-contract=off -Iinclude ${archflags[@]+"${archflags[@]}"})
link=("-L$lib" -ldynq -lm -lpthread)

echo "== compiling (${langs[*]}) against $lib/libdynq.so"
for lang in "${langs[@]}"; do
    case $lang in
        c99) "$CC" -std=c99 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_c99" "${link[@]}" ;;
        cxx11) "$CXX" -x c++ -std=c++11 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_cxx11" "${link[@]}" ;;
        cxx17) "$CXX" -x c++ -std=c++17 "${common[@]}" tests/c/test_abi.c -o "$out/test_abi_cxx17" "${link[@]}" ;;
    esac
done

case "$arch" in
    x86_64 | i?86) foreign=neon_i8mm ;;
    *) foreign=avx512_vnni ;;
esac

failed=0
run() { # run <log name> <binary> [mode]: with the given extra environment in ENVV
    local log="$out/$1.log"
    shift
    if env -u DYNQ_ISA -u DYNQ_NUM_THREADS "${ENVV[@]}" LD_LIBRARY_PATH="$libpath" ${runner[@]+"${runner[@]}"} "$@" >"$log" 2>&1; then
        echo "ok    $* ${ENVV[*]}: $(tail -n 1 "$log")"
    else
        echo "FAIL  $* ${ENVV[*]}: $(tail -n 1 "$log") (log: $log)"
        grep '^FAIL' "$log" | head -n 50 || true
        failed=1
    fi
}

for lang in "${langs[@]}"; do
    bin=test_abi_$lang
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
if [[ "$arch" == aarch64 && "$arch" != "$(uname -m)" ]]; then
    isas="neon neon_dotprod neon_i8mm" # QEMU_CPU=max has them all
elif [[ "$arch" != "$(uname -m)" ]]; then
    isas="" # scalar only, run above
else
    isas=$(target/release/dynq info | awk '/usable$/ { sub("isa=", "", $2); print $2 }' | sort -u)
fi
for isa in $isas; do
    ENVV=(DYNQ_ISA=$isa)
    run "test_abi_c99.isa-$isa" "$out/test_abi_c99"
done

if [[ $failed != 0 ]]; then
    echo "C ABI tests FAILED"
    exit 1
fi
echo "C ABI tests passed against $lib/libdynq.so ($arch): $(tail -n 1 "$out/test_abi_c99.log") (full suite, each of ${langs[*]})"
