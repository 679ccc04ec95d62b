"""The background-thread lifecycle shared by `AsyncEngine` and `AsyncEmbedder`.

Every jax call (loading, compiling, each device call) must happen on one thread and must never
block an event loop, so each serving object owns one daemon thread: it loads the bundle (/ready
answers 503 until then), then runs the subclass's loop until `shutdown`. This class owns what both
share: the thread, loading, readiness and liveness, why the model is unavailable, and the
drain-then-stop shutdown. A subclass implements `_serve` (its loop, which returns once `_stop` is
set, under `_cv`, which `shutdown` notifies), `_fail_pending` (answer every request that can no
longer run) and `num_in_flight`; it sets its own state before calling `__init__`, which starts
the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aotlm.errors import AotlmError

log = logging.getLogger(__name__)


class EngineUnavailableError(AotlmError):
    """The model is loading, shutting down or dead: the server answers 503."""


class RequestFailedError(AotlmError):
    """A device call raised while this request was in flight: the server answers 500."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the worker thread publishes after every iteration (for /metrics)."""

    running: int = 0
    waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    compiles_after_ready: int = 0
    preemptions: int = 0
    grammar_masks: int = 0  # token masks filled on the host for rows under a grammar
    grammar_mask_seconds: float = 0.0


def settle_future(future: asyncio.Future, result: object) -> None:
    """Resolve `future` with `result` (an exception is raised to the awaiting caller); on the
    caller's loop. A future already done (its caller went away) is left alone."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


M = TypeVar("M")  # the loaded model: an Engine or an Embedder (each has a sealed `counter`)


class BackgroundWorker(Generic[M]):
    noun = "engine"  # in log lines and 503 messages

    def __init__(self, load: Callable[[], M], thread_name: str) -> None:
        self._load = load
        self._cv = threading.Condition()
        self._closing = False
        self._stop = False  # guarded by _cv
        self._exited = False  # the loop has ended: nothing takes requests any more; guarded by _cv
        self._loaded = threading.Event()
        self._model: M | None = None
        self.error: BaseException | None = None  # why the worker died, if it did
        self.stats = EngineStats()
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)
        self._thread.start()

    # ---- state, read from any thread ----------------------------------------------------

    @property
    def engine(self) -> M:
        """The loaded model; callers use only its thread-safe parts (tokenizer, limits)."""
        if self._model is None:
            raise EngineUnavailableError(self.unavailable_reason())
        return self._model

    @property
    def is_ready(self) -> bool:
        """Loaded, sealed, alive and taking requests."""
        model: Any = self._model
        return model is not None and model.counter.sealed and self.is_alive and not self._closing

    @property
    def is_alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        raise NotImplementedError

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading succeeded or failed; true when the model is usable."""
        self._loaded.wait(timeout)
        return self._model is not None and self.is_alive

    def unavailable_reason(self) -> str:
        if self.error is not None:
            return f"the {self.noun} has stopped after an error: {self.error!r}"
        if self._closing or not self._thread.is_alive():
            return "the server is shutting down"
        return "the model is still loading; retry when /ready answers 200"

    def shutdown(self, drain_timeout: float = 0.0) -> None:
        """Refuse new requests, let those in flight finish for up to `drain_timeout` seconds,
        then stop the thread (the subclass answers what is left). Idempotent."""
        if self._closing and not self._thread.is_alive():
            return
        self._closing = True
        deadline = time.monotonic() + drain_timeout
        while self.num_in_flight and self.is_alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=max(drain_timeout, 10.0))
        model: Any = self._model
        if model is not None and not self._thread.is_alive():
            model.counter.close()  # its jax listener would outlive the model

    # ---- the worker thread --------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._model = self._load()
        except BaseException as e:
            log.exception("loading the %s failed", self.noun)
            self.error = e
        self._loaded.set()
        if self._model is not None:
            try:
                self._serve(self._model)
            except BaseException as e:  # a bug here must not leave callers waiting forever
                log.exception("the %s thread crashed", self.noun)
                self.error = e
        with self._cv:
            self._exited = True
        self._fail_pending(EngineUnavailableError(self.unavailable_reason()))

    def _serve(self, model: M) -> None:
        raise NotImplementedError

    def _fail_pending(self, error: EngineUnavailableError) -> None:
        raise NotImplementedError
