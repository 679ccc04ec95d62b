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

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from serve import PromptSource, mixed_requests
from serve_baselines import closed_loop

from aotlm.bundle.reader import read_manifest

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", type=Path, nargs=2, metavar="BUNDLE", help="A (baseline), B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3, help="Distinct prompt sets per round.")
    ap.add_argument("--requests", type=int, default=64, help="Requests per pass.")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/engine_ab.json")
    args = ap.parse_args()

    from aotlm.runtime.engine import Engine

    manifest, _ = read_manifest(args.bundles[0])
    cfg, max_seq = manifest["model"]["config"], manifest["serving"]["max_seq_len"]
    rng = np.random.default_rng(args.seed)
    tokenizer = args.bundles[0] / "tokenizer/tokenizer.json"
    src = PromptSource(tokenizer, cfg["bos_token_id"], rng)
    passes = [mixed_requests(src, rng, args.requests, max_seq) for _ in range(args.passes)]
    warm = mixed_requests(src, rng, 2 * args.concurrency, max_seq)
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
    ratios = np.asarray(tok_s[1]) / np.asarray(tok_s[0])
    report = {
        "bundles": [str(b) for b in args.bundles],
        "rounds": args.rounds,
        "passes": args.passes,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "tok_s": {"A": tok_s[0], "B": tok_s[1]},
        "ratio_b_over_a": {
            "median": float(np.median(ratios)),
            "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)),
            "wins": int((ratios > 1).sum()),
            "pairs": len(ratios),
        },
        "greedy_sequences_differing": differ,
        "load_avg": os.getloadavg()[0],
    }
    print(f"{'pair':>5}{'A tok/s':>10}{'B tok/s':>10}{'B/A':>7}{'differ':>8}")
    for i, (a, b) in enumerate(zip(*tok_s, strict=True)):
        print(f"{i:>5}{a:>10.0f}{b:>10.0f}{b / a:>7.2f}{differ[i]:>8}")
    r = report["ratio_b_over_a"]
    print(
        f"B/A median {r['median']:.3f} (p10 {r['p10']:.3f}, p90 {r['p90']:.3f}); B faster in "
        f"{r['wins']}/{r['pairs']} pairs; greedy sequences differing: {sum(differ)} in total"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
