"""The synchronous `Engine` on one background thread, streamed to asyncio callers.

Every jax call (loading, compiling, each step) must happen on one thread, and a step must never
block the event loop, so the engine lives on a dedicated thread (the lifecycle is
`BackgroundWorker`'s, aotlm/runtime/worker.py) that loops: drain the inbox of
add/abort commands, step while there is work, sleep on a condition when idle. Outputs cross back
with `loop.call_soon_threadsafe` into one `asyncio.Queue` per request, so any number of event
loops (one per server thread in tests) can share one engine.

Streamed text never shows what a later token could take back: a trailing U+FFFD (an incomplete
UTF-8 character of a byte-level tokenizer) and any tail that could still grow into a stop string
are held back until the next token decides them or the choice finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

from aotlm.errors import AotlmError, CompileAfterReadyError
from aotlm.runtime.generation.engine import Engine, StepFailedError
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.sequence import Sequence, SequenceStatus
from aotlm.runtime.worker import (
    BackgroundWorker,
    EngineStats,
    EngineUnavailableError,
    RequestFailedError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoiceDelta:
    """What one choice gained since its previous delta (`text` may lag `token_ids`)."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...]
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @classmethod
    def join(cls, deltas: Seq[ChoiceDelta]) -> ChoiceDelta:
        """One delta holding a choice's consecutive `deltas` (a whole, non-streamed answer)."""
        last = deltas[-1]
        return cls(
            index=last.index,
            text="".join(d.text for d in deltas),
            token_ids=tuple(t for d in deltas for t in d.token_ids),
            logprobs=tuple(v for d in deltas for v in d.logprobs),
            top_logprobs=tuple(t for d in deltas for t in d.top_logprobs),
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
        )


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for a request: deltas of the choices that changed. Times are monotonic."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    choices: tuple[ChoiceDelta, ...]
    finished: bool  # every choice has finished
    num_cached_tokens: int
    time: float
    scheduled_time: float | None  # start of the first step that ran this request
    arrival_time: float

    @classmethod
    def merge(cls, first: RequestOutput, then: RequestOutput) -> RequestOutput:
        """One output holding two consecutive outputs of the same request."""
        by_index: dict[int, list[ChoiceDelta]] = {}
        for c in (*first.choices, *then.choices):
            by_index.setdefault(c.index, []).append(c)
        return dataclasses.replace(
            then, choices=tuple(ChoiceDelta.join(ds) for _, ds in sorted(by_index.items()))
        )


def stable_text_end(text: str, stops: Seq[str], finished: bool) -> int:
    """How much of a choice's text is final: all of it once finished; otherwise not a trailing
    U+FFFD and not the longest tail that is a proper prefix of a stop string."""
    if finished:
        return len(text)
    end = len(text.rstrip("\ufffd"))
    longest = max((len(s) for s in stops), default=0)
    for k in range(min(longest - 1, end), 0, -1):
        tail = text[end - k : end]
        if any(s.startswith(tail) for s in stops):
            return end - k
    return end


class RequestStream:
    """Async iterator over one request's `RequestOutput`s; `abort()` frees its pages."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.request_id = ""  # the engine's id, set on the engine thread when added
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next output; outputs already queued behind it (the reader fell behind the
        engine) come merged into it, so a slow client costs one event, not one per step."""
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not isinstance(item, BaseException) and not item.finished and self._queue.qsize():
            nxt = self._queue.get_nowait()
            if isinstance(nxt, BaseException):
                item = nxt
                break
            item = RequestOutput.merge(item, nxt)
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (a client went away). Idempotent; a no-op once finished."""
        if not self.done:
            self.done = True
            self._engine._submit(_Abort(self))

    def _put(self, item: RequestOutput | BaseException) -> None:
        """Called on the engine thread."""
        self._call(self._queue.put_nowait, item)

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn` on the caller's event loop, from the engine thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self._loop.call_soon_threadsafe(fn, *args)


# How long the engine thread waits, on the CPU backend, for the event loops to write out a
# step's outputs before it starts the next step (a bound: a busy or stuck loop costs at most this).
HANDOFF_WAIT_S = 0.01


def _put_all(outputs: Seq[tuple[RequestStream, RequestOutput]], wait: float = 0.0) -> None:
    """Deliver one step's outputs with one wake-up per event loop, not one per request (each
    wake-up is a write to the loop's self-pipe and a GIL hand-over to the loop thread).

    wait > 0: return once every loop has run the readers it woke (at most `wait` seconds each).
    On the CPU backend XLA splits every op of the next step across the same cores the event loop
    and its SSE writes run on; a reader that takes a core mid-step stalls the op's other half, and
    the step took ~30% longer served than alone (2 cores). Waiting the ~1 ms for the writes to go
    out first was worth 5-10% of served throughput there (single steps; with 32-step decode
    calls, whose matmuls of 16 rows leave a core idle, it is neutral: benchmarks/serve_ab.py,
    9 pairs, B/A 1.001). Devices that are not the host's cores (TPU, GPU) do not wait: the step
    runs while the loop writes."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, out in outputs:
        by_loop.setdefault(stream._loop, []).append((stream._queue, out))
    handed: list[threading.Event] = []
    for loop, items in by_loop.items():
        done = threading.Event() if wait > 0 else None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(_put_items, items, loop, done)
            if done is not None:
                handed.append(done)
    for done in handed:
        done.wait(wait)


def _put_items(items: list, loop: asyncio.AbstractEventLoop, done: threading.Event | None) -> None:
    for queue, out in items:
        queue.put_nowait(out)
    if done is not None:
        loop.call_soon(done.set)  # runs after the readers woken above took their turn


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


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


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
        stream = RequestStream(self, loop)
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
                while not (self._inbox or self._stop or engine.scheduler.has_unfinished):
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                stop = self._stop
            for cmd in inbox:
                self._add(engine, cmd) if isinstance(cmd, _Add) else self._abort(engine, cmd)
            if stop:
                self._abort_all(engine)
                return
            if engine.scheduler.has_unfinished and not self._step(engine):
                return
            self._publish_stats(engine)

    def _add(self, engine: Engine, cmd: _Add) -> None:
        try:
            seqs = engine.add_request(cmd.prompt, cmd.params)
        except Exception as e:  # RequestError, QueueFullError: the caller answers 400 / 503
            self._finished(queued=True)
            cmd.stream._call(_settle, cmd.accepted, e)
            return
        cmd.stream.request_id = seqs[0].request_id
        self._requests[cmd.stream.request_id] = _Tracked(cmd.stream, seqs)
        cmd.stream._call(_settle, cmd.accepted, None)

    def _abort(self, engine: Engine, cmd: _Abort) -> None:
        tracked = self._requests.pop(cmd.stream.request_id, None)
        if tracked is None:
            return  # finished (or rejected) before the abort arrived
        engine.scheduler.abort(tracked.stream.request_id)
        self._release(engine, tracked)

    def _abort_all(self, engine: Engine) -> None:
        now = time.monotonic()
        for rid, tracked in list(self._requests.items()):
            aborted = engine.scheduler.abort(rid)  # the unfinished choices
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
                engine.scheduler.abort(rid)
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
        _put_all(outputs, HANDOFF_WAIT_S if engine.runs_on_host else 0.0)
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
                cmd.stream._call(_settle, cmd.accepted, error)

    def _publish_stats(self, engine: Engine) -> None:
        sched, bm = engine.scheduler, engine.block_manager
        self.stats = EngineStats(
            running=len({s.request_id for s in sched.running}),
            waiting=len({s.request_id for s in sched.waiting}),
            kv_pages_used=bm.num_used_pages,
            kv_pages_total=bm.num_usable_pages,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            real_tokens=engine.runner.real_tokens,
            padded_tokens=engine.runner.padded_tokens,
            compiles_after_ready=engine.compiles_after_ready,
            preemptions=sched.num_preemptions,
        )
