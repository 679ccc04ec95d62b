"""Faults under a real server: a step that fails, an engine that dies, a client that leaves
before the first byte, SIGTERM in the middle of load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_async_engine import FakeEngine
from test_server import serving

from aotlm.errors import AotlmError
from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.http.server import create_app

BODY = {"prompt": "hello there", "max_tokens": 30, "temperature": 0}


@pytest.fixture
def engine(tiny_bundle):
    ae = AsyncEngine.from_bundle(tiny_bundle[0])
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield ae
    ae.shutdown()


def _idle(ae: AsyncEngine) -> None:
    deadline = time.monotonic() + 10
    while ae.num_in_flight or ae.stats.kv_pages_used:
        assert time.monotonic() < deadline, ae.stats
        time.sleep(0.02)


def _inject(ae: AsyncEngine, error: Exception, when) -> threading.Event:
    """Make the runner raise `error` once, on the first step where `when(chunks)` holds."""
    runner = ae.engine.runner
    execute, execute_decode, fired = runner.execute, runner.execute_decode, threading.Event()

    def fire(chunks):
        if not fired.is_set() and when(chunks):
            fired.set()
            raise error

    def flaky(chunks):
        fire(chunks)
        return execute(chunks)

    def flaky_decode(chunks, limits, num_steps):  # multi-step decodes fail the same way
        fire(chunks)
        return execute_decode(chunks, limits, num_steps)

    runner.execute, runner.execute_decode = flaky, flaky_decode
    return fired


def test_a_failed_step_fails_its_batch_and_the_rest_is_served(engine):
    """4 requests run (the largest request bucket), 2 wait; the step of the 4 fails: those 4
    get a 500, the 2 waiting ones and every later request are served as if nothing happened."""
    sched = engine.engine.scheduler
    fired = _inject(
        engine,
        AotlmError("injected step failure"),
        lambda chunks: len(chunks) == 4 and len(sched.waiting) == 2,
    )
    with serving(create_app(engine, model_name="tiny")) as url:

        async def six() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(
                    *(http.post("/v1/completions", json=BODY) for _ in range(6))
                )

        responses = asyncio.run(six())
        assert fired.is_set()
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 500, 500, 500, 500], [r.text for r in responses]
        for r in responses:
            if r.status_code == 500:
                error = r.json()["error"]
                assert error["type"] == "server_error" and "injected" in error["message"]
            else:
                assert r.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        again = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60)
        assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 30
        _idle(engine)
    engine.engine.block_manager.check_invariants()
    assert engine.engine.compiles_after_ready == 0


def test_an_unknown_error_kills_the_engine_and_health_says_so(engine):
    """A non-AotlmError inside a step (a lost device, a bug) cannot be reasoned about: the
    streams in flight end with an in-band 500 error, then /health and /ready answer 503."""
    fired = _inject(engine, RuntimeError("device lost"), lambda chunks: True)
    fired.set()  # armed below, once the stream is running
    with serving(create_app(engine, model_name="tiny")) as url:
        body = {**BODY, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            first = json.loads(next(lines).removeprefix("data: "))
            assert first["choices"][0]["finish_reason"] is None
            fired.clear()
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        error = json.loads(rest[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "device lost" in error["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        assert "device lost" in health.json()["reason"]
        assert httpx.get(f"{url}/ready").status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json=BODY)
        assert refused.status_code == 503 and "stopped after an error" in refused.text
    assert engine.num_in_flight == 0


def test_a_client_gone_before_the_first_chunk_aborts_its_request():
    """The client sends a streamed request and hangs up at once: the response body never
    starts, and the request must still be aborted (not generated to the end for nobody)."""
    fake = FakeEngine()
    fake.step_delay = 0.02  # 100 tokens: 2 s if nobody aborts it
    ae = AsyncEngine(lambda: fake)
    app = create_app(ae, model_name="tiny")
    with serving(app) as url:
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "hi", "max_tokens": 100, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 5
            while not ae.num_in_flight:  # accepted: now leave before reading anything
                assert time.monotonic() < deadline
                time.sleep(0.001)
        deadline = time.monotonic() + 1.0  # well before the 2 s it would take to finish
        while ae.num_in_flight:
            assert time.monotonic() < deadline, "the abandoned request kept running"
            time.sleep(0.01)
        aborted = app.state.api.metrics.registry.get_sample_value(
            "aotlm:request_success_total", {"finished_reason": "abort"}
        )
        assert aborted == 1
    ae.shutdown()
    assert fake.block_manager.num_used_pages == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(bundle: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "aotlm", "serve", str(bundle), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "the server exited while loading"
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


async def _one(http: httpx.AsyncClient, i: int, started: asyncio.Event) -> str:
    """A streamed or whole completion; returns its finish reason, or how it broke."""
    body = {**BODY, "prompt": f"request {i}", "max_tokens": 24 + i % 16, "stream": i % 2 == 0}
    if not body["stream"]:
        started.set()
        r = await http.post("/v1/completions", json=body)
        return r.json()["choices"][0]["finish_reason"] if r.status_code == 200 else str(r)
    reason = "no [DONE]"
    async with http.stream("POST", "/v1/completions", json=body) as r:
        started.set()  # accepted: the response starts before the first token
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return reason
            if line:
                event = json.loads(line.removeprefix("data: "))
                reason = event.get("error") or event["choices"][0]["finish_reason"] or reason
    return reason


def test_sigterm_mid_load_drains_every_request_then_exits_0(tiny_bundle):
    port = _free_port()
    proc = _start_server(tiny_bundle[0], port, "--drain-timeout", "60")
    url = f"http://127.0.0.1:{port}"
    try:

        async def load() -> tuple[list[str], float]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                started = [asyncio.Event() for _ in range(24)]
                tasks = [asyncio.create_task(_one(http, i, e)) for i, e in enumerate(started)]
                await asyncio.gather(*(e.wait() for e in started))
                await asyncio.sleep(0.2)  # every request is on the server by now
                proc.send_signal(signal.SIGTERM)
                sent = time.monotonic()
                return list(await asyncio.gather(*tasks)), sent

        reasons, sent = asyncio.run(load())
        assert reasons == ["length"] * 24, reasons  # drained: none cut, none failed
        assert proc.wait(60) == 0
        assert time.monotonic() - sent < 60
        with pytest.raises(httpx.ConnectError):  # and it is gone
            httpx.get(f"{url}/health")
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_past_the_drain_timeout_cuts_the_rest_and_still_exits_0(tiny_bundle):
    port = _free_port()
    proc = _start_server(tiny_bundle[0], port, "--drain-timeout", "0.5")
    url = f"http://127.0.0.1:{port}"
    try:

        async def load() -> list[str]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                started = [asyncio.Event() for _ in range(24)]
                tasks = [asyncio.create_task(_long(http, i, e)) for i, e in enumerate(started)]
                await asyncio.gather(*(e.wait() for e in started))
                proc.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*tasks))

        reasons = asyncio.run(load())
        assert proc.wait(20) == 0
        assert "cut" in reasons, reasons  # 24 x 100 tokens, 4 at a time, take longer than 0.5 s
    finally:
        proc.kill()
        proc.wait()


async def _long(http: httpx.AsyncClient, i: int, started: asyncio.Event) -> str:
    """The last finish reason of a long stream, or "cut" if the connection closed first."""
    body = {**BODY, "prompt": f"long {i}", "max_tokens": 100, "stream": True}
    reason = None
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            started.set()  # accepted (most wait in the queue for their first step)
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return reason
                if line:
                    reason = json.loads(line.removeprefix("data: "))["choices"][0]["finish_reason"]
    except httpx.HTTPError:
        started.set()
    return "cut"
