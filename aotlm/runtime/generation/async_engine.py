"""The synchronous `Engine` on one background thread, streamed to asyncio callers.

Every jax call (loading, compiling, each step) must happen on one thread, and a step must never
block the event loop, so the engine lives on a dedicated thread (the lifecycle is
`BackgroundWorker`'s, aotlm/runtime/worker.py) that loops: drain the inbox of
add/abort commands, step while there is work, sleep on a condition when idle. What callers hold
(a `RequestStream` per request and its `RequestOutput`s) is in streams.py. The engine is used
through its own interface only (add_request, step, abort, stats, ...), never its parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from aotlm.errors import AotlmError, CompileAfterReadyError
from aotlm.runtime.generation.engine import Engine, StepFailedError
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.sequence import Sequence, SequenceStatus
from aotlm.runtime.generation.streams import (
    HANDOFF_WAIT_S,
    ChoiceDelta,
    RequestOutput,
    RequestStream,
    put_all,
    stable_text_end,
)
from aotlm.runtime.worker import (
    BackgroundWorker,
    EngineUnavailableError,
    RequestFailedError,
    settle_future,
)

log = logging.getLogger(__name__)


@dataclass
class _Add:
    stream: RequestStream
    prompt: str | Seq[int]
    params: SamplingParams
    accepted: asyncio.Future


@dataclass
class _Abort:
    stream: RequestStream


@dataclass
class _Tracked:
    """Engine-thread state of one request in flight."""

    stream: RequestStream
    seqs: list[Sequence]
    sent_chars: list[int] = field(default_factory=list)
    sent_tokens: list[int] = field(default_factory=list)
    scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.sent_chars = [0] * len(self.seqs)
        self.sent_tokens = [0] * len(self.seqs)


class AsyncEngine(BackgroundWorker[Engine]):
    """Owns the engine thread. Build with `from_bundle`; `load` runs on the engine thread."""

    def __init__(self, load: Callable[[], Engine], stream_interval: int = 1) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (got {stream_interval})")
        # A request's tokens go out once this many are unsent (its first and last at once).
        self.stream_interval = stream_interval
        self._inbox: list[_Add | _Abort] = []  # guarded by _cv
        self._in_flight = 0  # requests submitted and not yet finished; guarded by _cv
        self._queued = 0  # of those, not yet scheduled once; guarded by _cv
        self._requests: dict[str, _Tracked] = {}  # engine thread only
        super().__init__(load, "aotlm-engine")

    @classmethod
    def from_bundle(
        cls, path: Path | str, *, stream_interval: int = 1, **engine_kwargs: object
    ) -> AsyncEngine:
        """Start loading `path` in the background (`/ready` says when it is done)."""
        return cls(lambda: Engine.from_bundle(path, **engine_kwargs), stream_interval)

    @property
    def num_queued(self) -> int:
        """Requests accepted or submitted that no step has run yet (the wait queue)."""
        return self._queued

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    # ---- asyncio side -------------------------------------------------------------------

    async def add_request(self, prompt: str | Seq[int], params: SamplingParams) -> RequestStream:
        """Queue a request; returns once the engine took it, so that a full queue
        (`QueueFullError`) or a bad prompt (`RequestError`) raises before any streaming."""
        if not self.is_ready:
            raise EngineUnavailableError(self.unavailable_reason())
        loop = asyncio.get_running_loop()
        stream = RequestStream(lambda s: self._submit(_Abort(s)), loop)
        accepted = loop.create_future()
        self._submit(_Add(stream, prompt, params, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            stream.abort()
            raise
        return stream

    async def generate(
        self, prompt: str | Seq[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """`add_request`, then its outputs; leaving the loop early aborts the request."""
        stream = await self.add_request(prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def _submit(self, cmd: _Add | _Abort) -> None:
        """Called on the caller's event loop thread."""
        with self._cv:
            if self._exited:
                if isinstance(cmd, _Add):
                    cmd.accepted.set_exception(EngineUnavailableError(self.unavailable_reason()))
                return
            if isinstance(cmd, _Add):
                self._in_flight += 1
                self._queued += 1
            self._inbox.append(cmd)
            self._cv.notify()

    # ---- engine thread ------------------------------------------------------------------

    def _serve(self, engine: Engine) -> None:
        while True:
            with self._cv:
                while not (self._inbox or self._stop or engine.has_unfinished):
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                stop = self._stop
            for cmd in inbox:
                self._add(engine, cmd) if isinstance(cmd, _Add) else self._abort(engine, cmd)
            if stop:
                self._abort_all(engine)
                return
            if engine.has_unfinished and not self._step(engine):
                return
            self._publish_stats(engine)

    def _add(self, engine: Engine, cmd: _Add) -> None:
        try:
            seqs = engine.add_request(cmd.prompt, cmd.params)
        except Exception as e:  # RequestError, QueueFullError: the caller answers 400 / 503
            self._finished(queued=True)
            cmd.stream._call(settle_future, cmd.accepted, e)
            return
        cmd.stream.request_id = seqs[0].request_id
        self._requests[cmd.stream.request_id] = _Tracked(cmd.stream, seqs)
        cmd.stream._call(settle_future, cmd.accepted, None)

    def _abort(self, engine: Engine, cmd: _Abort) -> None:
        tracked = self._requests.pop(cmd.stream.request_id, None)
        if tracked is None:
            return  # finished (or rejected) before the abort arrived
        engine.abort(tracked.stream.request_id)
        self._release(engine, tracked)

    def _abort_all(self, engine: Engine) -> None:
        now = time.monotonic()
        for rid, tracked in list(self._requests.items()):
            aborted = engine.abort(rid)  # the unfinished choices
            tracked.stream._put(self._output(engine, tracked, aborted, now))
            del self._requests[rid]
            self._release(engine, tracked)

    def _step(self, engine: Engine) -> bool:
        """One engine step and its outputs; false when the engine cannot go on."""
        start = time.monotonic()
        try:
            updated = engine.step()
        except Exception as e:
            cause = e.cause if isinstance(e, StepFailedError) else e
            # An AotlmError leaves the engine consistent: only the requests that ran in the
            # failed step fail. Anything else (a lost device, a bug) stops the engine.
            fatal = not isinstance(cause, AotlmError) or isinstance(cause, CompileAfterReadyError)
            ran = e.request_ids if isinstance(e, StepFailedError) and not fatal else None
            log.exception("an engine step failed%s", "; stopping the engine" if fatal else "")
            if fatal:
                self.error = cause
            failed = RequestFailedError(f"the engine failed while running it: {cause!r}")
            for rid in list(self._requests) if ran is None else ran:
                engine.abort(rid)
                tracked = self._requests.pop(rid, None)
                if tracked is not None:
                    tracked.stream._put(failed)
                    self._release(engine, tracked)
            return not fatal
        now = time.monotonic()
        for tracked in self._requests.values():
            if tracked.scheduled_time is None and any(
                s.status is not SequenceStatus.WAITING for s in tracked.seqs
            ):
                tracked.scheduled_time = start
                with self._cv:
                    self._queued -= 1
        by_request: dict[str, list[Sequence]] = {}
        for seq in updated:
            by_request.setdefault(seq.request_id, []).append(seq)
        outputs = []
        for rid, seqs in by_request.items():
            tracked = self._requests.get(rid)
            if tracked is None or self._holds(tracked, seqs):
                continue
            out = self._output(engine, tracked, seqs, now)
            outputs.append((tracked.stream, out))
            if out.finished:
                del self._requests[rid]
                self._release(engine, tracked)
        put_all(outputs, HANDOFF_WAIT_S if engine.runs_on_host else 0.0)
        return True

    def _holds(self, tracked: _Tracked, seqs: list[Sequence]) -> bool:
        """Whether a request's new tokens wait for more (`stream_interval`): every SSE event
        costs the event loop the same whatever it carries, so fewer, fuller events leave more
        of the machine to the engine. Nothing waits that is a choice's first token or last."""
        if self.stream_interval == 1:
            return False
        for seq in seqs:
            sent = tracked.sent_tokens[seq.index]
            if seq.is_finished or sent == 0:
                return False
            if seq.num_output_tokens - sent >= self.stream_interval:
                return False
        return True

    def _output(
        self, engine: Engine, tracked: _Tracked, seqs: list[Sequence], now: float
    ) -> RequestOutput:
        deltas = []
        for seq in seqs:
            i = seq.index
            text = engine.text(seq)
            end = max(
                stable_text_end(text, seq.params.stop, seq.is_finished), tracked.sent_chars[i]
            )
            first = tracked.sent_tokens[i]
            deltas.append(
                ChoiceDelta(
                    index=i,
                    text=text[tracked.sent_chars[i] : end],
                    token_ids=tuple(seq.output_token_ids[first:]),
                    logprobs=tuple(seq.output_logprobs[first:]),
                    top_logprobs=tuple(seq.output_top_logprobs[first:]),
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
            tracked.sent_chars[i], tracked.sent_tokens[i] = end, seq.num_output_tokens
        head = tracked.seqs[0]
        return RequestOutput(
            request_id=head.request_id,
            prompt_token_ids=head.prompt_token_ids,
            choices=tuple(deltas),
            finished=all(s.is_finished for s in tracked.seqs),
            num_cached_tokens=head.num_cached_prompt_tokens or 0,
            time=now,
            scheduled_time=tracked.scheduled_time,
            arrival_time=head.arrival_time,
        )

    def _release(self, engine: Engine, tracked: _Tracked) -> None:
        for seq in tracked.seqs:
            engine.release(seq)
        self._finished(queued=tracked.scheduled_time is None)

    def _finished(self, queued: bool) -> None:
        with self._cv:
            self._in_flight -= 1
            self._queued -= queued

    def _fail_pending(self, error: EngineUnavailableError) -> None:
        """The loop has ended (stopped, crashed, or never loaded): fail the requests still
        tracked (none after a clean stop) and answer commands that arrived too late."""
        for tracked in self._requests.values():
            tracked.stream._put(error)
            if self._model is not None:
                self._release(self._model, tracked)
        self._requests.clear()
        with self._cv:
            inbox, self._inbox = self._inbox, []
        for cmd in inbox:
            if isinstance(cmd, _Add):
                self._finished(queued=True)
                cmd.stream._call(settle_future, cmd.accepted, error)

    def _publish_stats(self, engine: Engine) -> None:
        self.stats = engine.stats()
