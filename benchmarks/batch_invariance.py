"""How often does greedy output change with what else shares the batch?

    .venv/bin/python benchmarks/batch_invariance.py [--prompts 32] [--tokens 32]

Serves every prompt alone, then all of them together through continuous batching (so each step
lands in other token/request buckets and other rows), and counts sequences and tokens that differ.
XLA:CPU matmuls are not batch-invariant (DESIGN.md), so this is a measurement, not a guarantee:
what the design does guarantee is that sampling itself is per row, keyed by (seed, step).
Prints a table and writes benchmarks/results/batch_invariance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--yaml", type=Path, default=ROOT / "artifacts/tiny-llama.yaml")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/batch_invariance.json")
    args = ap.parse_args()
    if not (ROOT / "checkpoints/tiny-llama/config.json").exists():
        make_tiny_checkpoint(ROOT / "checkpoints/tiny-llama")
    cfg = load_build_config(args.yaml)
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(6, 1000, size=int(n)).tolist() for n in rng.integers(1, 120, args.prompts)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_bundle(cfg, Path(tmp) / "b")
        engine = Engine.from_bundle(Path(tmp) / "b")
        alone = [engine.generate([p], params)[0][0].token_ids for p in prompts]
        together = [c.token_ids for (c,) in engine.generate(prompts, params)]
    diff_seqs = sum(a != b for a, b in zip(alone, together, strict=True))
    first_diff = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        for a, b in zip(alone, together, strict=True)
    ]
    diff_tokens = sum(len(a) - i for a, i in zip(alone, first_diff, strict=True) if i is not None)
    report = {
        "prompts": len(prompts),
        "tokens_per_prompt": args.tokens,
        "sequences_that_differ": diff_seqs,
        "tokens_after_first_difference": diff_tokens,
        "total_tokens": len(prompts) * args.tokens,
        "compiles_after_ready": engine.compiles_after_ready,
    }
    print(
        f"{'prompts':>7}  {'tokens':>6}  {'seqs differ':>11}  {'tokens differ':>13}  {'compiles':>8}"
    )
    print(
        f"{report['prompts']:>7}  {report['total_tokens']:>6}  {diff_seqs:>11}  {diff_tokens:>13}"
        f"  {report['compiles_after_ready']:>8}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
