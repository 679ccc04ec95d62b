#!/usr/bin/env bash
# One command from a fresh clone: venv with the test extra, lint, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tpu extra (libtpu) lets the deviceless TPU compile tests run on this CPU-only machine.
scripts/venv.sh test,tpu
export JAX_PLATFORMS=cpu
# The registry tests start a real CNCF distribution registry (Debian's docker-registry) on loopback.
if ! command -v docker-registry >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq docker-registry) >/dev/null 2>&1 ||
    echo "warning: could not install docker-registry; registry tests will skip" >&2
fi
.venv/bin/ruff check aotlm tests benchmarks setup.py
.venv/bin/python -m pytest -q "$@"
