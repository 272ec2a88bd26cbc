#!/usr/bin/env bash
# Builds libdynq for distribution: a shared and a static library that load on any Linux with
# glibc 2.17 or newer (RHEL/CentOS 7 and later, Ubuntu 14.04 and later, Amazon Linux 2, Debian 8
# and later), whatever machine builds them.
#
#   scripts/build-portable.sh [x86_64] [aarch64]      default: this machine's architecture
#
# A plain `cargo build` links against the build machine's glibc, and symbol versions from it
# (GLIBC_2.34 on a current distribution) make the library fail to load on older systems:
#   libdynq.so: version `GLIBC_2.34' not found
# which is how custom-op libraries copied to a server often fail. Here the linker is zig's
# (`cargo zigbuild`, installed from PyPI into target/py-zig), which links against glibc 2.17's
# symbol versions. Then every result is checked: no glibc symbol newer than 2.17, no library
# dependency beyond libc/libm/libpthread/libdl/ld-linux, the SONAME, and the dynamic exports
# (the dynq_* API and RegisterCustomOps, as the native build's).
#
# Output: dist/linux-<arch>/{libdynq.so, libdynq.a, dynq.h, dynq.hpp, SHA256SUMS}, and the
# Python package with that library inside as a wheel for any Python 3.8+ on such a system:
# dist/dynq-<version>-py3-none-manylinux2014_<arch>.whl (`pip install` it; the ONNX tools need
# `pip install onnx onnxruntime` too).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

archs=("$@")
[ ${#archs[@]} -gt 0 ] || archs=("$(uname -m)")
GLIBC_MAX=2.17

venv=target/py-zig
if [ ! -x "$venv/bin/cargo-zigbuild" ]; then
  echo "== installing ziglang and cargo-zigbuild (PyPI) into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "ziglang==0.17.1" "cargo-zigbuild==0.24.1" "setuptools>=61" wheel
fi
export PATH="$PWD/$venv/bin:$PATH"

# The native build's exports are the reference (the API may grow; the set must not differ).
cargo build --release --lib --quiet
exports() { nm -D --defined-only "$1" | awk '{print $3}' | sed 's/@.*//' | sort -u; }
want_exports=$(exports target/release/libdynq.so)

status=0
for arch in "${archs[@]}"; do
  case "$arch" in
    x86_64 | amd64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    *) echo "build-portable: unknown architecture $arch (x86_64 or aarch64)" >&2; exit 2 ;;
  esac
  triple=$arch-unknown-linux-gnu
  rustup target list --installed 2>/dev/null | grep -qx "$triple" || rustup target add "$triple"
  echo "== $arch: cargo zigbuild --release --lib --target $triple.$GLIBC_MAX"
  # A target directory of its own: the other builds of this triple use another linker.
  # Without debug information (the release profile keeps it for profiling): 7.8 MB -> ~1 MB.
  CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    cargo zigbuild --release --lib --quiet --target "$triple.$GLIBC_MAX" --target-dir target/portable
  out=dist/linux-$arch
  rm -rf "$out" && mkdir -p "$out"
  cp "target/portable/$triple/release/libdynq.so" "target/portable/$triple/release/libdynq.a" "$out/"
  cp include/dynq.h bindings/cpp/dynq.hpp "$out/"
  so=$out/libdynq.so

  # Checks.
  newest=$(objdump -T "$so" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n 1)
  if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC_MAX" | sort -V | tail -n 1)" != "$GLIBC_MAX" ]; then
    echo "FAIL  $so needs glibc $newest (> $GLIBC_MAX):"; objdump -T "$so" | grep "GLIBC_$newest"; status=1
  else
    echo "ok    newest glibc symbol version: $newest (<= $GLIBC_MAX)"
  fi
  needed=$(objdump -p "$so" | awk '/NEEDED/ {print $2}' | sort | tr '\n' ' ')
  if echo "$needed" | tr ' ' '\n' | grep -v -E '^(libc|libm|libpthread|libdl|librt|ld-linux-(x86-64|aarch64))\.so\.[0-9]+$' | grep -q .; then
    echo "FAIL  unexpected library dependencies: $needed"; status=1
  else
    echo "ok    needs only: $needed"
  fi
  soname=$(objdump -p "$so" | awk '/SONAME/ {print $2}')
  if [[ "$soname" == libdynq.so.* ]]; then echo "ok    SONAME $soname"; else echo "FAIL  SONAME '$soname'"; status=1; fi
  if [ "$(exports "$so")" == "$want_exports" ]; then
    echo "ok    exports the same $(echo "$want_exports" | wc -l) symbols as the native build"
  else
    echo "FAIL  exports differ from the native build:"; diff <(echo "$want_exports") <(exports "$so") || true; status=1
  fi
  (cd "$out" && sha256sum libdynq.so libdynq.a dynq.h dynq.hpp >SHA256SUMS)
  echo "      $out: $(ls "$out" | tr '\n' ' ')"

  # The wheel: the package sources plus this library, tagged for glibc 2.17 (manylinux2014).
  # has_ext_modules makes it a platform wheel (installed as platlib); the tags then say "any
  # Python 3", since the library is reached through ctypes, not the Python C API.
  stage=target/wheel-stage/$arch
  rm -rf "$stage" target/wheel-tmp && mkdir -p "$stage" target/wheel-tmp
  cp -r bindings/python/pyproject.toml bindings/python/README.md bindings/python/dynq "$stage/"
  find "$stage" -name __pycache__ -prune -exec rm -rf {} +
  cp "$so" "$stage/dynq/libdynq.so"
  cat >"$stage/setup.py" <<'PY'
from setuptools import setup
from setuptools.dist import Distribution


class BinaryDistribution(Distribution):
    def has_ext_modules(self):
        return True


setup(distclass=BinaryDistribution)
PY
  "$venv/bin/pip" wheel --quiet --no-deps --no-build-isolation -w target/wheel-tmp "$stage"
  built=(target/wheel-tmp/dynq-*.whl)
  "$venv/bin/python" -m wheel tags --remove --python-tag py3 --abi-tag none \
    --platform-tag "manylinux2014_$arch" "${built[0]}" >/dev/null
  rm -f dist/dynq-*-manylinux2014_"$arch".whl
  mv target/wheel-tmp/dynq-*-py3-none-manylinux2014_"$arch".whl dist/
  echo "ok    $(ls dist/dynq-*-manylinux2014_"$arch".whl)"
done
exit $status
