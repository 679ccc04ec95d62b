"""What callers of the async engine hold: one stream of outputs per request, and the deltas in it.

Outputs cross from the engine thread into one `asyncio.Queue` per request with
`loop.call_soon_threadsafe`, so any number of event loops (one per server thread in tests) can
share one engine. Streamed text never shows what a later token could take back: a trailing U+FFFD
(an incomplete UTF-8 character of a byte-level tokenizer) and any tail that could still grow into
a stop string are held back until the next token decides them or the choice finishes
(`stable_text_end`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass


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

    def __init__(
        self, on_abort: Callable[[RequestStream], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._on_abort = on_abort  # the engine's: runs on the caller's thread
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
            self._on_abort(self)

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


def put_all(outputs: Seq[tuple[RequestStream, RequestOutput]], wait: float = 0.0) -> None:
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
