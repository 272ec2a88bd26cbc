#!/usr/bin/env bash
# ctest: builds header_check.c with the flags of the installed pkg-config modules (dynq and
# dynq-static), runs both programs, and checks the static one does not need libdynq.so.
#
# Usage: check_pkgconfig.sh <pkgconfig dir> <header_check.c> <work dir> <expected version>
set -euo pipefail
pcdir=$1 src=$2 work=$3 version=$4
export PKG_CONFIG_PATH="$pcdir"
PKG_CONFIG=${PKG_CONFIG:-pkg-config}
CC=${CC:-cc}
mkdir -p "$work"
fail() { echo "FAIL $*"; exit 1; }

got=$("$PKG_CONFIG" --modversion dynq) || fail "pkg-config cannot find dynq in $pcdir"
[[ "$got" == "$version" ]] || fail "pkg-config --modversion dynq is $got, expected $version"
[[ "$("$PKG_CONFIG" --modversion dynq-static)" == "$version" ]] || fail "dynq-static version"
static_libs=$("$PKG_CONFIG" --static --libs dynq)
[[ "$static_libs" == *-lpthread* ]] || fail "pkg-config --static --libs dynq lacks the native libraries: $static_libs"
libdir=$("$PKG_CONFIG" --variable=libdir dynq)

# shellcheck disable=SC2046 # pkg-config output is a list of flags
"$CC" -std=c99 -Wall -Wextra -Werror -pedantic $("$PKG_CONFIG" --cflags dynq) "$src" -o "$work/pc_shared" \
    $("$PKG_CONFIG" --libs dynq)
# shellcheck disable=SC2046
"$CC" -std=c99 -Wall -Wextra -Werror -pedantic $("$PKG_CONFIG" --cflags dynq-static) "$src" -o "$work/pc_static" \
    $("$PKG_CONFIG" --libs dynq-static)

LD_LIBRARY_PATH="$libdir" "$work/pc_shared" || fail "program linked with pkg-config dynq"
env -u LD_LIBRARY_PATH "$work/pc_static" || fail "program linked with pkg-config dynq-static"
if readelf -d "$work/pc_static" | grep -q 'NEEDED.*libdynq'; then
    fail "the dynq-static program needs a shared libdynq"
fi
echo "pkg-config: dynq $version (shared and static) builds and runs"
