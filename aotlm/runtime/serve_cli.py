"""`aotlm serve`: the click command; aotlm/cli.py registers it with `main.add_command(serve)`.

Kept apart from cli.py so that the server's imports (FastAPI, uvicorn) load only when serving.
"""

from __future__ import annotations

from pathlib import Path

import click

from aotlm.errors import AotlmError
from aotlm.runtime.source import bundle_source_options, resolve_source
from aotlm.runtime.trust import TrustPolicy


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 for every interface).",
)
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port to listen on.")
@click.option(
    "--api-key",
    default=None,
    help="Require 'Authorization: Bearer KEY' on the API; /health, /ready and /metrics stay open.",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Treat any compile after the bundle is loaded as fatal (the engine stops).",
)
@click.option(
    "--max-queued-requests",
    default=256,
    show_default=True,
    type=click.IntRange(min=0),
    help="Requests that may wait for their first engine step; beyond it the server answers 503.",
)
@click.option(
    "--drain-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="On SIGTERM, seconds to let in-flight requests finish before aborting them.",
)
@click.option(
    "--served-model-name",
    default=None,
    help="The model name clients send (default: the bundle's name, from model.yaml).",
)
@click.option(
    "--decode-steps",
    default=None,
    type=click.IntRange(min=1),
    help="Most decode steps per device call when every running request is decoding and none "
    "waits (default: the bundle's, model.yaml decode_steps). 1: a token per call, the smoothest "
    "streaming; more: fewer host round trips, tokens streamed in bursts.",
)
@click.option(
    "--stream-interval",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Stream a choice's tokens in events of at least N (its first token and its last at "
    "once): fewer, fuller SSE events cost the server less per token; 1: every step's tokens.",
)
@click.option(
    "--record-trace",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append each served request to this JSONL traffic trace "
    "(what `aotlm buckets plan --trace` and model.yaml's buckets.plan read).",
)
@bundle_source_options
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
    from aotlm.runtime.server import run_server

    try:
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
    except AotlmError as e:
        raise click.ClickException(str(e)) from e


if __name__ == "__main__":  # `python -m aotlm.runtime.serve_cli BUNDLE` until cli.py registers it
    serve()
