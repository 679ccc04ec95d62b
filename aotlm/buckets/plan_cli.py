"""`aotlm buckets plan`: pick token and request ladders from a traffic trace.

Registered on the main CLI with ``main.add_command(buckets)``. Kept apart from ``cli.py`` so the
bucket commands grow without growing it; only parsing and printing live here.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from aotlm.buckets.planner import DEFAULT_ROW_COST, LadderScore, Plan, plan_from_trace
from aotlm.cli_util import errors_to_exit


@click.group()
def buckets() -> None:
    """Bucket ladders: plan them from traffic."""


@buckets.command()
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL, one request a line: {"prompt_tokens", "output_tokens", optional "arrival"}.',
)
@click.option(
    "--max-graphs",
    required=True,
    type=click.IntRange(min=4),
    help="Graph budget: |T| forward + |T|*|R| logits + 2|R| samplers (plain and penalized).",
)
@click.option(
    "--max-tokens-per-step",
    default=2048,
    show_default=True,
    type=click.IntRange(min=1),
    help="Token budget of a step: the largest token bucket.",
)
@click.option(
    "--max-seqs-per-step",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Sequence budget of a step: the largest request bucket.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=None,
    help="Requests kept in flight (closed loop). Default: replay the trace's arrival times, "
    "or max-seqs-per-step when it has none.",
)
@click.option("--max-seq-len", type=click.IntRange(min=2), default=None, help="Cap per sequence.")
@click.option(
    "--row-cost",
    type=click.FloatRange(min=0),
    default=DEFAULT_ROW_COST,
    show_default=True,
    help="Cost of a padded logits/sample row, in forward tokens (LM head vs forward per token).",
)
@click.option(
    "--align",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Make planned token buckets multiples of this (8 or 128 suit TPU tiles).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@errors_to_exit
def plan(
    trace_path: Path,
    max_graphs: int,
    max_tokens_per_step: int,
    max_seqs_per_step: int,
    concurrency: int | None,
    max_seq_len: int | None,
    row_cost: float,
    align: int,
    as_json: bool,
) -> None:
    """Simulate the scheduler on a trace and choose ladders minimizing padded work."""
    result = plan_from_trace(
        trace_path,
        max_graphs,
        max_tokens_per_step=max_tokens_per_step,
        max_seqs_per_step=max_seqs_per_step,
        concurrency=concurrency,
        max_seq_len=max_seq_len,
        row_cost=row_cost,
        token_align=align,
    )
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(format_plan(result))


def _row(s: LadderScore) -> list[str]:
    t, r = len(s.tokens), len(s.requests)
    return [
        s.name,
        f"{s.graphs} ({t}+{t * r}+{2 * r})",
        str(t),
        f"{s.token_overhead:.1%}",
        f"{s.row_overhead:.1%}",
        f"{s.work_overhead:.1%}",
    ]


def format_plan(result: Plan) -> str:
    """The comparison table, each ladder's rungs, and the model.yaml lines to use."""
    src = result.source
    scores = [result.planned, *result.baselines.values()]
    header = ["ladders", "graphs (fwd+logits+samplers)", "full models", "token pad", "row pad"]
    header.append("work pad")
    rows = [_row(s) for s in scores]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = [
        f"trace     {src.get('trace', '?')}: {src.get('trace_requests', '?')} requests, "
        f"{result.num_steps} simulated steps",
        f"budget    {result.max_graphs} graphs; row cost {result.planned.row_cost:g} tokens",
        "",
    ]
    for r in [header, ["-" * w for w in widths], *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append("")
    for s in scores:
        lines.append(f"{s.name:<8} tokens={list(s.tokens)}")
        lines.append(f"{'':<8} requests={list(s.requests)}")
    lines += [
        "",
        "pad = padded / real forward tokens (token), sampled rows (row), and all padded work in "
        "forward tokens (work)",
        f"model.yaml  buckets.tokens: {list(result.tokens)}",
        f"            buckets.requests: {list(result.requests)}",
    ]
    return "\n".join(lines)
