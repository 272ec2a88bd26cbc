#!/usr/bin/env bash
# Fuzzes dynq with cargo-fuzz: libFuzzer, AddressSanitizer, debug assertions and overflow
# checks, on the pinned nightly toolchain (scripts/setup.sh installs it and cargo-fuzz).
#
# Usage: scripts/fuzz.sh [-t SECONDS] [-j JOBS] [TARGET...]
#   -t SECONDS  time per target (default 50: the short run of scripts/test.sh / CI)
#   -j JOBS     parallel libFuzzer jobs per target (default 1)
#   TARGET      deserialize, ffi, differential (default: all three)
#
# Long run (before a release, or after touching src/pack, src/ffi, src/kernels or src/gemm):
#   scripts/fuzz.sh -t 3600 -j 2                 # an hour per target on both cores
#   scripts/fuzz.sh -t 28800 -j 2 differential   # overnight, one target
#
# The corpus is fuzz/corpus/<target>/ (not committed): seeded with valid blobs by
# tests/fuzz_seeds.rs, then grown by libFuzzer and kept between runs on the same machine.
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script; reproduce it with
#   cargo +$DYNQ_NIGHTLY fuzz run <target> fuzz/artifacts/<target>/<file>
# See docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=50
jobs=1
while getopts "t:j:" o; do
  case $o in
    t) secs=$OPTARG ;;
    j) jobs=$OPTARG ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(deserialize ffi differential)
nightly=${DYNQ_NIGHTLY:-nightly-2026-10-30}

command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: cargo-fuzz is missing (scripts/setup.sh installs it)"; exit 1; }

echo "== seeds (tests/fuzz_seeds.rs -> fuzz/corpus)"
DYNQ_FUZZ_SEED_DIR="$PWD/fuzz/corpus" cargo test --quiet --test fuzz_seeds >/dev/null

echo "== build (cargo +$nightly fuzz build: ASan, debug assertions, overflow checks)"
start=$(date +%s)
build_args=()
[ ${#targets[@]} -ne 1 ] || build_args=("${targets[0]}")
if ! cargo "+$nightly" fuzz build "${build_args[@]}" >target/fuzz-build.log 2>&1; then
  tail -n 40 target/fuzz-build.log
  echo "fuzz.sh: build failed (log: target/fuzz-build.log)"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s"

failed=0
summary=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  log="fuzz/artifacts/$t/last-run.log"
  before=$(ls "fuzz/corpus/$t" | wc -l)
  old_artifacts=$(ls "fuzz/artifacts/$t")
  echo "== $t: ${secs} s x ${jobs} job(s)"
  args=(-max_total_time="$secs" -print_final_stats=1 -timeout=30 -rss_limit_mb=4096 -max_len=65536)
  if [ "$jobs" -gt 1 ]; then
    args+=(-jobs="$jobs" -workers="$jobs")
  fi
  # ASan: allocation failures are returned to dynq (which reports OUT_OF_MEMORY) rather than
  # aborting; leaks are reported.
  if ASAN_OPTIONS="${ASAN_OPTIONS:-allocator_may_return_null=1:detect_leaks=1}" \
    cargo "+$nightly" fuzz run "$t" "fuzz/corpus/$t" -- "${args[@]}" >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed=1
  fi
  if [ "$jobs" -gt 1 ]; then
    # Each job writes fuzz-<i>.log in the current directory.
    execs=$(cat fuzz-*.log 2>/dev/null | awk '/stat::number_of_executed_units/ { s += $NF } END { print s + 0 }')
    cat fuzz-*.log >>"$log" 2>/dev/null || true
    rm -f fuzz-*.log
  else
    execs=$(awk '/stat::number_of_executed_units/ { s += $NF } END { print s + 0 }' "$log")
  fi
  after=$(ls "fuzz/corpus/$t" | wc -l)
  crashes=$(comm -13 <(echo "$old_artifacts") <(ls "fuzz/artifacts/$t") | grep -c -E '^(crash|leak|timeout|oom)-' || true)
  line="$t: $status, $execs executions in ${secs} s, corpus $before -> $after inputs, $crashes new crash artifacts"
  summary+=("$line")
  echo "$line"
  if [ $status != ok ]; then
    grep -E 'panicked|ERROR: |SUMMARY|Test unit written|Running: ' "$log" | head -20 || true
    echo "(full log: $log)"
  fi
done

echo
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit $failed
