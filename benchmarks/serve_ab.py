"""Served A/B: two `aotlm serve` processes alternating on the same prompts, over HTTP.

    .venv/bin/python benchmarks/serve_ab.py BUNDLE_A BUNDLE_B [--a-args "..."] [--b-args "..."]
        [--a-source DIR] [--b-source DIR] [--rounds 3] [--passes 3] [--requests 64]
        [--concurrency 16] [--client lean|httpx|openai] [--seed 0]

What engine_ab.py does for engines, for whole servers: both are started and warmed up, then,
round after round, each mixed pass (benchmarks/serve.py's workload and load generator, greedy,
`ignore_eos`, closed loop at --concurrency) runs on A and right after on B while the other one
idles. Compares bundles (give two), server options (the same bundle twice, `--b-args
"--stream-interval 8"`) or server code (`--a-source` a `git worktree` of the baseline, with its
CPU kernel built: `python setup.py build_ext --inplace` there). Reported: each side's output
tok/s per pass and B/A as the median and spread of the paired ratios; the streamed texts of the
two are compared per pass, so a faster B is known to do the same work. Prints a table and writes
benchmarks/results/serve_ab.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from paired import ab_parser, paired_report, pass_meta, workload
from serve import SETTLE_S, _closed_loop, free_port, served

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = ab_parser(__doc__, ROOT / "benchmarks/results/serve_ab.json")
    for side in ("a", "b"):
        ap.add_argument(
            f"--{side}-args", default="", help=f"More `aotlm serve` options for {side}."
        )
        ap.add_argument(f"--{side}-source", type=Path, help=f"{side}'s aotlm source tree.")
    ap.add_argument("--client", choices=("lean", "httpx", "openai"), default="lean")
    args = ap.parse_args()
    manifest, passes, warm = workload(args.bundles[0], args)
    model = manifest.name
    sides = [
        (args.bundles[0], shlex.split(args.a_args), args.a_source),
        (args.bundles[1], shlex.split(args.b_args), args.b_source),
    ]

    def run(base: str, requests) -> tuple[float, list[str]]:
        loop = _closed_loop(base, model, requests, args.concurrency, client_kind=args.client)
        results, wall = asyncio.run(loop)
        return sum(r.output_tokens for r in results) / wall, [r.text for r in results]

    tok_s: list[list[float]] = [[], []]
    differ: list[int] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        bases = []
        for i, (bundle, extra, source) in enumerate(sides):
            log = Path(tmp) / f"server-{'ab'[i]}.log"
            ctx = served(bundle, free_port(), log, extra_args=extra, source=source)
            base, _, _ = stack.enter_context(ctx)
            run(base, warm)  # untimed: first runs of the executables
            bases.append(base)
        for _ in range(args.rounds):
            for requests in passes:
                texts = []
                for side, base in enumerate(bases):
                    time.sleep(SETTLE_S)  # the other server's idle threads settle
                    rate, text = run(base, requests)
                    tok_s[side].append(rate)
                    texts.append(text)
                differ.append(sum(a != b for a, b in zip(*texts, strict=True)))
    meta = {
        "bundles": [str(b) for b in args.bundles],
        "server_args": [args.a_args, args.b_args],
        "sources": [str(s) if s else None for s in (args.a_source, args.b_source)],
        "client": args.client,
    }
    paired_report(tok_s, differ, meta | pass_meta(args), args.out)


if __name__ == "__main__":
    main()
