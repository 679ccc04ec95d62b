"""The sampler with and without logprobs: what `want_logprobs` saves per decode step.

    .venv/bin/python benchmarks/sampler.py [--rows 16] [--repeats 20] [--out PATH]

Times the exported `sample` function (jitted here, same code) on greedy rows over vocabularies of
the tiny model, Llama 3 and Qwen sizes, once with no row asking for logprobs (the log-softmax and
top-20 skipped on device) and once with every row asking, in the same run. Prints a table and
writes benchmarks/results/sampler.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from aotlm.kernels.sampling import sample
from aotlm.kernels.step_inputs import Sampling

ROOT = Path(__file__).resolve().parent.parent
VOCABS = {"tiny": 1000, "llama3": 128256, "qwen": 151936}


def time_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sampler.json")
    args = ap.parse_args()
    r = args.rows
    greedy = Sampling.pack([], r)  # padding rows are greedy rows that want no logprobs
    wanting = dataclasses.replace(greedy, want_logprobs=np.ones(r, np.int32))
    fn = jax.jit(sample)
    rows = []
    for name, vocab in VOCABS.items():
        logits = np.random.default_rng(0).standard_normal((r, vocab)).astype(np.float32)
        without = time_ms(fn, (logits, greedy), args.repeats)
        with_ = time_ms(fn, (logits, wanting), args.repeats)
        rows.append({"vocab": name, "size": vocab, "rows": r, "no_logprobs_ms": without,
                     "logprobs_ms": with_, "ratio": with_ / without})  # fmt: skip
    print(f"backend {jax.default_backend()}  rows {r}  (greedy)")
    print(f"{'vocab':>8} {'size':>7} {'no logprobs ms':>15} {'logprobs ms':>12} {'ratio':>6}")
    for x in rows:
        print(
            f"{x['vocab']:>8} {x['size']:>7} {x['no_logprobs_ms']:>15.2f} "
            f"{x['logprobs_ms']:>12.2f} {x['ratio']:>5.1f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": jax.default_backend(), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
