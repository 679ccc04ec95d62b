"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

This is the only HTTP-aware module. Requests are validated and tokenized on the event loop, run
by the engine thread, and answered as JSON or as SSE chunks. Every error leaves in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, validation errors included (400, not 422),
so that OpenAI clients raise their usual exceptions. A client that goes away aborts its engine
requests, which frees their KV pages at the next engine iteration.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aotlm.bundle import read_manifest
from aotlm.errors import AotlmError, RequestError
from aotlm.runtime.async_embedder import AsyncEmbedder
from aotlm.runtime.async_engine import (
    AsyncEngine,
    ChoiceDelta,
    EngineUnavailableError,
    RequestFailedError,
    RequestOutput,
    RequestStream,
)
from aotlm.runtime.chat import chat_prompt_ids
from aotlm.runtime.embedder import InputTooLongError
from aotlm.runtime.embedding_protocol import EmbeddingRequest, embedding_response
from aotlm.runtime.engine import Engine
from aotlm.runtime.metrics import ServerMetrics
from aotlm.runtime.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ParamError,
    SamplingRequest,
    TokenizeRequest,
    chat_choice,
    completion_choice,
    usage,
)
from aotlm.runtime.sampling_params import SamplingParams
from aotlm.runtime.scheduler import QueueFullError
from aotlm.runtime.tokenizer import BundleTokenizer
from aotlm.runtime.trace_recorder import TraceRecorder
from aotlm.runtime.trust import TrustPolicy

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # never behind the API key
# Request bodies past this answer 413 before they are parsed: JSON parsing and tokenizing run
# on the event loop, so a huge body would stall every other request.
MAX_REQUEST_BYTES = 16 * 1024 * 1024
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.headers = status, param, code, headers

    @property
    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        kind = "service_unavailable" if self.status == 503 else kind
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}
        }

    def response(self) -> JSONResponse:
        return _AsciiJSONResponse(self.body, status_code=self.status, headers=self.headers)


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message that quotes client input (a model name)
    may hold a lone surrogate from a `\\ud800` escape, which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


def as_api_error(e: BaseException) -> APIError:
    """Map what the engine and the protocol raise to HTTP statuses."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError | EngineUnavailableError):
        return APIError(503, str(e), code="unavailable", headers={"Retry-After": "1"})
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=getattr(e, "param", None))
    if isinstance(e, RequestFailedError):
        return APIError(500, str(e))
    # A bug: the details go to the log, not to the client.
    log.error("unexpected error while answering a request", exc_info=e)
    return APIError(500, f"internal error ({type(e).__name__}); the server log has the details")


class _ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but OPEN_PATHS. Pure ASGI (not
    BaseHTTPMiddleware) so streaming and disconnect detection pass through untouched; it runs
    before body validation, so an unauthenticated client never learns about its body."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = APIError(401, "missing or wrong API key", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimitMiddleware:
    """413 for a request body over `limit` bytes: by its Content-Length before anything is
    read, or as a chunked body streams in past the limit."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is larger than {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and (len(length) > 18 or int(length) > self.limit):
            await APIError(413, message, code="request_too_large").response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            received = await receive()
            if received["type"] == "http.request":
                seen += len(received.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, message)  # FastAPI passes it on while reading
            return received

        await self.app(scope, limited, send)


class _Job:
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
            async for i, out in _merge(self.streams):
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


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
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


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False, separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class _OpenAI:
    """The endpoints' logic, shared state in one place."""

    def __init__(
        self,
        engine: AsyncEngine | AsyncEmbedder,
        model_name: str,
        max_queued: int | None,
        trace: TraceRecorder | None = None,
    ) -> None:
        self.engine, self.model_name, self.max_queued = engine, model_name, max_queued
        self.metrics = ServerMetrics(lambda: engine.stats)
        self.trace = trace
        self._reserved = 0  # prompts of requests being added, not yet in engine.num_queued

    def ready_engine(self, model: str | None, route: str | None = None) -> Engine:
        """The loaded engine (an `Embedder` for an encoder bundle), once the model name is
        right and, given `route`, the model's kind serves that route."""
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                param="model",
                code="model_not_found",
            )
        embeds = isinstance(self.engine, AsyncEmbedder)
        if route is not None and embeds != (route == "/v1/embeddings"):
            what = (
                f"is an embedding model: it serves /v1/embeddings, not {route}"
                if embeds
                else "is not an embedding model: it generates text (/v1/completions, "
                "/v1/chat/completions); /v1/embeddings needs a bundle built from an encoder "
                "checkpoint (e.g. BertModel)"
            )
            raise APIError(
                400, f"the model `{self.model_name}` {what}", param="model", code="wrong_model_kind"
            )
        if not self.engine.is_ready:
            raise EngineUnavailableError(self.engine.unavailable_reason())
        return self.engine.engine

    def params(
        self, req: SamplingRequest, prompt_len: int, limit: int, default: int, prompt_param: str
    ) -> SamplingParams:
        """Check the context length (OpenAI's wording and code) and build SamplingParams."""
        room = limit - prompt_len
        if room < 1:
            raise APIError(
                400,
                f"this model's maximum context length is {limit} tokens, but the "
                f"prompt has {prompt_len} tokens (at most {limit - 1} leave room for "
                "one generated token)",
                param=prompt_param,
                code="context_length_exceeded",
            )
        asked = req.requested_max_tokens
        if asked is not None and asked > room:
            raise APIError(
                400,
                f"max_tokens={asked} plus the prompt's {prompt_len} tokens exceeds "
                f"this model's maximum context length of {limit} tokens; ask for at "
                f"most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return req.sampling_params(asked if asked is not None else min(default, room))

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> _Job:
        """Queue every prompt or none. The queue check counts the prompts of concurrent
        requests that are still being added (`_reserved`), so the limit holds exactly."""
        if self.max_queued is not None:
            if len(prompts) > self.max_queued:
                raise ParamError(
                    "prompt",
                    f"{len(prompts)} prompts in one request; this server queues at most "
                    f"{self.max_queued}: split the batch",
                )
            if self.engine.num_queued + self._reserved + len(prompts) > self.max_queued:
                raise QueueFullError(f"the request queue is full ({self.max_queued}); retry later")
        arrival = time.monotonic()
        streams: list[RequestStream] = []
        pending = len(prompts)
        self._reserved += pending
        try:
            for ids, p in zip(prompts, params, strict=True):
                # add_request counts the prompt in num_queued before its first await
                self._reserved, pending = self._reserved - 1, pending - 1
                streams.append(await self.engine.add_request(ids, p))
        except BaseException:
            self._reserved -= pending
            for s in streams:
                s.abort()
            raise
        return _Job(streams, prompts, params[0].n, self.metrics, arrival, self.trace)

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        engine = self.ready_engine(req.model, "/v1/completions")
        tok = engine.tokenizer
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        params = [self.params(req, len(p), engine.max_seq_len, 16, "prompt") for p in prompts]
        return await self.respond(req, raw, await self.submit(prompts, params), tok, chat=False)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        engine = self.ready_engine(req.model, "/v1/chat/completions")
        tok = engine.tokenizer
        msgs = req.message_dicts()
        ids = chat_prompt_ids(tok, msgs, add_generation_prompt=req.add_generation_prompt)
        params = self.params(req, len(ids), engine.max_seq_len, engine.max_seq_len, "messages")
        return await self.respond(req, raw, await self.submit([ids], [params]), tok, chat=True)

    async def embeddings(self, req: EmbeddingRequest) -> Response:
        """Tokenized and checked here; the embedder thread batches it with concurrent requests."""
        embedder = self.ready_engine(req.model, "/v1/embeddings")
        req.check_dimensions(embedder.dim)
        truncate = embedder.truncation(req.truncate_prompt_tokens)
        items = req.inputs()
        try:
            ids = [
                embedder.token_ids(x, truncate, None if len(items) == 1 else i)
                for i, x in enumerate(items)
            ]
        except InputTooLongError as e:
            raise APIError(400, str(e), param="input", code="context_length_exceeded") from None
        if self.max_queued is not None and self.engine.num_queued >= self.max_queued:
            raise QueueFullError(f"the request queue is full ({self.max_queued}); retry later")
        arrival = time.monotonic()
        vectors = await self.engine.embed(ids)
        tokens = sum(len(x) for x in ids)
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.e2e.observe(time.monotonic() - arrival)
        body = embedding_response(vectors, req.encoding_format, self.model_name, tokens)
        return JSONResponse(body)

    async def respond(
        self, req: SamplingRequest, raw: Request, job: _Job, tok: BundleTokenizer, chat: bool
    ) -> Response:
        """One JSON answer, or SSE chunks; the two share the choice shapes of protocol.py."""
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
        }
        want_logprobs = req.num_top_logprobs is not None
        offsets: dict[int, int] = {}  # completions' logprobs.text_offset, per choice

        def shape(i: int, d: ChoiceDelta, stream: bool) -> dict[str, Any]:
            if chat:
                return chat_choice(i, d, tok.token_text, want_logprobs, stream)
            choice, offsets[i] = completion_choice(
                i, d, tok.token_text, want_logprobs, offsets.get(i, 0)
            )
            return choice

        if req.stream:
            head["object"] += ".chunk" if chat else ""
            return _sse(_events(req, job, head, shape, chat, want_logprobs))
        choices = await _unless_disconnected(raw, _collect(job))
        if isinstance(choices, Response):
            return choices
        out = [shape(i, ChoiceDelta.join(ds), stream=False) for i, ds in sorted(choices.items())]
        return JSONResponse({**head, "choices": out, "usage": job.usage()})


async def _events(
    req: SamplingRequest,
    job: _Job,
    head: dict[str, Any],
    shape: Callable[[int, ChoiceDelta, bool], dict[str, Any]],
    chat: bool,
    want_logprobs: bool,
) -> AsyncIterator[dict[str, Any]]:
    """SSE chunks: (chat: a role chunk per choice), one chunk per choice delta that says
    something, then the usage chunk when asked; an engine failure becomes an error event."""
    extra = {"usage": None} if req.include_usage else {}
    for i in range(job.n if chat else 0):
        role = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        yield {**head, "choices": [role], **extra}
    try:
        async for i, d in job.outputs():
            if d.text or d.finish_reason or (want_logprobs and d.token_ids):
                yield {**head, "choices": [shape(i, d, True)], **extra}
        if req.include_usage:
            yield {**head, "choices": [], "usage": job.usage()}
    except Exception as e:  # the engine failed mid-stream: say so in-band
        yield as_api_error(e).body


async def _collect(job: _Job) -> dict[int, list[ChoiceDelta]]:
    choices: dict[int, list[ChoiceDelta]] = {}
    async for i, d in job.outputs():
        choices.setdefault(i, []).append(d)
    return choices


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's errors as one line per field; a union's alternatives collapse into one."""
    by_field: dict[str, list[str]] = {}
    for err in e.errors():
        if err.get("type") == "json_invalid":  # its loc is a character offset, not a field
            why = (err.get("ctx") or {}).get("error", "cannot parse it")
            return f"the body is not valid JSON: {why}", None
        path = []
        for part in (
            err.get("loc", ())[1:] if err.get("loc", ())[:1] == ("body",) else err.get("loc", ())
        ):
            if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS):
                break  # a union member's tag, not a field
            path.append(str(part))
        msgs = by_field.setdefault(".".join(path) or "body", [])
        if err.get("msg") not in msgs:
            msgs.append(str(err.get("msg")))
    message = "; ".join(f"{f}: {' or '.join(m)}" for f, m in by_field.items())
    return message or "invalid request", next(iter(by_field), None)


def create_app(
    engine: AsyncEngine | AsyncEmbedder,
    *,
    model_name: str,
    api_key: str | None = None,
    max_queued: int | None = None,
    trace: TraceRecorder | None = None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
) -> FastAPI:
    """The HTTP app over `engine`. `max_queued` bounds the requests waiting for their first
    engine step (503 beyond it). Several apps may share one engine; each has its own metrics.
    `trace` records every completion and chat request it serves (`--record-trace`).
    A body over `max_request_bytes` is refused with 413 before it is parsed."""
    api = _OpenAI(engine, model_name, max_queued, trace)
    app = FastAPI(title="aotlm", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimitMiddleware, limit=max_request_bytes)
    if api_key:  # added last, so it runs first: no body is read for a wrong key
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    app.state.api = api

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return APIError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)  # also answers bugs in OpenAI's shape (and logs them)
    @app.exception_handler(AotlmError)
    @app.exception_handler(APIError)
    async def _api(_: Request, e: Exception) -> JSONResponse:
        return as_api_error(e).response()

    @app.get("/health")
    async def health() -> Response:
        if engine.is_alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "dead", "reason": engine.unavailable_reason()}, 503)

    @app.get("/ready")
    async def ready() -> Response:
        if engine.is_ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable", "reason": engine.unavailable_reason()}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(api.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "aotlm"}
        if engine.is_ready:
            card["max_model_len"] = engine.engine.max_seq_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return await api.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return await api.chat(req, raw)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Response:
        return await api.embeddings(req)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        eng = api.ready_engine(req.model)
        tok = eng.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise ParamError("prompt", "give exactly one of prompt and messages")
        if req.messages is not None:
            msgs = [m.model_dump() for m in req.messages]
            ids = chat_prompt_ids(tok, msgs, add_generation_prompt=req.add_generation_prompt)
        else:
            ids = tok.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        strs = [tok.token_text(t) for t in ids] if req.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": eng.max_seq_len,
            "tokens": ids,
            "token_strs": strs,
        }

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        tok = api.ready_engine(req.model).tokenizer
        if any(not 0 <= t < tok.vocab_size for t in req.tokens):
            raise ParamError("tokens", f"token ids must be in [0, {tok.vocab_size})")
        return {"prompt": tok.decode(req.tokens)}

    return app


def run_server(
    bundle: Path | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    strict: bool = False,
    max_queued_requests: int | None = 256,
    drain_timeout: float = 30.0,
    model_name: str | None = None,
    trust: TrustPolicy | None = None,
    record_trace: Path | str | None = None,
    decode_steps: int | None = None,
) -> None:
    """Load `bundle` in the background and serve it until SIGTERM / SIGINT.

    `decode_steps`: the engine's most decode steps per device call (None: the bundle's).

    `record_trace` appends one line per served sequence to that JSONL file (see trace_recorder).

    `/ready` answers 503 until the bundle is loaded and sealed. On SIGTERM uvicorn stops
    accepting connections and lets in-flight requests finish for up to `drain_timeout` seconds,
    then cancels them (aborting their engine requests); the process then exits 0.
    """
    # The manifest's name (model.yaml `name`, default its stem) unless overridden; reading the
    # manifest also refuses a damaged bundle before the engine thread starts.
    manifest = read_manifest(Path(bundle))[0]
    name = model_name or manifest["name"]
    trace = TraceRecorder(record_trace) if record_trace is not None else None
    # An encoder bundle is served by the embedder (POST /v1/embeddings) instead of the engine.
    engine: AsyncEngine | AsyncEmbedder
    if manifest["model"].get("kind") == "encoder":
        engine = AsyncEmbedder.from_bundle(bundle, strict=strict, trust=trust)
    else:
        engine = AsyncEngine.from_bundle(
            bundle, strict=strict, trust=trust, decode_steps=decode_steps
        )
    app = create_app(
        engine, model_name=name, api_key=api_key, max_queued=max_queued_requests, trace=trace
    )
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info"
    )
    server = uvicorn.Server(config)

    def stop_if_load_fails() -> None:
        if not engine.wait_loaded():
            server.should_exit = True

    threading.Thread(target=stop_if_load_fails, daemon=True).start()
    # uvicorn re-raises the signal it drained for; a no-op SIGTERM handler makes that exit 0.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if in_main else None
    try:
        server.run()
    finally:
        engine.shutdown(drain_timeout=0.0)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if engine.error is not None and not engine.wait_loaded(0):
        if isinstance(engine.error, AotlmError):
            raise engine.error
        raise EngineUnavailableError(f"loading {bundle} failed: {engine.error!r}")
