#!/usr/bin/env bash
# Builds libdynq and installs the libraries, headers, CMake package and pkg-config files
# under a prefix, through the root CMakeLists.txt:
#
#   scripts/install.sh [PREFIX]          default PREFIX: /usr/local
#
# is the same as
#
#   cmake -S . -B target/cmake-build -DCMAKE_INSTALL_PREFIX=PREFIX
#   cmake --build target/cmake-build
#   cmake --install target/cmake-build
#
# Then: find_package(dynq 0.1 CONFIG REQUIRED) with CMAKE_PREFIX_PATH=PREFIX, or
# PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs dynq. The build directory
# can be changed with DYNQ_CMAKE_BUILD_DIR; DESTDIR is honoured as usual.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prefix=$(realpath -m "${1:-/usr/local}")
build=${DYNQ_CMAKE_BUILD_DIR:-target/cmake-build}

cmake -S . -B "$build" -DCMAKE_INSTALL_PREFIX="$prefix"
cmake --build "$build"
cmake --install "$build" --prefix "$prefix"
