#!/usr/bin/env bash
# Runs every test of dynq, after installing what the tests need (scripts/setup.sh).
#
# DYNQ_REQUIRE_ISA=avx512_vnni,avx2 (or "all") turns the skip of an ISA this CPU lacks into a
# failure; .ci/run sets it from /proc/cpuinfo so CI proves each kernel path really ran.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

step() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%T)"; }

step "format (cargo fmt --check)"
cargo fmt --check

step "lint (cargo clippy -D warnings)"
cargo clippy --all-targets --quiet -- -D warnings

step "Rust unit, integration and header tests (cargo test)"
DYNQ_REQUIRE_ORT=1 cargo test --all-targets

step "doc tests"
cargo test --doc --quiet

step "ONNX node-test vectors match the installed onnx package"
python3 tools/gen_onnx_vectors.py --check

step "C ABI test program (C99 and C++)"
tests/c/run.sh

# Does this CPU lack AVX-512 VNNI or AVX-VNNI (an x86-64 host only)? Then the last step runs
# those kernels under Bochs; Bochs is built now, in the background on one core at low priority
# (the emulation steps below leave room for it), so that the last step only boots.
needs_bochs() {
  [ "$(uname -m)" = x86_64 ] && ! { grep -qw avx512_vnni /proc/cpuinfo && grep -qw avx_vnni /proc/cpuinfo; }
}
bochs_build_pid=
if needs_bochs; then
  DYNQ_BOCHS_BUILD_ONLY=1 DYNQ_BOCHS_JOBS=1 nice -n 10 scripts/under-bochs.sh >target/bochs-build.log 2>&1 &
  bochs_build_pid=$!
fi

step "aarch64: NEON kernels under qemu-user (max, neoverse-n1, cortex-a53)"
scripts/test-aarch64.sh

step "s390x (big-endian): core tests and the C ABI test program under qemu-user"
scripts/test-s390x.sh

step "i686 (32-bit usize and pointers): core tests and the C ABI test program, natively"
scripts/test-i686.sh

step "other targets compile without warnings (macOS, Windows, riscv64, 32-bit x86 and ARM)"
scripts/check-targets.sh

step "CLI smoke test"
cargo run --release --quiet --bin dynq -- info
cargo run --release --quiet --bin dynq -- bench --shapes 3x40x50,1x64x4096 --min-time 0
cargo run --release --quiet --bin dynq -- bench --shapes 7x40x50 --min-time 0 --weight-qmax 64
cargo run --release --quiet --bin dynq -- bench --shapes 9x40x50 --min-time 0 --threads 1,2 --json target/bench-smoke.json
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["shapes"][0]["threads_ms"].keys() == {"1", "2"}, d' target/bench-smoke.json
cargo run --release --quiet --bin dynq -- bench --shapes 2x512x2048 --min-time 0 --threads 1,2 --cold-bytes 8388608 --json target/bench-cold.json
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); s = d["shapes"][0]; assert s["cold_copies"] >= 2 and s["cold_threads_ms"].keys() == {"1", "2"} and d["cold_read_gbs"] > 0, d' target/bench-cold.json
if grep -qw avx2 /proc/cpuinfo; then python3 bench/avx2_steps.py --rounds 1; fi

step "CMake package: install, C++ consumer (find_package, shared and static, ctest), pkg-config, exports"
tests/cmake_consumer/run.sh

step "Go binding (cgo; go vet, go test shared and -tags dynq_static; offline)"
bindings/go/test.sh

step "C# binding (P/Invoke; mcs + mono)"
bindings/csharp/test.sh

step "Python package: numpy wrapper, ONNX Runtime op, converter, real model (onnxruntime 1.31.1)"
cargo build --release --lib --quiet
DYNQ_REQUIRE_MODEL=1 python3 -m pytest -q -p no:cacheprovider bindings/python/tests

step "portable build (glibc >= 2.17, x86_64 and aarch64): checks, C ABI tests (aarch64 under qemu), Python op tests, the wheel"
scripts/build-portable.sh x86_64 aarch64
DYNQ_LIB_DIR=dist/linux-x86_64 tests/c/run.sh
DYNQ_LIB_DIR=dist/linux-aarch64 DYNQ_TEST_ARCH=aarch64 tests/c/run.sh
DYNQ_LIBRARY=$PWD/dist/linux-x86_64/libdynq.so python3 -m pytest -q -p no:cacheprovider \
  bindings/python/tests/test_wrapper.py bindings/python/tests/test_ort_op.py bindings/python/tests/test_fork.py
# The wheel, installed into a fresh virtual environment and used from outside the source tree.
rm -rf target/wheel-test
python3 -m venv --system-site-packages target/wheel-test
target/wheel-test/bin/pip install --quiet --no-deps dist/dynq-*-manylinux2014_x86_64.whl
(cd "${TMPDIR:-/tmp}" && "$OLDPWD/target/wheel-test/bin/python" "$OLDPWD/tests/wheel_smoke.py")

step "ONNX Runtime op and converter on the oldest supported runtime (onnxruntime 1.17.3)"
target/py-ort1.17/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests/test_wrapper.py \
  bindings/python/tests/test_ort_op.py bindings/python/tests/test_convert.py bindings/python/tests/test_convert_random.py

step "fuzzing (every cargo-fuzz target, 45 s each), then the VNNI kernels under Bochs, with sanitizers in parallel (C ABI tests under ASan+UBSan, Miri)"
# The fuzzers, then the Bochs run, use one core; the sanitizer builds and Miri use the other
# (they take longest). docs/reliability.md.
scripts/sanitize.sh >target/sanitize.log 2>&1 &
sanitize_pid=$!
fuzz_status=0
scripts/fuzz.sh -t 45 || fuzz_status=$?

# The AVX-512 VNNI and AVX-VNNI kernels on an emulated Sapphire Rapids (Bochs): the kernel,
# digest, GEMM, guard-page, gemm_ex and blob-format tests and the C ABI test program, with
# every ISA required (scripts/under-bochs.sh). On a CPU that has both, the tests above already
# ran those kernels natively (.ci/run requires every ISA the CPU has).
step "AVX-512 VNNI and AVX-VNNI kernels on an emulated Sapphire Rapids, if this CPU lacks either"
bochs_status=0
if [ -n "$bochs_build_pid" ]; then
  wait "$bochs_build_pid" || echo "building Bochs in the background failed (target/bochs-build.log); building it again"
  tail -n 1 target/bochs-build.log
fi
if [ "$(uname -m)" != x86_64 ]; then
  echo "skipped: not an x86-64 host"
elif ! needs_bochs; then
  echo "skipped: this CPU runs both natively"
else
  DYNQ_BOCHS_JOBS=1 scripts/under-bochs.sh || bochs_status=$?
fi

sanitize_status=0
wait "$sanitize_pid" || sanitize_status=$?
cat target/sanitize.log
if [ "$fuzz_status" != 0 ] || [ "$bochs_status" != 0 ] || [ "$sanitize_status" != 0 ]; then
  echo "fuzzing (status $fuzz_status), Bochs (status $bochs_status) or sanitizers (status $sanitize_status) FAILED"
  exit 1
fi

step "all tests passed"
