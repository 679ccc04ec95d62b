#!/usr/bin/env bash
# One command from a fresh clone: venv, the embedded tiny checkpoint, a bundle, a generation.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
[ -f checkpoints/tiny-llama/config.json ] || .venv/bin/aotlm tiny-checkpoint checkpoints/tiny-llama
.venv/bin/aotlm build artifacts/tiny-llama.yaml -o bundles/tiny-llama
.venv/bin/aotlm verify bundles/tiny-llama
.venv/bin/aotlm generate bundles/tiny-llama --prompt "The compiler" --max-tokens 24
