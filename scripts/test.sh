#!/usr/bin/env bash
# One command from a fresh clone: venv with the test extra, lint, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh test
export JAX_PLATFORMS=cpu
.venv/bin/ruff check aotlm tests benchmarks
.venv/bin/python -m pytest -q "$@"
