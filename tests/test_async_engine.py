"""AsyncEngine over a fake engine: the real scheduler and block manager, no jax.

The fake "model" emits the UTF-8 bytes of a fixed reply, one byte per token, so multi-byte
characters arrive split across tokens exactly as with a byte-level BPE.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from types import SimpleNamespace

import pytest

from aotlm.errors import BundleError, NoBucketError, RequestError
from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import QueueFullError, Scheduler
from aotlm.runtime.generation.sequence import Sample, make_sequences
from aotlm.runtime.generation.streams import RequestStream, put_all, stable_text_end
from aotlm.runtime.worker import EngineUnavailableError, RequestFailedError

REPLY = "héllo wörld € END and more text after the stop ".encode()


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", "replace")

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])


class FakeEngine:
    runs_on_host = True  # steps hand their outputs over and wait for the loop, as on XLA:CPU

    def __init__(self, max_waiting: int | None = None) -> None:
        self.tokenizer = ByteTokenizer()
        self.max_seq_len = 128
        self.block_manager = BlockManager(num_pages=33, page_size=4)
        self.scheduler = Scheduler(
            self.block_manager,
            max_tokens_per_step=16,
            max_seqs_per_step=4,
            max_seq_len=128,
            max_waiting=max_waiting,
        )
        self.runner = SimpleNamespace(real_tokens=0, padded_tokens=0)
        self.counter = SimpleNamespace(sealed=True, close=lambda: None)
        self.compiles_after_ready = 0
        self.grammar_masks, self.grammar_mask_seconds = 0, 0.0
        self.fail: Exception | None = None
        self.step_delay = 0.0
        self._ids = itertools.count()
        self._texts: dict[int, str] = {}

    def add_request(self, prompt, params):
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        seqs = make_sequences(f"r{next(self._ids)}", ids, params, first_seq_id=next(self._ids) * 64)
        self.scheduler.add(*seqs)
        return seqs

    def step(self):
        time.sleep(self.step_delay)
        if self.fail is not None:
            raise self.fail
        out = self.scheduler.schedule()
        sampled = {
            c.seq.seq_id: Sample(REPLY[c.seq.num_output_tokens % len(REPLY)], -0.5)
            for c in out.chunks
            if c.samples
        }
        updated = self.scheduler.postprocess(out, sampled)
        for seq in updated:
            text = self.tokenizer.decode(seq.output_token_ids)
            for stop in seq.params.stop:
                if (at := text.find(stop)) >= 0:
                    text = text[:at]
                    self.scheduler.finish(seq, "stop", stop_reason=stop)
            self._texts[seq.seq_id] = text
        return updated

    def text(self, seq):
        return self._texts.get(seq.seq_id, "")

    def release(self, seq):
        self._texts.pop(seq.seq_id, None)

    # The rest of Engine's interface, as Engine has it (the async engine uses nothing else).
    has_unfinished = Engine.has_unfinished
    abort = Engine.abort
    stats = Engine.stats


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


async def _collect(engine: AsyncEngine, prompt, params):
    outs = [out async for out in engine.generate(prompt, params)]
    return outs


@pytest.fixture
def fake():
    return FakeEngine()


@pytest.fixture
def engine(fake):
    ae = AsyncEngine(lambda: fake)
    assert ae.wait_loaded(5)
    yield ae
    ae.shutdown()


def _wait_idle(fake: FakeEngine, ae: AsyncEngine) -> None:
    deadline = time.monotonic() + 5
    while fake.block_manager.num_used_pages or ae.num_in_flight or ae.stats.running:
        assert time.monotonic() < deadline, "pages or requests were not released"
        time.sleep(0.01)


def test_stable_text_end_holds_back_stop_prefixes_and_incomplete_chars():
    assert stable_text_end("hello wor", ("world",), finished=False) == 6
    assert stable_text_end("hello wor", ("world",), finished=True) == 9
    assert stable_text_end("ab\ufffd", (), finished=False) == 2
    assert stable_text_end("a\ufffdb", (), finished=False) == 3
    assert stable_text_end("abc", ("xyz", "c!"), finished=False) == 2
    assert stable_text_end("abc", ("abcd",), finished=False) == 0


def test_streamed_deltas_never_show_a_stop_prefix_or_a_broken_char(engine, fake):
    params = SamplingParams(max_tokens=60, stop=("END",))
    outs = _run(_collect(engine, "hi", params))
    texts = [c.text for o in outs for c in o.choices]
    final = "héllo wörld € "
    assert "".join(texts) == final
    sent = ""
    for t in texts:  # every moment's text is final: a prefix of the answer, no U+FFFD
        sent += t
        assert final.startswith(sent) and "\ufffd" not in sent
    assert sum(1 for t in texts if t) > 5  # streamed, not all at the end
    last = outs[-1].choices[-1]
    assert (last.finish_reason, last.stop_reason) == ("stop", "END")
    tokens = [t for o in outs for c in o.choices for t in c.token_ids]
    assert bytes(tokens).decode().startswith(final + "END")
    _wait_idle(fake, engine)


def test_n_choices_each_finish(engine, fake):
    outs = _run(_collect(engine, "hi", SamplingParams(n=3, max_tokens=5)))
    assert outs[-1].finished
    finished = {c.index: c.finish_reason for o in outs for c in o.choices if c.finish_reason}
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert all(len(c.logprobs) == len(c.token_ids) for o in outs for c in o.choices)


@pytest.mark.parametrize("n", [1, 2])
def test_stream_interval_sends_fuller_events_losing_nothing(fake, n):
    """interval 4, one token per step: the first token at once, then events of 4, and the
    last (short) one at once; the same tokens and text as interval 1, for every choice."""
    params = SamplingParams(n=n, max_tokens=10)
    streams = {}
    for interval in (1, 4):
        ae = AsyncEngine(lambda: fake, stream_interval=interval)
        assert ae.wait_loaded(5)
        try:
            streams[interval] = _run(_collect(ae, "hi", params))
        finally:
            ae.shutdown()
    for index in range(n):
        sizes = {
            k: [len(c.token_ids) for o in outs for c in o.choices if c.index == index]
            for k, outs in streams.items()
        }
        assert sizes == {1: [1] * 10, 4: [1, 4, 4, 1]}
        texts = {
            k: "".join(c.text for o in outs for c in o.choices if c.index == index)
            for k, outs in streams.items()
        }
        assert texts[1] == texts[4] != ""
    with pytest.raises(ValueError, match="stream_interval"):
        AsyncEngine(lambda: fake, stream_interval=0)


def test_leaving_the_stream_aborts_and_frees_pages(engine, fake):
    fake.step_delay = 0.005

    async def read_two():
        stream = await engine.add_request("hi", SamplingParams(max_tokens=100))
        for _ in range(2):
            await stream.__anext__()
        assert fake.block_manager.num_used_pages > 0
        stream.abort()

    _run(read_two())
    _wait_idle(fake, engine)
    assert not fake.scheduler.has_unfinished


def test_cancelled_consumer_aborts(engine, fake):
    fake.step_delay = 0.005

    async def cancel_midway():
        task = asyncio.create_task(_collect(engine, "hi", SamplingParams(max_tokens=100)))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(cancel_midway())
    _wait_idle(fake, engine)


def test_rejections_raise_before_streaming():
    ae = AsyncEngine(lambda: FakeEngine(max_waiting=1))
    try:
        with pytest.raises(QueueFullError):
            _run(ae.add_request("hi", SamplingParams(n=2)))
        with pytest.raises(RequestError, match="empty"):
            _run(ae.add_request([], SamplingParams()))
        assert ae.num_in_flight == 0 and ae.num_queued == 0
    finally:
        ae.shutdown()


def test_a_request_error_in_a_step_fails_requests_but_the_engine_goes_on(engine, fake):
    fake.fail = NoBucketError("no bucket")
    with pytest.raises(RequestFailedError, match="no bucket"):
        _run(_collect(engine, "hi", SamplingParams(max_tokens=5)))
    fake.fail = None
    assert engine.is_alive
    assert _run(_collect(engine, "hi", SamplingParams(max_tokens=3)))[-1].finished
    _wait_idle(fake, engine)


def test_an_unknown_step_error_kills_the_engine(engine, fake):
    fake.fail = RuntimeError("device lost")
    with pytest.raises(RequestFailedError, match="device lost"):
        _run(_collect(engine, "hi", SamplingParams(max_tokens=5)))
    assert not engine.is_alive and not engine.is_ready
    with pytest.raises(EngineUnavailableError, match="device lost"):
        _run(engine.add_request("hi", SamplingParams()))


def test_load_failure_is_reported():
    def load():
        raise BundleError("bundle/manifest.msgpack: corrupt")

    ae = AsyncEngine(load)
    assert not ae.wait_loaded(5)
    assert not ae.is_alive and "corrupt" in ae.unavailable_reason()
    with pytest.raises(EngineUnavailableError):
        _run(ae.add_request("hi", SamplingParams()))


@pytest.mark.parametrize(("drain", "reason"), [(10.0, "length"), (0.0, "abort")])
def test_shutdown_drains_then_aborts(fake, drain, reason):
    fake.step_delay = 0.01
    ae = AsyncEngine(lambda: fake)

    async def run():
        stream = await ae.add_request("hi", SamplingParams(max_tokens=20))
        stopper = threading.Thread(target=ae.shutdown, args=(drain,))
        stopper.start()
        outs = [o async for o in stream]
        await asyncio.to_thread(stopper.join)
        return outs

    outs = _run(run())
    assert outs[-1].finished and outs[-1].choices[-1].finish_reason == reason
    assert not ae.is_ready
    assert fake.block_manager.num_used_pages == 0


def test_a_slow_reader_gets_the_backlog_merged_losing_nothing(engine, fake):
    """Outputs queued while the reader was busy arrive as one merged output: the same tokens,
    text and logprobs as reading every step, in fewer events."""
    params = SamplingParams(n=2, max_tokens=40)

    async def slow():
        outs = []
        async for out in engine.generate("hi", params):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine keeps stepping meanwhile
        return outs

    fast, slowly = _run(_collect(engine, "hi", params)), _run(slow())

    def per_choice(outs):
        return {
            i: (
                [t for o in outs for c in o.choices if c.index == i for t in c.token_ids],
                "".join(c.text for o in outs for c in o.choices if c.index == i),
                [c.finish_reason for o in outs for c in o.choices if c.index == i][-1],
            )
            for i in range(2)
        }

    assert per_choice(slowly) == per_choice(fast)
    assert all(len(v[0]) == 40 for v in per_choice(slowly).values())
    assert len(slowly) < len(fast) and slowly[-1].finished
    _wait_idle(fake, engine)


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return loop, thread


def test_handoff_returns_once_the_readers_took_the_outputs():
    """With a wait, a step's outputs are in the readers' hands when put_all returns (on the CPU
    backend the next step then does not share the cores with their SSE writes)."""
    loop, thread = _loop_thread()
    stream = RequestStream(lambda s: None, loop)
    got: list[str] = []

    async def reader() -> None:
        got.append(await stream._queue.get())

    for _ in range(20):
        got.clear()
        task = asyncio.run_coroutine_threadsafe(reader(), loop)
        time.sleep(0.01)  # the reader is waiting on the queue
        put_all([(stream, "out")], wait=5.0)
        assert got == ["out"]
        task.result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def test_handoff_wait_is_bounded_by_a_busy_or_closed_loop():
    loop, thread = _loop_thread()
    stream = RequestStream(lambda s: None, loop)
    loop.call_soon_threadsafe(time.sleep, 0.5)  # the loop is stuck in a callback
    start = time.monotonic()
    put_all([(stream, "out")], wait=0.05)
    assert time.monotonic() - start < 0.4
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()
    start = time.monotonic()
    put_all([(stream, "out")], wait=5.0)  # nobody listens any more: no wait at all
    assert time.monotonic() - start < 1.0
