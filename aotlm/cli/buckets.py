"""`aotlm buckets plan`: pick token and request ladders from a traffic trace."""

from __future__ import annotations

import json
from pathlib import Path

import click

from aotlm.buckets.planner import DEFAULT_ROW_COST, LadderScore, Plan, plan_from_trace
from aotlm.cli.options import amount, count, errors_to_exit, json_flag, option
from aotlm.cli.tables import table


@click.group()
def buckets() -> None:
    """Bucket ladders: plan them from traffic."""


@buckets.command()
@option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSONL, one request a line: {"prompt_tokens", "output_tokens", optional "arrival"}.',
)
@count(
    "--max-graphs",
    minimum=4,
    required=True,
    help="Graph budget: |T| forward + |T|*|R| logits + 2|R| samplers (plain and penalized).",
)
@count(
    "--max-tokens-per-step", default=2048, help="Token budget of a step: the largest token bucket."
)
@count(
    "--max-seqs-per-step", default=64, help="Sequence budget of a step: the largest request bucket."
)
@count(
    "--concurrency",
    default=None,
    help="Requests kept in flight (closed loop). Default: replay the trace's arrival times, "
    "or max-seqs-per-step when it has none.",
)
@count("--max-seq-len", minimum=2, default=None, help="Cap per sequence.")
@amount(
    "--row-cost",
    default=DEFAULT_ROW_COST,
    help="Cost of a padded logits/sample row, in forward tokens (LM head vs forward per token).",
)
@count(
    "--align",
    default=1,
    help="Make planned token buckets multiples of this (8 or 128 suit TPU tiles).",
)
@json_flag("the plan")
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
    lines = [
        f"trace     {src.get('trace', '?')}: {src.get('trace_requests', '?')} requests, "
        f"{result.num_steps} simulated steps",
        f"budget    {result.max_graphs} graphs; row cost {result.planned.row_cost:g} tokens",
        "",
    ]
    lines.append(table(rows, header))
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
