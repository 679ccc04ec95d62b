"""A bounded load generator for the HTTP server (loopback only), and its report.

Each virtual client loops over HTTP requests of random shape (completions or chat, streamed or
not, text or token-id prompts of random length, n = 1 or 2, greedy or seeded sampling) until the
plan's request count is spent. A fraction of streamed requests disconnect after a few events,
and a fraction of non-streamed ones give up (close the connection) before the answer; a 503
(the queue is full) is answered by a short back-off. Every HTTP request ends in one class:

    completed      200 and every choice finished ("length" or "stop"; streams end with [DONE])
    disconnected   the client went away on purpose (`choices` of them may have been accepted)
    rejected_503   the server's queue was full
    error_4xx / error_5xx / broken   anything else: a bug (the tests require none)

`instrument(api)` wraps the app's `submit` to count what the server accepted and the queue
depth at every rejection, so that "nothing lost" and "503 only beyond the limit" are exact.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "looked",
    "at",
    "birds",
    "in",
    "the",
    "garden",
    "while",
    "rain",
    "fell",
    "over",
    "hills",
    "compiler",
    "graphs",
    "bundle",
    "token",
    "page",
    "cache",
    "river",
    "story",
    "once",
    "upon",
    "time",
    "light",
    "stone",
]


@dataclass(frozen=True)
class LoadPlan:
    requests: int  # HTTP requests in all (503 retries included)
    concurrency: int  # virtual clients at once
    disconnect_stream: float = 0.15  # streamed requests that hang up after a few events
    disconnect_plain: float = 0.05  # non-streamed requests that give up before the answer
    max_tokens: int = 40
    max_prompt_tokens: int = 90
    seed: int = 0
    duration_s: float | None = None  # stop starting requests after this long (soak)
    deadline_s: float = 600.0  # hard bound on the whole run
    rss_every_s: float = 5.0


@dataclass
class LoadReport:
    outcomes: Counter = field(default_factory=Counter)  # class -> HTTP requests
    completed_choices: int = 0
    disconnected_choices: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_in_flight: int = 0
    rss_mib: list[float] = field(default_factory=list)  # this process, every rss_every_s

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())


@dataclass
class ServerLedger:
    """What the server accepted and refused, seen from inside `submit`."""

    accepted_requests: int = 0
    accepted_choices: int = 0
    # (queued, prompts) -> how many times; a Counter, so that the ledger itself stays small
    rejections: Counter = field(default_factory=Counter)


def instrument(api: Any, max_queued: int) -> ServerLedger:
    """Count accepted choices and the queue depth at every QueueFullError of `api.submit`."""
    from aotlm.runtime.generation.scheduler import QueueFullError

    ledger, submit = ServerLedger(), api.submit

    async def counted(prompts, params):
        queued = api.engine.num_queued + api._reserved  # a batch still being added counts
        try:
            job = await submit(prompts, params)
        except QueueFullError:
            ledger.rejections[queued, len(prompts)] += 1
            raise
        ledger.accepted_requests += 1
        ledger.accepted_choices += len(prompts) * params[0].n
        return job

    api.submit = counted
    return ledger


def rss_bytes() -> int:
    """Resident set size of this process, after a collection (Linux /proc)."""
    gc.collect()
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _body(rng: random.Random, plan: LoadPlan, chat: bool, stream: bool) -> dict[str, Any]:
    n = 2 if rng.random() < 0.2 else 1
    body: dict[str, Any] = {"model": "tiny", "stream": stream, "n": n}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 31))
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
        body["max_tokens"] = rng.randint(1, plan.max_tokens)
    elif rng.random() < 0.5:
        body["prompt"] = words
        body["max_tokens"] = rng.randint(1, plan.max_tokens)
    else:  # token ids: exact, random length up to the context limit
        length = rng.randint(1, plan.max_prompt_tokens)
        body["prompt"] = [rng.randrange(3, 900) for _ in range(length)]
        body["max_tokens"] = rng.randint(1, min(plan.max_tokens, 127 - length))
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return body


class _Client:
    def __init__(self, http: httpx.AsyncClient, plan: LoadPlan, report: LoadReport) -> None:
        self.http, self.plan, self.report = http, plan, report
        self.in_flight = 0

    def _record(self, kind: str, detail: str = "") -> None:
        self.report.outcomes[kind] += 1
        if kind in ("error_4xx", "error_5xx", "broken") and len(self.report.errors) < 20:
            self.report.errors.append(detail)

    async def one(self, rng: random.Random) -> None:
        chat, stream = rng.random() < 0.3, rng.random() < 0.5
        body = _body(rng, self.plan, chat, stream)
        url = "/v1/chat/completions" if chat else "/v1/completions"
        self.in_flight += 1
        self.report.max_in_flight = max(self.report.max_in_flight, self.in_flight)
        try:
            if stream:
                await self._stream(rng, url, body)
            else:
                await self._plain(rng, url, body)
        except (httpx.TransportError, json.JSONDecodeError, KeyError, AssertionError) as e:
            self._record("broken", f"{url} stream={stream} {e!r} {e.__context__!r}")
        finally:
            self.in_flight -= 1

    async def _status(self, r: httpx.Response, rng: random.Random) -> bool:
        """True for 200; records and returns False for anything else."""
        if r.status_code == 200:
            return True
        text = (await r.aread()).decode(errors="replace")[:300]
        if r.status_code == 503 and json.loads(text)["error"]["type"] == "service_unavailable":
            self._record("rejected_503")
            await asyncio.sleep(rng.uniform(0.2, 1.0))  # Retry-After: 1, with jitter
        else:
            kind = "error_4xx" if r.status_code < 500 else "error_5xx"
            self._record(kind, f"{r.status_code} {text}")
        return False

    async def _plain(self, rng: random.Random, url: str, body: dict) -> None:
        n = body["n"]
        if rng.random() < self.plan.disconnect_plain:
            try:  # give up before the answer: the connection closes under the request
                r = await asyncio.wait_for(self.http.post(url, json=body), rng.uniform(0.01, 0.3))
            except TimeoutError:
                self.report.disconnected_choices += n
                self._record("disconnected")
                return
        else:
            r = await self.http.post(url, json=body)
        if not await self._status(r, rng):
            return
        choices = r.json()["choices"]
        assert len(choices) == n and all(c["finish_reason"] in ("length", "stop") for c in choices)
        self.report.completed_choices += n
        self._record("completed")

    async def _stream(self, rng: random.Random, url: str, body: dict) -> None:
        n = body["n"]
        hang_up = rng.randint(1, 4) if rng.random() < self.plan.disconnect_stream else None
        async with self.http.stream("POST", url, json=body) as r:
            if not await self._status(r, rng):
                return
            events, finished = 0, set()
            async for line in r.aiter_lines():
                if not line:
                    continue
                assert line.startswith("data: "), line
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    assert len(finished) == n, (finished, n)
                    self.report.completed_choices += n
                    self._record("completed")
                    return
                event = json.loads(data)
                assert "error" not in event, event
                for c in event["choices"]:
                    if c.get("finish_reason"):
                        finished.add(c["index"])
                events += 1
                if hang_up is not None and events >= hang_up:
                    break  # leaving the block closes the connection mid-stream
        self.report.disconnected_choices += n
        self._record("disconnected")


async def run_load(base_url: str, plan: LoadPlan) -> LoadReport:
    """Run `plan` against `base_url` (loopback); bounded by its request count and deadline."""
    assert base_url.startswith(("http://127.0.0.1:", "http://localhost:")), base_url
    report = LoadReport()
    budget = iter(range(plan.requests))
    # Idle connections expire on the client first (uvicorn closes them after 5 s): otherwise a
    # request may go out on a connection the server is closing, the keep-alive race of HTTP/1.1.
    limits = httpx.Limits(
        max_connections=plan.concurrency + 8, max_keepalive_connections=64, keepalive_expiry=1.0
    )
    timeout = httpx.Timeout(120.0, connect=30.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as http:
        client = _Client(http, plan, report)

        start = time.monotonic()
        stop_at = start + (plan.duration_s if plan.duration_s is not None else plan.deadline_s)

        async def worker(k: int) -> None:
            rng = random.Random(plan.seed * 100_003 + k)
            for _ in budget:
                if time.monotonic() > stop_at:
                    return
                await client.one(rng)

        async def sample_rss() -> None:
            while True:
                report.rss_mib.append(round(rss_bytes() / 2**20, 1))
                await asyncio.sleep(plan.rss_every_s)

        sampler = asyncio.create_task(sample_rss())
        workers = [asyncio.create_task(worker(k)) for k in range(plan.concurrency)]
        done, pending = await asyncio.wait(workers, timeout=plan.deadline_s)
        for t in (*pending, sampler):
            t.cancel()
        report.seconds = time.monotonic() - start
        assert not pending, f"the load did not finish within {plan.deadline_s} s"
        for t in done:
            t.result()
    return report
