"""What structured output costs: throughput with 0%, 50% and 100% of the rows under a grammar.

    .venv/bin/python benchmarks/structured.py --bundle BUNDLE [--requests 16] [--max-tokens 64]
        [--passes 2] [--out PATH]

One engine on the bundle runs the same batch of requests once per mix, in the same run: free rows
(seeded sampling, ignore_eos) and rows under a JSON schema (llguidance, masked sampler, one step
per call since multi-step decode cannot take a host mask between its tokens; the free batch runs
also at one step per call, to separate that cost from the masks'). It reports output
tokens per second, the ratio to the all-free mix at the bundle's decode_steps, the host time the grammars spent filling masks
(per call of `RowGrammar.fill`, mean and p99) and the engine steps each mix took. Prints a table,
writes benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

from aotlm.grammar import compiler
from aotlm.grammar.spec import GrammarSpec
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The cat sat on the mat", "Compilers turn", "Once upon a time", "x", "A list:"]
SCHEMA = {  # an extraction-style object, compact, bounded so that every row can finish
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


class FillTimer:
    """Times every `RowGrammar.fill` (the host's mask work) while installed."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.original = compiler.RowGrammar.fill

    def __enter__(self) -> FillTimer:
        original, times = self.original, self.times

        def timed(grammar, row):
            start = time.perf_counter()
            original(grammar, row)
            times.append(time.perf_counter() - start)

        compiler.RowGrammar.fill = timed
        return self

    def __exit__(self, *exc) -> None:
        compiler.RowGrammar.fill = self.original


def run(engine: Engine, n: int, grammar_rows: int, max_tokens: int, seed: int, steps: int) -> dict:
    engine.decode_steps = steps
    spec = GrammarSpec.of("json_schema", SCHEMA, "response_format")
    # grammar rows spread through the batch, the same positions in every pass
    picked = set(np.linspace(0, n - 1, grammar_rows).round().astype(int)) if grammar_rows else set()
    seqs = []
    with FillTimer() as timer:
        start = time.perf_counter()
        for i in range(n):
            free = i not in picked
            p = SamplingParams(
                temperature=1.0,
                seed=seed + i,
                max_tokens=max_tokens,
                ignore_eos=free,  # free rows run to max_tokens; grammar rows end with the object
                grammar=None if free else spec,
            )
            seqs.append((i in picked, engine.add_request(PROMPTS[i % len(PROMPTS)], p)[0]))
        calls = 0
        while engine.has_unfinished:
            engine.step()
            calls += 1
        wall = time.perf_counter() - start
    tokens = sum(len(s.output_token_ids) for _, s in seqs)
    valid = cut = 0
    for constrained, s in seqs:
        if constrained and s.finish_reason == "stop":
            json.loads(engine.text(s))  # raises if the grammar let anything else out
            valid += 1
        cut += constrained and s.finish_reason == "length"  # max_tokens ended it mid-object
        engine.release(s)
    fills = np.array(timer.times) * 1e6
    return {
        "grammar_rows": grammar_rows,
        "decode_steps": steps,
        "requests": n,
        "output_tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "engine_calls": calls,
        "valid_json": valid,
        "cut_by_max_tokens": cut,
        "mask_fills": len(fills),
        "mask_us_mean": float(fills.mean()) if len(fills) else 0.0,
        "mask_us_p99": float(np.percentile(fills, 99)) if len(fills) else 0.0,
        "mask_share": float(fills.sum() / 1e6 / wall),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/structured.json")
    args = ap.parse_args()
    engine = Engine.from_bundle(args.bundle)
    n, built = args.requests, engine.decode_steps
    # (grammar rows, decode steps): the free batch also at one step per call, as grammar rows
    # run, to tell what the lost multi-step decode costs from what the masks cost
    mixes = [(0, built), (0, 1), (n // 2, built), (n, built)] if built > 1 else [(0, 1)]
    mixes += [] if built > 1 else [(n // 2, 1), (n, 1)]
    for k, steps in mixes:  # warm: first calls of each graph, the schema's compile
        run(engine, n, k, args.max_tokens, 0, steps)
    rows = []
    for p in range(args.passes):  # interleaved, so drift hits every mix alike
        for k, steps in mixes:
            rows.append({"pass": p, **run(engine, n, k, args.max_tokens, 1000 * (p + 1), steps)})
    summary = []
    base = [r for r in rows if (r["grammar_rows"], r["decode_steps"]) == mixes[0]]
    for k, steps in mixes:
        mine = [r for r in rows if (r["grammar_rows"], r["decode_steps"]) == (k, steps)]
        ratio = float(np.median([a["tok_s"] / b["tok_s"] for a, b in zip(mine, base, strict=True)]))
        summary.append({
            "grammar_share": k / n,
            "decode_steps": steps,
            "tok_s": float(np.median([r["tok_s"] for r in mine])),
            "ratio_vs_free": ratio,
            "engine_calls": int(np.median([r["engine_calls"] for r in mine])),
            "mask_us_mean": float(np.mean([r["mask_us_mean"] for r in mine])),
            "mask_us_p99": float(np.max([r["mask_us_p99"] for r in mine])),
            "mask_share": float(np.mean([r["mask_share"] for r in mine])),
        })  # fmt: skip
    print(f"{n} requests, max_tokens {args.max_tokens}, vocab {engine.tokenizer.vocab_size}")
    head = f"{'grammar rows':>12} {'steps':>5} {'tok/s':>8} {'vs free':>8} {'calls':>6} "
    print(head + f"{'mask us mean':>13} {'p99':>7} {'mask share':>11}")
    for s in summary:
        print(
            f"{s['grammar_share']:>12.0%} {s['decode_steps']:>5} {s['tok_s']:>8.1f} "
            f"{s['ratio_vs_free']:>7.2f}x "
            f"{s['engine_calls']:>6} {s['mask_us_mean']:>13.1f} {s['mask_us_p99']:>7.1f} "
            f"{s['mask_share']:>10.1%}"
        )
    report = {
        "bundle": str(args.bundle),
        "compiles_after_ready": engine.compiles_after_ready,
        "summary": summary,
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"compiles after ready: {engine.compiles_after_ready}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
