"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

The routes and the server's lifecycle. Requests are validated and tokenized on the event loop,
run by the engine thread, and answered as JSON or as SSE chunks (streaming.py). Every error
leaves in OpenAI's shape (api_errors.py), validation errors included (400, not 422); the API key
and the body limit are ASGI guards in front (middleware.py). A client that goes away aborts its
engine requests, which frees their KV pages at the next engine iteration.

Why ~450 lines: the routes share one request-to-engine path (validate, tokenize, constrain,
admit, stream, abort on disconnect); what stands alone is already out (protocol, streaming,
errors, middleware, chat templates, structured output, tools, metrics).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from aotlm.bundle import ENCODER, read_manifest
from aotlm.errors import AotlmError
from aotlm.grammar.spec import GrammarSpec
from aotlm.runtime.embedding.async_embedder import AsyncEmbedder
from aotlm.runtime.embedding.embedder import InputTooLongError
from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.generation.engine import Engine, decode_steps_for
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import QueueFullError
from aotlm.runtime.generation.streams import ChoiceDelta, RequestStream
from aotlm.runtime.http.api_errors import APIError, as_api_error, validation_message
from aotlm.runtime.http.chat import chat_prompt_ids
from aotlm.runtime.http.embedding_protocol import EmbeddingRequest, embedding_response
from aotlm.runtime.http.metrics import ServerMetrics
from aotlm.runtime.http.middleware import MAX_REQUEST_BYTES, ApiKeyMiddleware, BodyLimitMiddleware
from aotlm.runtime.http.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ParamError,
    SamplingRequest,
    TokenizeRequest,
    chat_choice,
    completion_choice,
)
from aotlm.runtime.http.streaming import Job, collect, events, sse, unless_disconnected
from aotlm.runtime.http.tools import ToolOutput, ToolPlan, plan_tools
from aotlm.runtime.http.traffic_recorder import TraceRecorder
from aotlm.runtime.load.tokenizer import BundleTokenizer
from aotlm.runtime.load.trust import TrustPolicy
from aotlm.runtime.worker import EngineUnavailableError

log = logging.getLogger(__name__)


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
        self,
        req: SamplingRequest,
        prompt_len: int,
        limit: int,
        default: int,
        prompt_param: str,
        grammar: GrammarSpec | None = None,
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
        return req.sampling_params(asked if asked is not None else min(default, room), grammar)

    async def grammar(
        self, engine: Engine, req: SamplingRequest, plan: ToolPlan | None = None
    ) -> GrammarSpec | None:
        """The request's output constraint, compiled here (off the event loop, before the
        engine thread sees it) so a bad schema is a 400 naming its field."""
        spec = req.grammar()
        if plan is not None and plan.grammar is not None:
            if spec is not None:
                raise ParamError(
                    "tool_choice",
                    f"tool_choice {plan.mode!r} makes the output a tool call; it cannot also "
                    f"follow {spec.param}",
                )
            spec = plan.grammar
        if spec is not None:
            await asyncio.to_thread(engine.check_grammar, spec)
        return spec

    async def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> Job:
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
        return Job(streams, prompts, params[0].n, self.metrics, arrival, self.trace)

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        engine = self.ready_engine(req.model, "/v1/completions")
        tok = engine.tokenizer
        prompts = [tok.encode(p) if isinstance(p, str) else list(p) for p in req.prompts()]
        grammar = await self.grammar(engine, req)
        params = [
            self.params(req, len(p), engine.max_seq_len, 16, "prompt", grammar) for p in prompts
        ]
        return await self.respond(req, raw, await self.submit(prompts, params), tok, chat=False)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        engine = self.ready_engine(req.model, "/v1/chat/completions")
        tok = engine.tokenizer
        msgs = req.message_dicts()
        parallel = req.parallel_tool_calls is not False
        plan = plan_tools(req.tools, req.tool_choice, tok.chat_template, parallel)
        ids = chat_prompt_ids(
            tok,
            msgs,
            add_generation_prompt=req.add_generation_prompt,
            tools=plan.tools if plan else None,
        )
        grammar = await self.grammar(engine, req, plan)
        limit = engine.max_seq_len
        params = self.params(req, len(ids), limit, limit, "messages", grammar)
        job = await self.submit([ids], [params])
        return await self.respond(req, raw, job, tok, chat=True, tools=plan)

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
        self,
        req: SamplingRequest,
        raw: Request,
        job: Job,
        tok: BundleTokenizer,
        chat: bool,
        tools: ToolPlan | None = None,
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
        readers: dict[int, ToolOutput | None] = {}  # per choice, when tools read the output

        def shape(i: int, d: ChoiceDelta, stream: bool) -> dict[str, Any] | None:
            if chat:
                if i not in readers:
                    readers[i] = tools.output() if tools else None
                reader = readers[i]
                if reader is None:
                    return chat_choice(i, d, tok.token_text, want_logprobs, stream)
                fields = reader.read(d.text, final=d.finish_reason is not None)
                said = any(fields.values()) or d.finish_reason or (want_logprobs and d.token_ids)
                if stream and not said:
                    return None  # held back: it may be the start of a call
                called = bool(reader.calls)
                return chat_choice(i, d, tok.token_text, want_logprobs, stream, fields, called)
            choice, offsets[i] = completion_choice(
                i, d, tok.token_text, want_logprobs, offsets.get(i, 0)
            )
            return choice

        if req.stream:
            head["object"] += ".chunk" if chat else ""
            return sse(events(req, job, head, shape, chat, want_logprobs))
        choices = await unless_disconnected(raw, collect(job))
        if isinstance(choices, Response):
            return choices
        out = [shape(i, ChoiceDelta.join(ds), stream=False) for i, ds in sorted(choices.items())]
        return JSONResponse({**head, "choices": out, "usage": job.usage()})


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
    app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes)
    if api_key:  # added last, so it runs first: no body is read for a wrong key
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.state.api = api

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = validation_message(e)
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
            plan = plan_tools(req.tools, "none", tok.chat_template)
            ids = chat_prompt_ids(
                tok,
                msgs,
                add_generation_prompt=req.add_generation_prompt,
                tools=plan.tools if plan else None,
            )
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
    stream_interval: int = 1,
) -> None:
    """Load `bundle` in the background and serve it until SIGTERM / SIGINT.

    `decode_steps`: the engine's most decode steps per device call (None: the bundle's).
    `stream_interval`: a streamed choice's tokens go out in events of at least this many (its
    first token and its last at once).

    `record_trace` appends one line per served sequence to that JSONL file (see trace_recorder).

    `/ready` answers 503 until the bundle is loaded and sealed. On SIGTERM uvicorn stops
    accepting connections and lets in-flight requests finish for up to `drain_timeout` seconds,
    then cancels them (aborting their engine requests); the process then exits 0.
    """
    # The manifest's name (model.yaml `name`, default its stem) unless overridden; reading the
    # manifest also refuses a damaged bundle before the engine thread starts.
    manifest = read_manifest(Path(bundle))[0]
    name = model_name or manifest.name
    trace = TraceRecorder(record_trace) if record_trace is not None else None
    # An encoder bundle is served by the embedder (POST /v1/embeddings) instead of the engine.
    engine: AsyncEngine | AsyncEmbedder
    if manifest.kind == ENCODER:
        engine = AsyncEmbedder.from_bundle(bundle, strict=strict, trust=trust)
    else:
        decode_steps_for(bundle, manifest.serving, decode_steps)  # refused before loading
        engine = AsyncEngine.from_bundle(
            bundle,
            stream_interval=stream_interval,
            strict=strict,
            trust=trust,
            decode_steps=decode_steps,
        )
    app = create_app(
        engine, model_name=name, api_key=api_key, max_queued=max_queued_requests, trace=trace
    )
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info"
    )
    server = uvicorn.Server(config)

    def after_load() -> None:
        if not engine.wait_loaded():
            server.should_exit = True
            return
        # What loading allocated (weights' host copies, executables, tokenizer) lives as long as
        # the process: frozen out of the collector's view, a collection while serving walks only
        # what requests allocate (it had taken ~5% of the engine thread's time).
        gc.collect()
        gc.freeze()

    threading.Thread(target=after_load, daemon=True).start()
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
