#!/usr/bin/env bash
# Installs dynq with CMake into target/dynq-prefix (scripts/install.sh), then builds the
# consumer project in this folder against that prefix only and runs it under ctest.
#
# Usage (from anywhere): tests/cmake_consumer/run.sh
# Outputs: target/dynq-prefix (the installed package), target/cmake-consumer (the consumer).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

prefix=$PWD/target/dynq-prefix
build=$PWD/target/cmake-consumer

scripts/install.sh "$prefix"

echo "== installed files"
(cd "$prefix" && find . \( -type f -o -type l \) | sort | sed 's/^/  /')

echo "== consumer: configure, build, ctest"
rm -rf "$build"
cmake -S tests/cmake_consumer -B "$build" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$build" -j 2
ctest --test-dir "$build" --output-on-failure -j 2
