"""model.yaml's planned buckets: ``buckets: {plan: TRACE.jsonl, max_graphs: N, page_size: P}``.

The config loader calls :func:`planned_ladders` to turn that form into token and request ladders
at load time, so build and serve only ever see ladders (and the manifest records the plan).
Optional keys, with the defaults of ``aotlm buckets plan``:

- ``max_tokens``: the largest token bucket (default ``min(2048, max_seq_len)``);
- ``max_requests``: the largest request bucket (default ``min(64, max_tokens)``);
- ``align``: token rungs are multiples of it (TPU tiles like 8 or 128; default 1);
- ``concurrency``: replay the trace closed-loop with that many requests in flight (default:
  its arrival times, or ``max_requests`` when it has none).

A padded logits/sample row is priced from the checkpoint (:func:`row_cost_for_model`). Errors
name the file and key path (``m.yaml: buckets.plan: trace.jsonl:3: not valid JSON``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aotlm.buckets.ladder import Ladder
from aotlm.buckets.planner import MIN_GRAPHS, plan_from_trace, row_cost_for_model
from aotlm.errors import AotlmError, ConfigError

PLAN_REQUIRED = ("plan", "max_graphs", "page_size")
PLAN_KEYS = (*PLAN_REQUIRED, "max_tokens", "max_requests", "align", "concurrency")
DEFAULT_MAX_TOKENS = 2048
DEFAULT_MAX_REQUESTS = 64

Where = Callable[[str], str]  # key path -> "m.yaml: key.path"


def _error(where: Where, key: str, message: str) -> ConfigError:
    return ConfigError(f"{where(f'buckets.{key}')}: {message}")


def check_plan_keys(spec: Mapping, where: Where) -> None:
    """Unknown or missing keys of the planned form; ladders cannot be given beside a plan."""
    for key in spec:
        if key in ("tokens", "requests"):
            raise _error(where, key, "not allowed with buckets.plan: the plan chooses the ladders")
        if key not in PLAN_KEYS:
            raise _error(where, str(key), f"unknown key (allowed: {', '.join(PLAN_KEYS)})")
    for key in PLAN_REQUIRED:
        if key not in spec:
            raise _error(where, key, "required key is missing")


def _int(spec: Mapping, key: str, default: int | None, minimum: int, where: Where) -> int | None:
    value = spec.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(where, key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise _error(where, key, f"must be at least {minimum} (got {value})")
    return value


def _row_cost(model_dir: Path, where: Where) -> float:
    from aotlm.models.config import read_hf_config  # the checkpoint's shapes price a row

    try:
        return row_cost_for_model(read_hf_config(model_dir))
    except AotlmError as e:
        raise ConfigError(f"{where('model')}: {e}") from None


def planned_ladders(
    spec: Mapping[str, Any], where: Where, max_seq_len: int, model_dir: Path, base: Path
) -> tuple[Ladder, Ladder, str]:
    """(token ladder, request ladder, the plan as sorted JSON) for a checked planned spec.

    The JSON is what the manifest records under ``buckets.plan``: the trace by name and sha256
    (never its path), the budget, and the planned, pow2 and step ladders' padding.
    """
    if not isinstance(spec["plan"], str):
        raise _error(where, "plan", f"expected a path to a JSONL trace, got {spec['plan']!r}")
    trace = (base / spec["plan"]).resolve()
    if not trace.is_file():
        raise _error(
            where,
            "plan",
            f"trace file {trace} does not exist (a relative path resolves against the "
            "directory of the yaml; `aotlm serve --record-trace FILE` writes one)",
        )
    max_graphs = _int(spec, "max_graphs", None, MIN_GRAPHS, where)
    max_tokens = _int(spec, "max_tokens", min(DEFAULT_MAX_TOKENS, max_seq_len), 1, where)
    assert max_graphs is not None and max_tokens is not None
    if max_tokens > max_seq_len:
        raise _error(where, "max_tokens", f"must be at most max_seq_len ({max_seq_len})")
    max_requests = _int(spec, "max_requests", min(DEFAULT_MAX_REQUESTS, max_tokens), 1, where)
    assert max_requests is not None
    if max_requests > max_tokens:
        raise _error(where, "max_requests", f"must be at most buckets.max_tokens ({max_tokens})")
    align = _int(spec, "align", 1, 1, where)
    concurrency = _int(spec, "concurrency", None, 1, where)
    row_cost = _row_cost(model_dir, where)
    try:
        plan = plan_from_trace(
            trace,
            max_graphs,
            max_tokens_per_step=max_tokens,
            max_seqs_per_step=max_requests,
            concurrency=concurrency,
            max_seq_len=max_seq_len,
            row_cost=row_cost,
            token_align=align or 1,
        )
    except ConfigError as e:
        raise _error(where, "plan", str(e)) from None
    return plan.tokens, plan.requests, json.dumps(plan.to_dict(), sort_keys=True)
