"""Engine A/B: two bundles' engines (no HTTP) alternating on the same prompts in one process.

    .venv/bin/python benchmarks/engine_ab.py BUNDLE_A BUNDLE_B [--rounds 3] [--passes 3]
        [--requests 64] [--concurrency 16] [--seed 0]

On a shared machine throughput moves 20-40% between runs, more than most changes are worth; a
difference shows only when both sides run interleaved on the same prompts. Both engines are loaded
once and warmed; then, round after round, each of the mixed passes (benchmarks/serve.py's
workload: prompts 16..320 tokens, 16..128 output tokens, greedy, closed loop at --concurrency)
runs on A and right after on B. Reported: each side's tok/s per pass, and B/A as the median and
the spread of the paired ratios (the baseline is A). Greedy outputs of the two are compared per
pass (sequences that differ), so a faster B is known to do the same work. Build B from a changed
tree, A from the baseline (e.g. a `git worktree` of main). Prints a table and writes
benchmarks/results/engine_ab.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from paired import ab_parser, paired_report, pass_meta, workload
from serve_baselines import closed_loop

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = ab_parser(__doc__, ROOT / "benchmarks/results/engine_ab.json")
    args = ap.parse_args()

    from aotlm.runtime.generation.engine import Engine

    _, passes, warm = workload(args.bundles[0], args)
    engines = [Engine.from_bundle(b) for b in args.bundles]
    for engine in engines:
        closed_loop(engine, warm, args.concurrency)
    tok_s: list[list[float]] = [[], []]
    differ: list[int] = []
    for _ in range(args.rounds):
        for requests in passes:
            ids = []
            for side, engine in enumerate(engines):
                start = time.perf_counter()
                seqs, _ = closed_loop(engine, requests, args.concurrency)
                seconds = time.perf_counter() - start
                tok_s[side].append(sum(r.max_tokens for r in requests) / seconds)
                ids.append([tuple(s.output_token_ids) for s in seqs])
                for s in seqs:
                    engine.release(s)
            differ.append(sum(a != b for a, b in zip(*ids, strict=True)))
    meta = {"bundles": [str(b) for b in args.bundles]} | pass_meta(args)
    paired_report(tok_s, differ, meta, args.out)


if __name__ == "__main__":
    main()
