"""The `Embedder` on one background thread, batching concurrent requests.

Every jax call (loading, compiling, each embed call) happens on that thread. A simple collector:
once a request arrives, the thread waits up to `max_wait_s` for others to join, or until the
queued inputs fill the largest batch bucket, then plans and runs the group in one go
(`Embedder.embed_ids`: longest first, cut into embed[S,B] calls) and hands each request its rows.
Results cross back to asyncio with `loop.call_soon_threadsafe`, so any number of event loops can
share one embedder. The thread's lifecycle (`is_ready`, `stats`, `shutdown`, ...) is
`BackgroundWorker`'s, as `AsyncEngine`'s is, so the server, /ready and /metrics treat both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aotlm.errors import AotlmError, CompileAfterReadyError
from aotlm.runtime.embedding.embedder import Embedder
from aotlm.runtime.load.trust import TrustPolicy
from aotlm.runtime.worker import (
    BackgroundWorker,
    EngineStats,
    EngineUnavailableError,
    RequestFailedError,
    settle_future,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_S = 0.002


@dataclass
class _Job:
    inputs: Sequence[Sequence[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class AsyncEmbedder(BackgroundWorker[Embedder]):
    """Owns the embedder thread. Build with `from_bundle`; `load` runs on the thread."""

    kind = "encoder"
    noun = "embedder"

    def __init__(self, load: Callable[[], Embedder], max_wait_s: float = DEFAULT_MAX_WAIT_S):
        self.max_wait_s = max_wait_s
        self._jobs: list[_Job] = []  # guarded by _cv
        self._running = 0  # requests in the group being run; guarded by _cv
        self.num_groups = 0  # groups run (each one Embedder.embed_ids over its requests' inputs)
        super().__init__(load, "aotlm-embedder")

    @classmethod
    def from_bundle(
        cls,
        path: Path | str,
        *,
        strict: bool = False,
        trust: TrustPolicy | None = None,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ) -> AsyncEmbedder:
        """Start loading `path` in the background (`/ready` says when it is done)."""
        return cls(lambda: Embedder.from_bundle(path, strict=strict, trust=trust), max_wait_s)

    @property
    def num_queued(self) -> int:
        """Requests waiting for the next group."""
        return len(self._jobs)

    @property
    def num_in_flight(self) -> int:
        return len(self._jobs) + self._running

    # ---- asyncio side -------------------------------------------------------------------

    async def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """Checked token-id lists (see `Embedder.token_ids`) -> f32 [N, H], in order."""
        if not self.is_ready:
            raise EngineUnavailableError(self.unavailable_reason())
        loop = asyncio.get_running_loop()
        job = _Job(inputs, loop.create_future(), loop)
        with self._cv:
            if self._exited:
                raise EngineUnavailableError(self.unavailable_reason())
            self._jobs.append(job)
            self._cv.notify()
        return await job.future

    # ---- embedder thread ----------------------------------------------------------------

    def _fail_pending(self, error: EngineUnavailableError) -> None:
        with self._cv:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                job.loop.call_soon_threadsafe(settle_future, job.future, error)

    def _next_group(self, embedder: Embedder) -> list[_Job] | None:
        """Wait for work, give others `max_wait_s` to join, take up to a full batch bucket."""
        full = embedder.loaded.request_buckets[-1]
        with self._cv:
            while not (self._jobs or self._stop):
                self._cv.wait()
            deadline = time.monotonic() + self.max_wait_s
            while not self._stop and sum(len(j.inputs) for j in self._jobs) < full:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._stop:
                return None
            group, total = [], 0
            while self._jobs and (not group or total + len(self._jobs[0].inputs) <= full):
                total += len(self._jobs[0].inputs)
                group.append(self._jobs.pop(0))
            self._running = len(group)
            return group

    def _serve(self, embedder: Embedder) -> None:
        while (group := self._next_group(embedder)) is not None:
            inputs = [ids for job in group for ids in job.inputs]
            try:
                vectors: np.ndarray | BaseException = embedder.embed_ids(inputs)
            except Exception as e:
                log.exception("an embed call failed; failing its requests")
                if not isinstance(e, AotlmError) or isinstance(e, CompileAfterReadyError):
                    self.error = e
                vectors = RequestFailedError(f"the embedder failed while running it: {e!r}")
            at = 0
            for job in group:
                n = len(job.inputs)
                part = vectors if isinstance(vectors, BaseException) else vectors[at : at + n]
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                    job.loop.call_soon_threadsafe(settle_future, job.future, part)
                at += n
            with self._cv:
                self._running = 0
            self.num_groups += 1
            self._publish_stats(embedder)
            if self.error is not None:
                return

    def _publish_stats(self, embedder: Embedder) -> None:
        self.stats = EngineStats(
            running=0,
            waiting=len(self._jobs),
            real_tokens=embedder.real_tokens,
            padded_tokens=embedder.padded_tokens,
            compiles_after_ready=embedder.compiles_after_ready,
        )
