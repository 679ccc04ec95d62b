"""Load and soak against a real uvicorn server on 127.0.0.1, then an audit of what is left.

The bundle is small on purpose: 8 sequences per step over 19 usable KV pages (each sequence may
need 8), so under load the scheduler preempts, the prefix cache evicts, and the queue overflows.
After the load: every accepted choice finished or was aborted by its client, every 503 came
from a full queue, no page is held, the block manager's invariants hold, nothing compiled, and
RSS grew by a bounded amount (printed with the rest of the figures: `pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from bundle_factory import build_from_yaml, write_model_yaml
from load_driver import LoadPlan, LoadReport, ServerLedger, instrument, rss_bytes, run_load
from test_server import serving

from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.http.server import create_app

MAX_QUEUED = 24
STRESS_BUCKETS = {"tokens": [16, 32, 64], "requests": [1, 2, 4, 8], "page_size": 16}


@pytest.fixture(scope="module")
def stress_engine(tiny_checkpoint, tmp_path_factory) -> Iterator[AsyncEngine]:
    spec = write_model_yaml(
        tmp_path_factory.mktemp("stress-spec"), tiny_checkpoint, buckets=STRESS_BUCKETS, kv_pages=20
    )
    out = tmp_path_factory.mktemp("stress") / "bundle"
    build_from_yaml(spec, out)
    ae = AsyncEngine.from_bundle(out)
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield ae
    ae.shutdown()


def _wait_idle(ae: AsyncEngine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while ae.num_in_flight or ae.num_queued or ae.stats.running or ae.stats.kv_pages_used:
        assert time.monotonic() < deadline, (
            f"not idle: {ae.num_in_flight} in flight, {ae.num_queued} queued, {ae.stats}"
        )
        time.sleep(0.02)


def _sample(api, name: str, **labels: str) -> float:
    return api.metrics.registry.get_sample_value(name, labels) or 0.0


def _finished(api) -> dict[str, float]:
    return {
        r: _sample(api, "aotlm:request_success_total", finished_reason=r)
        for r in ("length", "stop", "abort")
    }


def audit(
    ae: AsyncEngine, api, report: LoadReport, ledger: ServerLedger, before: dict[str, float]
) -> dict[str, float]:
    """Assert that nothing was lost, leaked or compiled; returns the figures."""
    assert report.total and not report.errors, report.errors
    bad = {k: v for k, v in report.outcomes.items() if k.startswith(("error", "broken"))}
    assert not bad, (bad, report.errors)
    # 503 only from a full queue: each rejection saw the queue at its limit. (A client that
    # gave up early may not have read its 503.)
    rejected = report.outcomes["rejected_503"]
    refused = sum(ledger.rejections.values())
    assert rejected <= refused <= rejected + report.outcomes["disconnected"]
    assert all(q + p > MAX_QUEUED for q, p in ledger.rejections), ledger.rejections
    _wait_idle(ae)
    finished = {r: v - before[r] for r, v in _finished(api).items()}
    # Every accepted choice ended, either finished or aborted because its client left.
    assert sum(finished.values()) == ledger.accepted_choices, (finished, ledger)
    assert finished["length"] + finished["stop"] >= report.completed_choices
    assert ledger.accepted_choices - report.completed_choices <= report.disconnected_choices
    assert finished["abort"] <= report.disconnected_choices
    engine = ae.engine
    bm = engine.block_manager
    assert bm.num_used_pages == 0 and ae.stats.kv_pages_used == 0
    bm.check_invariants()  # the engine thread is idle: safe to read its state
    assert not engine.scheduler.has_unfinished and not engine._texts and not ae._requests
    assert engine.compiles_after_ready == 0
    return {
        "requests": report.total,
        "seconds": round(report.seconds, 1),
        "concurrency": report.max_in_flight,
        "completed": report.outcomes["completed"],
        "disconnected": report.outcomes["disconnected"],
        "rejected_503": report.outcomes["rejected_503"],
        "errors_4xx": report.outcomes["error_4xx"],
        "errors_5xx": report.outcomes["error_5xx"],
        "accepted_choices": ledger.accepted_choices,
        "aborted_choices": finished["abort"],
        "preemptions": engine.scheduler.num_preemptions,
        "prefix_hit_tokens": bm.prefix_hits,
        "leaked_pages": bm.num_used_pages,
        "compiles_after_ready": engine.compiles_after_ready,
    }


def run_and_audit(ae: AsyncEngine, plan: LoadPlan, warmup: LoadPlan) -> dict[str, float]:
    app = create_app(ae, model_name="tiny", max_queued=MAX_QUEUED)
    ledger = instrument(app.state.api, MAX_QUEUED)
    with serving(app) as url:
        asyncio.run(run_load(url, warmup))  # steady state: allocators, caches, connections
        _wait_idle(ae)
        before = rss_bytes()
        ledger.__init__()  # count the measured run only
        finished = _finished(app.state.api)
        report = asyncio.run(run_load(url, plan))
        figures = audit(ae, app.state.api, report, ledger, finished)
        figures["rss_growth_mib"] = round((rss_bytes() - before) / 2**20, 1)
        figures["rss_mib_series"] = report.rss_mib
    print("\nload figures:", figures)
    return figures


def test_load_short(stress_engine):
    """~20-40 s: hundreds of concurrent clients, disconnects, and a queue that overflows."""
    plan = LoadPlan(requests=1200, concurrency=200, seed=1, deadline_s=240)
    figures = run_and_audit(stress_engine, plan, LoadPlan(requests=200, concurrency=200))
    assert figures["completed"] >= 50 and figures["rejected_503"] > 0
    assert figures["disconnected"] > 0 and figures["preemptions"] > 0
    assert figures["rss_growth_mib"] < 64


@pytest.mark.slow
def test_soak(stress_engine):
    """2-5 minutes of the same, with more clients: memory must plateau."""
    plan = LoadPlan(requests=50_000, concurrency=300, seed=2, duration_s=150, deadline_s=300)
    figures = run_and_audit(stress_engine, plan, LoadPlan(requests=900, concurrency=300))
    assert figures["completed"] >= 1000
    assert figures["rss_growth_mib"] < 64
    # a plateau: the second half of the run adds little to the first half's peak
    series = figures["rss_mib_series"]
    half = len(series) // 2
    assert max(series[half:]) - max(series[:half]) < 16, series


@pytest.mark.parametrize("prompts", [1, 2])
def test_503_exactly_beyond_the_queue_limit(stress_engine, prompts):
    """With the engine held inside a step, requests are taken until their prompts fill the
    queue (MAX_QUEUED), and every later one is refused with 503; released, the taken ones
    complete. Batched prompts count one each, also while a batch is still being added."""
    ae = stress_engine
    gate, inside = threading.Event(), threading.Event()
    engine = ae.engine
    step = engine.step

    def held_step():
        inside.set()
        gate.wait(30)
        return step()

    app = create_app(ae, model_name="tiny", max_queued=MAX_QUEUED)
    api = app.state.api
    ledger = instrument(api, MAX_QUEUED)
    prompt = "hello there" if prompts == 1 else [[5, 6, 7], [8, 9]]
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0}
    engine.step = held_step
    try:
        with serving(app) as url:

            async def scenario() -> tuple[list[int], list[int]]:
                async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                    first = asyncio.create_task(http.post("/v1/completions", json=body))
                    deadline = time.monotonic() + 30
                    while not inside.wait(0):
                        assert time.monotonic() < deadline, "the engine never stepped"
                        await asyncio.sleep(0.01)
                    taken = [
                        asyncio.create_task(http.post("/v1/completions", json=body))
                        for _ in range(MAX_QUEUED // prompts - 1)
                    ]
                    # queued, or reserved by a batch whose later prompts are still being added
                    while ae.num_queued + api._reserved < MAX_QUEUED:
                        assert time.monotonic() < deadline, (ae.num_queued, api._reserved)
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.1)
                    over = [await http.post("/v1/completions", json=body) for _ in range(5)]
                    gate.set()
                    done = await asyncio.gather(first, *taken)
                    return [r.status_code for r in done], [r.status_code for r in over]

            taken, over = asyncio.run(scenario())
    finally:
        engine.step = step
        gate.set()
    assert taken == [200] * (MAX_QUEUED // prompts)
    assert over == [503] * 5
    assert ledger.rejections == {(MAX_QUEUED, prompts): 5}
    assert ledger.accepted_choices == MAX_QUEUED
    _wait_idle(ae)
