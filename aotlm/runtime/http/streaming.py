"""One HTTP request's engine requests, streamed: merged outputs, usage, SSE, disconnects.

A `Job` holds the engine requests of one HTTP request (one per prompt, `n` choices each) and
yields their choice deltas as they come; leaving early aborts whatever is unfinished, which frees
its KV pages at the next engine iteration. `events` turns them into OpenAI's SSE chunks (an
engine failure mid-stream becomes an in-band error event), `collect` into whole answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from aotlm.runtime.generation.streams import ChoiceDelta, RequestOutput, RequestStream
from aotlm.runtime.http.api_errors import as_api_error
from aotlm.runtime.http.metrics import ServerMetrics
from aotlm.runtime.http.protocol import SamplingRequest, usage
from aotlm.runtime.http.traffic_recorder import TraceRecorder


class Job:
    """The engine requests of one HTTP request (one per prompt, `n` choices each)."""

    def __init__(
        self,
        streams: list[RequestStream],
        prompts: list[list[int]],
        n: int,
        metrics: ServerMetrics,
        arrival: float,
        trace: TraceRecorder | None = None,
    ) -> None:
        self.streams, self.n = streams, n
        self.timers = [metrics.timer(arrival) for _ in streams]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.prompt_lens = [len(p) for p in prompts]
        self.arrival, self.trace = arrival, trace
        self.output_tokens = [[0] * n for _ in streams]  # per prompt, per choice
        self.cached = [0] * len(streams)
        self.finished = [0] * len(streams)
        self.completion_tokens = 0

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, sum(self.cached))

    async def outputs(self) -> AsyncIterator[tuple[int, ChoiceDelta]]:
        """(choice index across prompts, delta); leaving early aborts what is unfinished."""
        try:
            async for i, out in merge(self.streams):
                self.timers[i].on_output(out)
                self.cached[i] = out.num_cached_tokens
                for c in out.choices:
                    self.completion_tokens += len(c.token_ids)
                    self.output_tokens[i][c.index] += len(c.token_ids)
                    self.finished[i] += c.finish_reason is not None
                    yield i * self.n + c.index, c
        finally:
            for stream, timer, done in zip(self.streams, self.timers, self.finished, strict=True):
                if not stream.done:  # neither finished nor failed: the client went away
                    stream.abort()
                    timer.on_abort(self.n - done)
            if self.trace is not None:  # what ran, aborted choices included
                for prompt_len, outputs in zip(self.prompt_lens, self.output_tokens, strict=True):
                    self.trace.record(prompt_len, outputs, self.arrival)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come (one stream needs no tasks)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get())[1] is not None:
                if isinstance(item[1], Exception):
                    raise item[1]
                yield item  # type: ignore[misc]
    finally:
        for t in tasks:
            t.cancel()


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        task.cancel()  # no-op when done
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody is listening
    return task.result()


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def events(
    req: SamplingRequest,
    job: Job,
    head: dict[str, Any],
    shape: Callable[[int, ChoiceDelta, bool], dict[str, Any] | None],
    chat: bool,
    want_logprobs: bool,
) -> AsyncIterator[dict[str, Any]]:
    """SSE chunks: (chat: a role chunk per choice), one chunk per choice delta that says
    something (tools may hold a delta back while a call may be starting), then the usage chunk when asked; an engine failure becomes an error event."""
    extra = {"usage": None} if req.include_usage else {}
    for i in range(job.n if chat else 0):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**head, "choices": [role], **extra}
    try:
        async for i, d in job.outputs():
            says = d.text or d.finish_reason or (want_logprobs and d.token_ids)
            if says and (choice := shape(i, d, True)) is not None:  # None: held back for now
                yield {**head, "choices": [choice], **extra}
        if req.include_usage:
            yield {**head, "choices": [], "usage": job.usage()}
    except Exception as e:  # the engine failed mid-stream: say so in-band
        yield as_api_error(e).body


async def collect(job: Job) -> dict[int, list[ChoiceDelta]]:
    choices: dict[int, list[ChoiceDelta]] = {}
    async for i, d in job.outputs():
        choices.setdefault(i, []).append(d)
    return choices
