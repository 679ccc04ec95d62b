"""Paired A/B report shared by engine_ab.py and serve_ab.py.

On a shared machine throughput moves 20-40% between runs, more than most changes are worth; a
difference shows only when both sides run interleaved on the same prompts. Each pair is one pass
of the same requests on A and right after on B; the report is the spread of the B/A ratios.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from serve import PromptSource, mixed_requests

from aotlm.bundle.reader import read_manifest


def ab_parser(doc: str, out: Path) -> argparse.ArgumentParser:
    """The two bundles and the workload's options (benchmarks/serve.py's mixed passes, repeated
    round after round); `doc`: the script's docstring, `out`: where the JSON goes by default."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("bundles", type=Path, nargs=2, metavar="BUNDLE", help="A (baseline), B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3, help="Distinct prompt sets per round.")
    ap.add_argument("--requests", type=int, default=64, help="Requests per pass.")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=out)
    return ap


def pass_meta(args: argparse.Namespace) -> dict:
    keys = ("rounds", "passes", "requests", "concurrency", "seed")
    return {k: getattr(args, k) for k in keys}


def workload(bundle: Path, args: argparse.Namespace) -> tuple[dict, list, list]:
    """(manifest, the mixed passes, an untimed warm-up set sharing no page with them)."""
    manifest, _ = read_manifest(bundle)
    cfg, max_seq = manifest.model.config, manifest.serving.max_seq_len
    rng = np.random.default_rng(args.seed)
    src = PromptSource(bundle / "tokenizer/tokenizer.json", cfg["bos_token_id"], rng)
    passes = [mixed_requests(src, rng, args.requests, max_seq) for _ in range(args.passes)]
    return manifest, passes, mixed_requests(src, rng, 2 * args.concurrency, max_seq)


def paired_report(tok_s: list[list[float]], differ: list[int], meta: dict, out: Path) -> dict:
    """Print the per-pair table and B/A summary, write the JSON document to `out`, return it.

    tok_s: [A's tok/s per pair, B's]; differ: per pair, the greedy sequences whose outputs
    differ between A and B (0 when both do the same work); meta: what was compared, as run."""
    ratios = np.asarray(tok_s[1]) / np.asarray(tok_s[0])
    report = meta | {
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
