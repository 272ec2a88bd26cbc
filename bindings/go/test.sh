#!/usr/bin/env bash
# Tests the Go binding offline (GOPROXY=off, standard library only): gofmt, go vet and
# go test, once linked against libdynq.so and once with -tags dynq_static against libdynq.a.
#
# It installs dynq into DYNQ_PREFIX (default: target/dynq-prefix) with scripts/install.sh
# and finds it there through pkg-config, as a user's build would.
#
# Usage (from anywhere): bindings/go/test.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
prefix=${DYNQ_PREFIX:-$root/target/dynq-prefix}

"$root/scripts/install.sh" "$prefix" >/dev/null

export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
export GOPROXY=off GOTOOLCHAIN=local GOWORK=off GOFLAGS=
cd "$root/bindings/go"
go version

echo "== gofmt"
unformatted=$(gofmt -l .)
if [[ -n "$unformatted" ]]; then
    echo "gofmt: these files need formatting: $unformatted" >&2
    exit 1
fi

echo "== go vet (shared, static)"
go vet ./...
go vet -tags dynq_static ./...

echo "== go test (libdynq.so)"
LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" go test -count=1 -v ./... >"$root/target/go-test-shared.log" 2>&1 ||
    { cat "$root/target/go-test-shared.log"; exit 1; }
grep -E '^(--- |ok|FAIL)' "$root/target/go-test-shared.log"

echo "== go test -tags dynq_static (libdynq.a; no LD_LIBRARY_PATH)"
env -u LD_LIBRARY_PATH go test -count=1 -v -tags dynq_static ./... >"$root/target/go-test-static.log" 2>&1 ||
    { cat "$root/target/go-test-static.log"; exit 1; }
grep -E '^(--- |ok|FAIL)' "$root/target/go-test-static.log"

pass=$(cat "$root/target/go-test-shared.log" "$root/target/go-test-static.log" | grep -c -- '--- PASS' || true)
echo "(tests and subtests of both runs, shared and static)"
echo "go: $pass passed, 0 failed"
