"""Bucket planner: traces, the scheduler simulation, the optimal-ladder DP and `buckets plan`.

Optimality is checked against brute force over every ladder (every subset of the observed sizes
plus the maximum); the simulation against the real `Scheduler` step for step.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from aotlm.buckets.planner import (
    full_model_graphs,
    graph_count,
    optimal_ladders,
    padding,
    plan_buckets,
    plan_from_trace,
    row_cost_for_model,
)
from aotlm.buckets.simulate import StepShapes, simulate
from aotlm.buckets.traffic import SYNTHETIC, TraceRequest, read_trace, write_trace
from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle import read_manifest
from aotlm.cli import main
from aotlm.cli.buckets import buckets
from aotlm.errors import ConfigError
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import Scheduler
from aotlm.runtime.generation.sequence import make_sequences

# ---- graph count ------------------------------------------------------------------------------


def test_graph_count_formula() -> None:
    assert graph_count(1, 1) == 5
    assert graph_count(3, 3) == 3 + 9 + 3 * 3
    assert graph_count(19, 1) == 41
    assert graph_count(3, 3, decode_steps=8) == graph_count(3, 3) + 3
    assert full_model_graphs(8, 7) == 8
    assert full_model_graphs(8, 7, partitioned=False) == 56


def test_graph_count_matches_what_a_build_exports(tiny_bundle) -> None:
    _, result = tiny_bundle
    tokens, requests = (16, 32, 64), (1, 2, 4)  # tests/bundle_factory.py SMALL_BUCKETS
    per_name = Counter(f["name"] for f in result.functions)
    # the shared tiny bundle has decode_steps: 4 (tests/conftest.py)
    assert len(result.functions) == graph_count(len(tokens), len(requests), decode_steps=4)
    assert per_name == {
        "forward": 3, "logits": 9, "sample": 3, "sample_penalized": 3, "sample_masked": 3,
        "decode": 3,
    }  # fmt: skip
    assert per_name["forward"] == full_model_graphs(len(tokens), len(requests))


def test_row_cost_for_an_8b_llama_is_about_a_tenth() -> None:
    class Llama8B:
        vocab_size, hidden_size, intermediate_size, num_layers = 128256, 4096, 14336, 32
        num_heads, num_kv_heads, head_dim = 32, 8, 128

    assert 0.05 < row_cost_for_model(Llama8B) < 0.1


# ---- the DP against brute force ---------------------------------------------------------------


def brute_force(values: np.ndarray, max_size: int, k: int) -> int:
    candidates = sorted({int(v) for v in values if v < max_size})
    return min(
        padding((*rungs, max_size), values)
        for rungs in itertools.combinations(candidates, min(k - 1, len(candidates)))
    )


@pytest.mark.parametrize("seed", range(40))
def test_optimal_ladders_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    max_size = rng.randint(1, 40)
    values = np.array([rng.randint(1, max_size) for _ in range(rng.randint(1, 14))])
    results = optimal_ladders(values, max_size, max_rungs=6)
    for k, (cost, ladder) in enumerate(results, start=1):
        assert ladder[-1] == max_size and list(ladder) == sorted(set(ladder))
        assert padding(ladder, values) == cost
        assert cost == brute_force(values, max_size, k), (k, ladder)
    # It stops once every distinct value has a rung; padding is then zero.
    distinct = len(set(values.tolist()) | {max_size})
    assert len(results) == min(6, distinct)
    if distinct <= 6:
        assert results[-1][0] == 0


def all_ladders(values: np.ndarray, max_size: int, align: int = 1):
    candidates = sorted({int(v) for v in values if v < max_size})
    if align > 1:
        candidates = list(range(align, max_size, align))
    for n in range(len(candidates) + 1):
        for rungs in itertools.combinations(candidates, n):
            yield (*rungs, max_size)


def shapes_of(tokens: list[int], requests: list[int], max_t: int, max_r: int) -> StepShapes:
    arr = np.asarray
    return StepShapes(arr(tokens), arr(requests), arr(requests), max_t, max_r)


@pytest.mark.parametrize("seed", range(8))
def test_plan_is_optimal_over_every_ladder_pair_within_the_budget(seed: int) -> None:
    rng = random.Random(100 + seed)
    max_t, max_r = rng.randint(6, 14), rng.randint(2, 5)
    steps = rng.randint(3, 25)
    tokens = [rng.randint(1, max_t) for _ in range(steps)]
    requests = [rng.randint(0, min(max_r, t)) for t in tokens]
    budget, row_cost, align = rng.randint(4, 16), rng.choice([0.0, 0.3, 2.0]), rng.choice([1, 3])
    plan = plan_buckets(
        shapes_of(tokens, requests, max_t, max_r), budget, row_cost=row_cost, token_align=align
    )
    t_vals, r_vals = np.array(tokens), np.array([r for r in requests if r])
    best = min(
        padding(tl, t_vals) + row_cost * padding(rl, r_vals)
        for tl in all_ladders(t_vals, max_t, align)
        for rl in all_ladders(r_vals, max_r)
        if graph_count(len(tl), len(rl)) <= budget
    )
    assert plan.planned.cost == pytest.approx(best)
    assert plan.planned.graphs <= budget
    assert all(t % align == 0 for t in plan.tokens[:-1])
    for score in plan.baselines.values():
        assert score.graphs <= budget
        assert score.tokens[-1] == max_t and score.requests[-1] == max_r
        if align == 1:  # baselines are not aligned, so only then are they in the search space
            assert score.cost >= plan.planned.cost - 1e-9


def test_plan_rejects_bad_budgets() -> None:
    shapes = shapes_of([3, 5], [1, 1], 8, 2)
    with pytest.raises(ConfigError, match="max_graphs: must be an integer >= 5"):
        plan_buckets(shapes, 3)
    with pytest.raises(ConfigError, match="max_seqs_per_step"):
        plan_buckets(shapes_of([3], [1], 4, 8), 10)


# ---- traces -----------------------------------------------------------------------------------


def write_lines(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_trace_skips_blank_and_comment_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path,
        "# recorded",
        '{"prompt_tokens": 5, "output_tokens": 2}',
        "",
        '{"prompt_tokens": 1, "output_tokens": 1}',
    )
    assert read_trace(path) == [TraceRequest(5, 2), TraceRequest(1, 1)]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"trace.jsonl:2: not valid JSON"),
        ("[1, 2]", r"trace.jsonl:2: expected a JSON object, got list"),
        ('{"prompt_tokens": 5}', r"trace.jsonl:2: output_tokens: required key is missing"),
        ('{"prompt_tokens": "5", "output_tokens": 1}', r":2: prompt_tokens: expected an integer"),
        ('{"prompt_tokens": 0, "output_tokens": 1}', r":2: prompt_tokens: must be at least 1"),
        ('{"prompt_tokens": 3, "output_tokens": 0}', r":2: output_tokens: must be at least 1"),
        ('{"prompt_tokens": 3, "output_tokens": true}', r":2: output_tokens: expected an int"),
        ('{"prompt_tokens": 3, "output_tokens": 1, "x": 1}', r":2: x: unknown key"),
        ('{"prompt_tokens": 3, "output_tokens": 1, "arrival": -1}', r":2: arrival: must be"),
        ('{"prompt_tokens": 3, "output_tokens": 1, "arrival": "now"}', r":2: arrival: expected"),
        (
            '{"prompt_tokens": 3, "output_tokens": 1, "arrival": 1.5}',
            r"trace.jsonl: 1 of 2 requests have an arrival",
        ),
    ],
)
def test_read_trace_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path, '{"prompt_tokens": 5, "output_tokens": 2}', line)
    with pytest.raises(ConfigError, match=message):
        read_trace(path)


def test_read_trace_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trace file not found"):
        read_trace(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="the trace has no requests"):
        read_trace(write_lines(tmp_path, "# nothing"))


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_traces_are_seeded_valid_and_round_trip(name: str, tmp_path: Path) -> None:
    gen = SYNTHETIC[name]
    trace = gen(300, seed=3, max_seq_len=1024, rate=5.0)
    assert trace == gen(300, seed=3, max_seq_len=1024, rate=5.0)
    assert trace != gen(300, seed=4, max_seq_len=1024, rate=5.0)
    assert all(r.prompt_tokens >= 1 and r.output_tokens >= 1 for r in trace)
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in trace)
    arrivals = [r.arrival for r in trace]
    assert arrivals == sorted(arrivals)
    assert read_trace(write_trace(tmp_path / "t.jsonl", trace)) == trace
    assert all(r.arrival is None for r in gen(10))


# ---- simulation -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
@pytest.mark.parametrize("rate", [None, 20.0])
def test_simulation_respects_budgets_and_conserves_tokens(name: str, rate: float | None) -> None:
    trace = SYNTHETIC[name](150, seed=1, max_seq_len=2048, rate=rate)
    shapes = simulate(trace, max_tokens_per_step=256, max_seqs_per_step=8)
    assert shapes.tokens.max() <= 256 and shapes.seqs.max() <= 8
    assert (shapes.requests <= shapes.seqs).all() and (shapes.tokens >= shapes.seqs).all()
    assert shapes.seqs.min() >= 1
    # Every prompt token and every generated token but the last is computed exactly once.
    assert shapes.tokens.sum() == sum(r.prompt_tokens + r.output_tokens - 1 for r in trace)
    assert shapes.requests.sum() == sum(r.output_tokens for r in trace)


def test_simulation_caps_at_max_seq_len() -> None:
    shapes = simulate(
        [TraceRequest(5, 100)], max_tokens_per_step=4, max_seqs_per_step=1, max_seq_len=10
    )
    assert shapes.tokens.tolist() == [4, 1, 1, 1, 1, 1]  # prompt 4+1, then 4 decodes
    assert shapes.requests.sum() == 5  # stopped at 10 tokens
    with pytest.raises(ConfigError, match="does not fit max_seq_len"):
        simulate([TraceRequest(10, 1)], max_tokens_per_step=4, max_seqs_per_step=1, max_seq_len=10)


def run_real_scheduler(trace: list[TraceRequest], max_t: int, max_s: int, concurrency: int):
    """The real Scheduler on `trace`, closed loop, with pages to spare and no prefix hits."""
    page, max_len = 16, 1 + max(r.prompt_tokens + r.output_tokens for r in trace)
    bm = BlockManager(concurrency * -(-max_len // page) + 1, page)
    sched = Scheduler(bm, max_tokens_per_step=max_t, max_seqs_per_step=max_s, max_seq_len=max_len)
    pending, shapes = list(enumerate(trace)), []
    while pending or sched.has_unfinished:
        while pending and len(sched.waiting) + len(sched.running) < concurrency:
            i, r = pending.pop(0)
            prompt = [1000 + i] + [1 + (i * 7 + k) % 900 for k in range(r.prompt_tokens - 1)]
            params = SamplingParams(temperature=0.0, max_tokens=r.output_tokens, ignore_eos=True)
            sched.add(*make_sequences(str(i), prompt, params, first_seq_id=i, arrival_time=0.0))
        out = sched.schedule()
        assert not out.preempted
        sampled = {c.seq.seq_id: 7 for c in out.sampling_chunks}
        shapes.append((out.num_tokens, len(sampled)))
        sched.postprocess(out, sampled)
    return shapes


@pytest.mark.parametrize(
    ("concurrency", "max_t", "max_s"), [(1, 32, 4), (3, 32, 4), (12, 32, 4), (9, 3, 4), (6, 64, 6)]
)
def test_simulation_matches_the_real_scheduler_step_for_step(
    concurrency: int, max_t: int, max_s: int
) -> None:
    rng = random.Random(concurrency * 100 + max_t)
    trace = [TraceRequest(rng.randint(1, 90), rng.randint(1, 12)) for _ in range(30)]
    real = run_real_scheduler(trace, max_t, max_s, concurrency)
    sim = simulate(
        trace, max_tokens_per_step=max_t, max_seqs_per_step=max_s, concurrency=concurrency
    )
    assert list(zip(sim.tokens.tolist(), sim.requests.tolist(), strict=True)) == real


# ---- end to end and the CLI -------------------------------------------------------------------


@pytest.fixture
def chat_trace(tmp_path: Path) -> Path:
    return write_trace(tmp_path / "chat.jsonl", SYNTHETIC["short-chat"](200, seed=0, rate=10.0))


def test_plan_from_trace_records_its_source(chat_trace: Path) -> None:
    plan = plan_from_trace(chat_trace, 20, max_tokens_per_step=512, max_seqs_per_step=16)
    assert plan.tokens[-1] == 512 and plan.requests[-1] == 16
    assert plan.planned.graphs <= 20
    assert plan.planned.cost <= min(s.cost for s in plan.baselines.values())
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["trace"] == "chat.jsonl" and len(d["trace_sha256"]) == 64
    assert d["planned"]["tokens"] == list(plan.tokens)


def test_cli_plan_table(chat_trace: Path) -> None:
    args = [
        "plan",
        "--trace",
        str(chat_trace),
        "--max-graphs",
        "20",
        "--max-tokens-per-step",
        "512",
    ]
    result = CliRunner().invoke(buckets, [*args, "--max-seqs-per-step", "16"])
    assert result.exit_code == 0, result.output
    for word in ("planned", "pow2", "step", "token pad", "model.yaml  buckets.tokens: ["):
        assert word in result.output


def test_cli_plan_json(chat_trace: Path) -> None:
    args = ["plan", "--trace", str(chat_trace), "--max-graphs", "12", "--json", "--align", "8"]
    result = CliRunner().invoke(buckets, args)
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["planned"]["graphs"] <= 12 and d["pow2"]["graphs"] <= 12
    assert all(t % 8 == 0 for t in d["planned"]["tokens"])
    assert set(d) >= {"planned", "pow2", "step", "max_graphs", "trace_sha256"}


def test_cli_plan_errors(tmp_path: Path) -> None:
    bad = write_lines(tmp_path, '{"prompt_tokens": 5, "output_tokens": 2}', "{oops")
    result = CliRunner().invoke(buckets, ["plan", "--trace", str(bad), "--max-graphs", "9"])
    assert result.exit_code == 1
    assert "trace.jsonl:2: not valid JSON" in result.output
    result = CliRunner().invoke(buckets, ["plan", "--trace", str(bad), "--max-graphs", "3"])
    assert result.exit_code == 2 and "--max-graphs" in result.output


# ---- model.yaml `buckets: {plan: ...}` through a build ------------------------------------------


def test_a_planned_model_yaml_builds_records_its_plan_reproducibly(tiny_checkpoint, tmp_path):
    trace = SYNTHETIC["short-chat"](60, seed=3, max_seq_len=128, rate=20.0)
    write_trace(tmp_path / "chat.jsonl", trace)
    spec = {
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "max_seq_len": 128,
        "buckets": {"plan": "chat.jsonl", "max_graphs": 10, "page_size": 16, "max_tokens": 64},
    }
    spec["buckets"]["max_requests"] = 4
    (tmp_path / "planned.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_build_config(tmp_path / "planned.yaml")
    a = build_bundle(cfg, tmp_path / "a", compile_targets=False)
    again = load_build_config(tmp_path / "planned.yaml")  # planned afresh: same ladders, same plan
    b = build_bundle(again, tmp_path / "b", compile_targets=False, use_cache=False)
    assert a.digest == b.digest
    m = read_manifest(tmp_path / "a")[0].to_dict()
    plan = m["buckets"]["plan"]
    assert plan["trace"] == "chat.jsonl" and plan["planned"]["tokens"] == m["buckets"]["tokens"]
    assert len(m["functions"]) == graph_count(len(cfg.token_buckets), len(cfg.request_buckets))
    assert len(m["functions"]) == plan["planned"]["graphs"] <= 10
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "plan      chat.jsonl" in shown.output and "expected padding planned " in shown.output
    assert "pow2 " in shown.output
