"""`aotlm serve`: the OpenAI-compatible server over a bundle (FastAPI and uvicorn load only here)."""

from __future__ import annotations

from pathlib import Path

import click

from aotlm.cli.options import (
    amount,
    bundle_source,
    count,
    errors_to_exit,
    option,
    resolve_source,
    strict_flag,
)
from aotlm.runtime.load.trust import TrustPolicy


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@option("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0 for every interface).")
@option("--port", default=8000, type=int, help="TCP port to listen on.")
@option(
    "--api-key",
    default=None,
    help="Require 'Authorization: Bearer KEY' on the API; /health, /ready and /metrics stay open.",
)
@strict_flag("Treat any compile after the bundle is loaded as fatal (the engine stops).")
@count(
    "--max-queued-requests",
    default=256,
    minimum=0,
    help="Requests that may wait for their first engine step; beyond it the server answers 503.",
)
@amount(
    "--drain-timeout",
    default=30.0,
    help="On SIGTERM, seconds to let in-flight requests finish before aborting them.",
)
@option(
    "--served-model-name",
    default=None,
    help="The model name clients send (default: the bundle's name, from model.yaml).",
)
@count(
    "--decode-steps",
    default=None,
    help="Most decode steps per device call when every running request is decoding and none "
    "waits (default: the bundle's, model.yaml decode_steps). 1: a token per call, the smoothest "
    "streaming; more: fewer host round trips, tokens streamed in bursts.",
)
@count(
    "--stream-interval",
    default=1,
    help="Stream a choice's tokens in events of at least N (its first token and its last at "
    "once): fewer, fuller SSE events cost the server less per token; 1: every step's tokens.",
)
@option(
    "--record-trace",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append each served request to this JSONL traffic trace "
    "(what `aotlm buckets plan --trace` and model.yaml's buckets.plan read).",
)
@bundle_source
@errors_to_exit
def serve(
    bundle_dir: str,
    host: str,
    port: int,
    api_key: str | None,
    strict: bool,
    max_queued_requests: int,
    drain_timeout: float,
    served_model_name: str | None,
    decode_steps: int | None,
    stream_interval: int,
    record_trace: Path | None,
    trust: TrustPolicy,
    require_signed: bool,
) -> None:
    """Serve BUNDLE (a directory or oci:// / file:// reference) with an OpenAI-compatible API.

    /ready answers 503 until the bundle is loaded and sealed; SIGTERM drains, then exits 0.
    """
    from aotlm.runtime.http.server import run_server

    run_server(
        resolve_source(bundle_dir, trust, require_signed),
        host=host,
        port=port,
        api_key=api_key,
        strict=strict,
        max_queued_requests=max_queued_requests,
        drain_timeout=drain_timeout,
        model_name=served_model_name,
        trust=trust,
        record_trace=record_trace,
        decode_steps=decode_steps,
        stream_interval=stream_interval,
    )
