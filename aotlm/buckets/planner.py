"""Choose token and request ladders from simulated step shapes, optimally, under a graph budget.

Cost (in tokens of forward work, "token-equivalents"), summed over the simulated steps:

    cost = sum_steps (bucket_T(T) - T)  +  row_cost * sum_steps_with_R>0 (bucket_R(R) - R)

The first term is the padded tokens of ``forward[T]``: a padding token costs what a real one
costs in the projections and MLP (its attention, over the trash page, is ignored). The second is
the padded rows of ``logits[T, R]`` (an LM-head row) and ``sample[R]``, priced at ``row_cost``
tokens each: ``V*H`` over the forward's multiply-adds per token (see :func:`row_cost_for_model`;
the default 0.1 is about an 8B Llama's). Steps where nothing samples run no logits or sample.

Graphs, as the partitioned build exports them: ``|T|`` forward + ``|T|*|R|`` logits + ``3|R|``
samplers, ``sample``, ``sample_penalized`` and ``sample_masked`` (:func:`graph_count`). Only ``|T|`` of those are
full models; an unpartitioned build compiles ``|T|*|R|`` full models (:func:`full_model_graphs`).

The two terms are separable (T's ladder only moves the first, R's only the second), so the plan
is exact: for each ladder an optimal ``k``-rung ladder for every ``k`` (:func:`optimal_ladders`,
the classic 1-D bucketing DP), then the best ``(|T|, |R|)`` split within the budget.

Why ~390 lines: the cost model, the exact ladder optimizer and its entry points are one
algorithm; the ladders themselves and the traffic replay live in ladder.py and simulate.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aotlm.buckets.ladder import Ladder, pow2_ladder, step_ladder
from aotlm.buckets.simulate import StepShapes, simulate
from aotlm.buckets.traffic import read_trace
from aotlm.errors import ConfigError

DEFAULT_ROW_COST = 0.1
MIN_GRAPHS = 5  # one forward, one logits, and the three samplers


def graph_count(num_token_buckets: int, num_request_buckets: int, decode_steps: int = 1) -> int:
    """Graphs a partitioned build exports: forward[T] + logits[T, R] + sample[R],
    sample_penalized[R] and sample_masked[R] (every bundle can serve penalties and grammars, so
    the three samplers are always built), plus decode[R] with ``decode_steps`` > 1. The
    planner's ``max_graphs`` budget counts the first five (decode graphs come on top: one per
    request bucket)."""
    decode = num_request_buckets if decode_steps > 1 else 0
    return num_token_buckets * (1 + num_request_buckets) + 3 * num_request_buckets + decode


def full_model_graphs(
    num_token_buckets: int, num_request_buckets: int, *, partitioned: bool = True
) -> int:
    """Full-transformer compiles: one per token bucket partitioned, one per (T, R) pair if not."""
    return num_token_buckets * (1 if partitioned else num_request_buckets)


def row_cost_for_model(cfg: Any) -> float:
    """``row_cost`` for a model (any object with ModelConfig's field names): LM-head MACs per
    row over the forward graph's projection + MLP MACs per token."""
    q = cfg.num_heads * cfg.head_dim
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (2 * q + 2 * kv + 3 * cfg.intermediate_size)
    return cfg.vocab_size * cfg.hidden_size / (cfg.num_layers * per_layer)


def padding(ladder: Sequence[int], values: np.ndarray, counts: np.ndarray | None = None) -> int:
    """Total padding ``sum(bucket(v) - v)`` of ``values`` (each seen ``counts`` times, default
    once); all must fit the largest rung."""
    values = np.asarray(values, np.int64)
    rungs = np.asarray(ladder, np.int64)
    if values.size and values.max() > rungs[-1]:
        raise ValueError(f"value {values.max()} does not fit ladder {tuple(ladder)}")
    pads = rungs[np.searchsorted(rungs, values)] - values
    return int(pads.sum() if counts is None else pads @ np.asarray(counts, np.int64))


def optimal_ladders(values: np.ndarray, max_size: int, max_rungs: int) -> list[tuple[int, Ladder]]:
    """Entry ``k - 1``: the least total padding of ``values`` with ``k`` rungs, and that ladder.

    Rungs sit at observed values (lowering a rung to the largest value it holds never adds
    padding) and the last is ``max_size``. With candidates ``c_1 < ... < c_m`` of counts ``w``,
    prefix sums ``W``, ``S`` (of ``w`` and ``w * c``) and ``dp[k][0] = 0`` for ``k = 0``::

        dp[k][j] = min_{i<j} dp[k-1][i] + c_j (W_j - W_i) - (S_j - S_i)

    The min over ``i`` is a lower envelope of lines ``A_i - W_i x`` queried at increasing
    ``x = c_j`` (slopes fall as ``i`` grows), so each layer is O(m) with a monotone convex-hull
    trick, in exact integer arithmetic. The list stops early once every candidate has a rung.
    """
    vals, counts = np.unique(np.asarray(values, np.int64), return_counts=True)
    if vals.size and (vals[0] < 1 or vals[-1] > max_size):
        raise ValueError(f"values must lie in [1, {max_size}]")
    c = [int(v) for v in vals]
    w = [int(n) for n in counts]
    if not c or c[-1] != max_size:
        c.append(max_size)
        w.append(0)
    m = len(c)
    big_w, big_s = [0] * (m + 1), [0] * (m + 1)
    for j in range(m):
        big_w[j + 1] = big_w[j] + w[j]
        big_s[j + 1] = big_s[j] + w[j] * c[j]
    prev: list[int | None] = [0] + [None] * m
    results, back = [], []
    for k in range(1, min(max_rungs, m) + 1):
        cur, arg = _dp_layer(prev, c, big_w, big_s, k)
        back.append(arg)
        ladder, j = [], m
        for layer in reversed(back):
            ladder.append(c[j - 1])
            j = layer[j]
        results.append((int(cur[m]), tuple(reversed(ladder))))  # type: ignore[arg-type]
        prev = cur
    return results


def _dp_layer(
    prev: list[int | None], c: list[int], big_w: list[int], big_s: list[int], k: int
) -> tuple[list[int | None], list[int]]:
    """One DP layer (``k`` rungs) with the monotone convex-hull trick; see optimal_ladders."""
    m = len(c)
    cur: list[int | None] = [None] * (m + 1)
    arg = [0] * (m + 1)
    hull: list[tuple[int, int, int]] = []  # (slope -W_i, intercept A_i, i), slopes falling
    front = 0
    for j in range(k, m + 1):
        i = j - 1
        if prev[i] is not None:
            line = (-big_w[i], prev[i] + big_s[i], i)  # type: ignore[operator]
            while len(hull) - front >= 2 and _useless(hull[-2], hull[-1], line):
                hull.pop()
            hull.append(line)
            front = min(front, len(hull) - 1)
        x = c[j - 1]
        while front + 1 < len(hull) and _at(hull[front + 1], x) <= _at(hull[front], x):
            front += 1
        slope, intercept, best = hull[front]
        cur[j] = x * big_w[j] - big_s[j] + slope * x + intercept
        arg[j] = best
    return cur, arg


def _at(line: tuple[int, int, int], x: int) -> int:
    return line[0] * x + line[1]


def _useless(a: tuple[int, int, int], b: tuple[int, int, int], c: tuple[int, int, int]) -> bool:
    """``b`` (slope between ``a``'s and ``c``'s) is never strictly below both: drop it."""
    return (c[1] - a[1]) * (a[0] - b[0]) <= (b[1] - a[1]) * (a[0] - c[0])


@dataclass(frozen=True)
class LadderScore:
    """A (token, request) ladder pair evaluated on simulated steps."""

    name: str
    tokens: Ladder
    requests: Ladder
    padded_tokens: int
    real_tokens: int
    padded_rows: int
    real_rows: int
    row_cost: float

    @property
    def token_overhead(self) -> float:
        """Padded over real forward tokens (0.25: forward does 1.25x the real work)."""
        return self.padded_tokens / max(1, self.real_tokens)

    @property
    def row_overhead(self) -> float:
        return self.padded_rows / max(1, self.real_rows)

    @property
    def cost(self) -> float:
        """The objective, in token-equivalents (see the module docstring)."""
        return self.padded_tokens + self.row_cost * self.padded_rows

    @property
    def work_overhead(self) -> float:
        """The objective over real forward tokens: all padded work, rows included."""
        return self.cost / max(1, self.real_tokens)

    @property
    def graphs(self) -> int:
        return graph_count(len(self.tokens), len(self.requests))

    @property
    def full_model_graphs(self) -> int:
        return full_model_graphs(len(self.tokens), len(self.requests))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": list(self.tokens), "requests": list(self.requests)}
        out.update({k: getattr(self, k) for k in _SCORE_KEYS})
        out["full_model_graphs_unpartitioned"] = len(self.tokens) * len(self.requests)
        return out


_SCORE_KEYS = (
    *("token_overhead", "row_overhead", "work_overhead", "padded_tokens", "real_tokens"),
    *("padded_rows", "real_rows", "cost", "graphs", "full_model_graphs"),
)


@dataclass(frozen=True)
class Plan:
    """The chosen ladders and, for comparison, pow2 and step ladders with the same budget."""

    planned: LadderScore
    baselines: dict[str, LadderScore]
    max_graphs: int
    num_steps: int
    source: dict[str, Any] = field(default_factory=dict)  # e.g. the trace's name and sha256

    @property
    def tokens(self) -> Ladder:
        return self.planned.tokens

    @property
    def requests(self) -> Ladder:
        return self.planned.requests

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; what a build records in the manifest's ``buckets.plan``."""
        scores = {"planned": self.planned, **self.baselines}
        return {
            "max_graphs": self.max_graphs,
            "num_steps": self.num_steps,
            "row_cost": self.planned.row_cost,
            **self.source,
            **{name: s.to_dict() for name, s in scores.items()},
        }


# A ladder family: k -> (padding, ladder) for each k it offers, cheapest first in k.
Curve = list[tuple[int, Ladder]]


def _best_split(
    token_curve: Curve, request_curve: Curve, max_graphs: int, row_cost: float
) -> tuple[Ladder, Ladder]:
    """The feasible (|T|, |R|) minimizing the cost; ties go to fewer graphs."""
    best: tuple[float, int, Ladder, Ladder] | None = None
    for tok_pad, tok in token_curve:
        for row_pad, req in request_curve:
            graphs = graph_count(len(tok), len(req))
            if graphs > max_graphs:
                continue
            key = (tok_pad + row_cost * row_pad, graphs, tok, req)
            if best is None or key[:2] < best[:2]:
                best = key
    assert best is not None  # max_graphs >= MIN_GRAPHS makes (1, 1) feasible
    return best[2], best[3]


def _family_curve(values: np.ndarray, ladders: Sequence[Ladder], max_rungs: int) -> Curve:
    """For each k, the best top-k trim of any of ``ladders`` (all ending at the same max)."""
    uniq, counts = np.unique(values, return_counts=True)
    curve: Curve = []
    for k in range(1, max_rungs + 1):
        trims = {full[-k:] for full in ladders}
        if curve and all(len(t) < k for t in trims):
            break
        curve.append(min((padding(t, uniq, counts), t) for t in trims))
    return curve


def _pow2_family(max_size: int) -> list[Ladder]:
    return [pow2_ladder(1, max_size)]


def _step_family(max_size: int) -> list[Ladder]:
    """Step ladders for every power-of-two gap: the gap is tuned on the trace (their best case)."""
    gaps = [1 << i for i in range(max_size.bit_length())]
    return [step_ladder(1, max_size, gap) for gap in gaps]


def _check_plan_args(shapes: StepShapes, max_graphs: int, row_cost: float, align: int) -> None:
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < MIN_GRAPHS:
        raise ConfigError(
            f"max_graphs: must be an integer >= {MIN_GRAPHS} (one forward, one logits and "
            f"the three samplers' graphs) (got {max_graphs!r})"
        )
    if row_cost < 0:
        raise ConfigError(f"row_cost: must be >= 0 (got {row_cost})")
    if align < 1:
        raise ConfigError(f"token_align: must be >= 1 (got {align})")
    if shapes.max_seqs_per_step > shapes.max_tokens_per_step:
        raise ConfigError(
            f"max_seqs_per_step ({shapes.max_seqs_per_step}) must be at most max_tokens_per_step "
            f"({shapes.max_tokens_per_step}): every scheduled sequence brings a token"
        )


def plan_buckets(
    shapes: StepShapes,
    max_graphs: int,
    *,
    row_cost: float = DEFAULT_ROW_COST,
    token_align: int = 1,
) -> Plan:
    """Optimal ladders for ``shapes`` within ``max_graphs`` graphs, with pow2 and step
    ladders (trimmed to their largest rungs, best split) evaluated under the same budget.

    ``token_align`` > 1 restricts token rungs to its multiples (and the maximum), as TPU tiling
    likes; still exact: with aligned rungs, ``T`` and ``min(ceil_align(T), max)`` share a bucket,
    so the DP runs on the rounded values and the rounding adds a constant.
    """
    _check_plan_args(shapes, max_graphs, row_cost, token_align)
    t_vals = shapes.tokens
    r_vals = shapes.requests[shapes.requests > 0]
    max_t, max_r = shapes.max_tokens_per_step, shapes.max_seqs_per_step
    rounded = np.minimum(-(-t_vals // token_align) * token_align, max_t)
    rungs = (max_graphs - 1) // 2  # an upper bound on either ladder's rungs (other has one)

    def score(name: str, ladders: tuple[Ladder, Ladder]) -> LadderScore:
        tokens, requests = ladders
        return LadderScore(
            name=name,
            tokens=tokens,
            requests=requests,
            padded_tokens=padding(tokens, t_vals),
            real_tokens=int(t_vals.sum()),
            padded_rows=padding(requests, r_vals),
            real_rows=int(r_vals.sum()),
            row_cost=row_cost,
        )

    planned = _best_split(
        optimal_ladders(rounded, max_t, rungs),
        optimal_ladders(r_vals, max_r, rungs),
        max_graphs,
        row_cost,
    )
    families: dict[str, Callable[[int], list[Ladder]]] = {
        "pow2": _pow2_family,
        "step": _step_family,
    }
    baselines = {
        name: score(
            name,
            _best_split(
                _family_curve(t_vals, family(max_t), rungs),
                _family_curve(r_vals, family(max_r), rungs),
                max_graphs,
                row_cost,
            ),
        )
        for name, family in families.items()
    }
    return Plan(score("planned", planned), baselines, max_graphs, shapes.num_steps)


def plan_from_trace(
    path: str | Path,
    max_graphs: int,
    *,
    max_tokens_per_step: int,
    max_seqs_per_step: int,
    concurrency: int | None = None,
    max_seq_len: int | None = None,
    row_cost: float = DEFAULT_ROW_COST,
    token_align: int = 1,
) -> Plan:
    """Read a JSONL trace, simulate the scheduler on it, and plan (what the build calls for
    ``buckets: {plan: TRACE.jsonl, max_graphs: N}``). ``Plan.source`` names the trace by file
    name and sha256 only, so recording it keeps the manifest reproducible."""
    path = Path(path)
    trace = read_trace(path)
    shapes = simulate(
        trace,
        max_tokens_per_step=max_tokens_per_step,
        max_seqs_per_step=max_seqs_per_step,
        concurrency=concurrency,
        max_seq_len=max_seq_len,
    )
    plan = plan_buckets(shapes, max_graphs, row_cost=row_cost, token_align=token_align)
    source = {
        "trace": path.name,
        "trace_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "trace_requests": len(trace),
        "concurrency": concurrency,
        "max_tokens_per_step": max_tokens_per_step,
        "max_seqs_per_step": max_seqs_per_step,
        "token_align": token_align,
    }
    return dataclasses.replace(plan, source=source)
