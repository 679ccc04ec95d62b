"""Bucket benchmark: padding of planned ladders vs pow2 and step ladders at the same graph budget,
and full-model compiles partitioned vs unpartitioned.

    .venv/bin/python benchmarks/buckets.py [--max-graphs 40] [--requests 2000]

Three synthetic traces (short chat, long-prompt RAG, mixed heavy-tail), each served two ways:
saturated (closed loop, max-seqs-per-step requests in flight) and open loop (Poisson arrivals
replayed on the simulator's step clock). pow2 and step ladders are trimmed to their largest rungs
to fit the budget, and the step ladder's gap is tuned on the same trace (their best case). The
planner minimizes padded forward tokens + row_cost * padded logits rows; "token pad" is padded
over real forward tokens, "work pad" adds the rows at row_cost. Pure numpy: no jax, no device.
Prints tables and writes benchmarks/results/buckets.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aotlm.buckets.ladder import pow2_ladder
from aotlm.buckets.planner import DEFAULT_ROW_COST, full_model_graphs, graph_count, plan_buckets
from aotlm.buckets.simulate import simulate
from aotlm.buckets.traffic import SYNTHETIC

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS, MAX_SEQS = 2048, 64
RATES = {"short-chat": 20.0, "long-prompt-rag": 5.0, "mixed-heavy-tail": 30.0}  # requests/s
SWEEP = (10, 20, 40, 80)


def run_case(name: str, load: str, n: int, max_graphs: int, row_cost: float) -> dict:
    rate = RATES[name] if load == "open" else None
    trace = SYNTHETIC[name](n, seed=0, rate=rate)
    shapes = simulate(trace, max_tokens_per_step=MAX_TOKENS, max_seqs_per_step=MAX_SEQS)
    plan = plan_buckets(shapes, max_graphs, row_cost=row_cost)
    pow2 = plan.baselines["pow2"]
    sweep = {}
    for budget in SWEEP:
        p = plan_buckets(shapes, budget, row_cost=row_cost)
        sweep[budget] = p.planned.token_overhead / max(1e-12, p.baselines["pow2"].token_overhead)
    return {
        "trace": name,
        "load": load,
        "rate": rate,
        "steps": shapes.num_steps,
        "mean_tokens_per_step": float(shapes.tokens.mean()),
        "mean_seqs_per_step": float(shapes.seqs.mean()),
        "token_ratio_vs_pow2": plan.planned.token_overhead / max(1e-12, pow2.token_overhead),
        "work_ratio_vs_pow2": plan.planned.work_overhead / max(1e-12, pow2.work_overhead),
        "token_ratio_vs_pow2_by_budget": sweep,
        **plan.to_dict(),
    }


def partitioning_rows() -> list[dict]:
    """Full-model compiles for peer-style ladders (tokens 16..max, requests 1..max, pow2)."""
    rows = []
    for max_t, max_r in ((512, 16), (2048, 64), (8192, 256)):
        t, r = len(pow2_ladder(16, max_t)), len(pow2_ladder(1, max_r))
        rows.append(
            {
                "tokens": f"pow2 16..{max_t}",
                "requests": f"pow2 1..{max_r}",
                "T": t,
                "R": r,
                "graphs_partitioned": graph_count(t, r),
                "full_models_partitioned": full_model_graphs(t, r),
                "full_models_unpartitioned": full_model_graphs(t, r, partitioned=False),
            }
        )
    return rows


def print_tables(cases: list[dict], parts: list[dict], max_graphs: int) -> None:
    print(f"budget {max_graphs} graphs; max {MAX_TOKENS} tokens / {MAX_SEQS} seqs per step")
    head = f"{'trace':<17}{'load':<10}{'steps':>6}{'mean T':>8}"
    head += f"{'planned':>9}{'pow2':>9}{'step':>9}{'plan/pow2':>10}{'work p/p2':>10}"
    head += f"{'graphs p/2/s':>14}{'full p/u':>10}"
    print(head)
    print("-" * len(head))
    for c in cases:
        p, b, s = c["planned"], c["pow2"], c["step"]
        graphs = f"{p['graphs']}/{b['graphs']}/{s['graphs']}"
        full = f"{p['full_model_graphs']}/{p['full_model_graphs_unpartitioned']}"
        print(
            f"{c['trace']:<17}{c['load']:<10}{c['steps']:>6}{c['mean_tokens_per_step']:>8.0f}"
            f"{p['token_overhead']:>9.1%}{b['token_overhead']:>9.1%}{s['token_overhead']:>9.1%}"
            f"{c['token_ratio_vs_pow2']:>10.2f}{c['work_ratio_vs_pow2']:>10.2f}"
            f"{graphs:>14}{full:>10}"
        )
    print("\nplanned/pow2 token-padding ratio by graph budget")
    print(f"{'trace':<17}{'load':<10}" + "".join(f"{b:>8}" for b in SWEEP))
    for c in cases:
        ratios = "".join(f"{c['token_ratio_vs_pow2_by_budget'][b]:>8.2f}" for b in SWEEP)
        print(f"{c['trace']:<17}{c['load']:<10}{ratios}")
    print("\nfull-model compiles, partitioned (|T|) vs unpartitioned (|T|*|R|)")
    print(f"{'ladders':<34}{'graphs':>8}{'full (part.)':>14}{'full (unpart.)':>16}{'cut':>6}")
    for r in parts:
        cut = r["full_models_unpartitioned"] / r["full_models_partitioned"]
        print(
            f"{r['tokens'] + ' x ' + r['requests']:<34}{r['graphs_partitioned']:>8}"
            f"{r['full_models_partitioned']:>14}{r['full_models_unpartitioned']:>16}{cut:>5.0f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-graphs", type=int, default=40)
    ap.add_argument("--requests", type=int, default=2000, help="Requests per synthetic trace.")
    ap.add_argument("--row-cost", type=float, default=DEFAULT_ROW_COST)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/buckets.json")
    args = ap.parse_args()
    cases = [
        run_case(name, load, args.requests, args.max_graphs, args.row_cost)
        for name in SYNTHETIC
        for load in ("saturated", "open")
    ]
    parts = partitioning_rows()
    print_tables(cases, parts, args.max_graphs)
    ratios = [c["token_ratio_vs_pow2"] for c in cases]
    goal = sum(r <= 1 / 3 for r in ratios)
    print(
        f"\ngoal planned token padding <= 1/3 of pow2's: met in {goal} of {len(ratios)} cases "
        f"(worst ratio {max(ratios):.2f})"
    )
    report = {
        "max_graphs": args.max_graphs,
        "max_tokens_per_step": MAX_TOKENS,
        "max_seqs_per_step": MAX_SEQS,
        "row_cost": args.row_cost,
        "requests_per_trace": args.requests,
        "cases": cases,
        "partitioning": parts,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
