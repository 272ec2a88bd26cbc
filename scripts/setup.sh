#!/usr/bin/env bash
# Installs what dynq's tests need on a fresh machine. Idempotent: skips what is present.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have cc || need_apt+=(gcc)
have c++ || need_apt+=(g++)
have python3 || need_apt+=(python3 python3-pip)
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

if have rustup; then
  for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
  done
fi
echo "setup: ok"
