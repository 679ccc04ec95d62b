"""Serving benchmark: `aotlm serve` under load vs Hugging Face `transformers` generation.

    .venv/bin/python benchmarks/serve.py [--requests 128] [--passes 7] [--concurrency 16]
        [--bundle DIR] [--client lean|httpx|openai] [--port P]

Starts `aotlm serve` on 127.0.0.1 (on --bundle, or on a bundle built into a temp dir from the tiny
checkpoint with tokens up to 512 and decode_steps 32, BENCH_YAML below) and drives it with
streaming completions (greedy, `ignore_eos` so every request generates exactly its `max_tokens`)
from `--concurrency` client tasks that each send the next request as soon as the last one
finished (closed loop). The client is benchmarks/sse_client.py, one keep-alive connection per
task, SSE parsed off the socket: client CPU per output token here 0.014 ms, against 0.052 ms for
httpx (`--client httpx`) and 0.117 ms for the official client (`--client openai`,
`max_retries=0`); on a 2-core machine the client's CPU is taken from the server, which served
4982 / 4797 / 4007 tok/s with the three in one run. Prompts are token ids: windows of the
tokenized corpus that ships in aotlm/data/, at distinct seeded offsets, after BOS. Workloads:

  mixed          random prompt lengths (16..320 tokens) and output lengths (16..128 tokens);
                 --passes of them (mixed, mixed#2, ...), each with fresh prompts and lengths
  prefix-cold    a 208-token prefix (13 KV pages of 16; whole pages, fewer where max_seq_len
                 leaves no room) + an 8..32-token suffix, 16 output tokens;
                 every request has its own prefix, so nothing can be reused
  prefix-shared  the same suffixes and lengths, one prefix shared by every request
Every side (server, engine alone, transformers) first runs 2 x --concurrency other mixed requests
untimed. Both prefix workloads send their first request alone, then the rest at --concurrency: the steady
state of a long-lived system prompt, where only the very first request computes it (requests that
arrive together before any of them has computed the prefix cannot share it).

In the same run, interleaved with the served passes: `transformers` `model.generate` on the same
checkpoint runs each mixed pass right after the server did (static batches of --concurrency, left
padding, greedy, max_new_tokens = the batch's largest request; only requested tokens count), in
two worker processes loaded before the server starts, one with 1 torch thread and one with a
thread per core (torch's default), the faster counting per pass; the server idles meanwhile.
Each pass's ratio compares the two sides a few seconds apart, so a slow spell of a shared machine
hits both. After the server stops: aotlm's engine in this process without HTTP, in the same
closed loop on the first mixed pass (splits served time into engine step time, by token bucket,
and server/client overhead). The ratio reported is the median over passes of served /
transformers output tokens per second. Greedy outputs are compared (served vs engine text, engine
vs transformers token ids) so both sides are known to do the same work. Prints a table and writes
benchmarks/results/serve.json.
Throughput is wall-clock, so on a shared machine it moves with the load (recorded before and
after); CPU time per output token (server, client, engine alone, transformers) moves much less
and says where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx
import numpy as np
from openai import AsyncOpenAI
from serve_baselines import Request, engine_offline
from serve_report import make_report, print_report
from sse_client import SSEConnection
from tokenizers import Tokenizer

from aotlm.bundle.reader import read_manifest

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints/tiny-llama"
BENCH_YAML = """\
model: {checkpoint}
dtype: float32
max_seq_len: 512
buckets:
  tokens: [16, 32, 64, 128, 256, 512]
  requests: [1, 2, 4, 8, 16]
  page_size: 16
targets: [cpu]
name: tiny-llama-serve
decode_steps: 32
"""
PREFIX_TOKENS = 208  # 13 full pages of 16: all of it can be shared
PREFIX_OUTPUT = 16


@dataclass
class Result:
    """One streamed request as the client saw it (seconds from just before the request)."""

    ttft: float
    itl: list[float]
    e2e: float
    output_tokens: int
    cached_tokens: int
    text: str


# --- prompts ---------------------------------------------------------------------------------


class PromptSource:
    """Windows of the tokenized corpus, each starting at a fresh seeded offset (no shared pages)."""

    def __init__(self, tokenizer: Path, bos: int, rng: np.random.Generator) -> None:
        text = (ROOT / "aotlm/data/tiny_corpus.txt").read_text(encoding="utf-8")
        self.ids = Tokenizer.from_file(str(tokenizer)).encode(text, add_special_tokens=False).ids
        self.bos = bos
        self.rng = rng
        self.offsets: Iterator[int] = iter(())

    def window(self, n: int) -> list[int]:
        start = next(self.offsets, None)
        if start is None:  # a new round of offsets (only past len(corpus) windows)
            self.offsets = iter(self.rng.permutation(len(self.ids)).tolist())
            start = next(self.offsets)
        return [self.ids[(start + i) % len(self.ids)] for i in range(n)]

    def prompt(self, n: int) -> list[int]:
        return [self.bos, *self.window(n - 1)]


def mixed_requests(src: PromptSource, rng: np.random.Generator, n: int, max_seq: int) -> list:
    max_out = min(128, max_seq // 4)
    max_prompt = min(320, max_seq - max_out - 1)
    prompt_lens = rng.integers(16, max_prompt + 1, n)
    output_lens = rng.integers(16, max_out + 1, n)
    return [
        Request(src.prompt(int(p)), int(o)) for p, o in zip(prompt_lens, output_lens, strict=True)
    ]


def prefix_requests(
    src: PromptSource, rng: np.random.Generator, n: int, max_seq: int, page_size: int
) -> tuple[list, list]:
    """(cold, shared): the same suffixes and lengths, distinct prefixes vs one shared prefix of
    whole pages (PREFIX_TOKENS, or what fits beside the longest suffix and the output)."""
    room = (max_seq - 32 - PREFIX_OUTPUT) // page_size * page_size
    prefix = min(PREFIX_TOKENS, room)
    suffixes = [src.window(int(k)) for k in rng.integers(8, 33, n)]
    shared = src.prompt(prefix)
    cold = [Request(src.prompt(prefix) + s, PREFIX_OUTPUT) for s in suffixes]
    return cold, [Request(shared + s, PREFIX_OUTPUT) for s in suffixes]


# --- the server ------------------------------------------------------------------------------


def build_default_bundle(tmp: Path, checkpoint: Path) -> Path:
    from aotlm.build.bundle import build_bundle
    from aotlm.build.model_yaml import load_build_config

    yaml = tmp / "tiny-llama-serve.yaml"
    yaml.write_text(BENCH_YAML.format(checkpoint=checkpoint.resolve()), encoding="utf-8")
    build_bundle(load_build_config(yaml), tmp / "bundle")
    return tmp / "bundle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(
    bundle: Path,
    port: int,
    log: Path,
    stream_interval: int = 1,
    extra_args: Sequence[str] = (),
    source: Path | None = None,
) -> Iterator[tuple[str, float, int]]:
    """`aotlm serve` in a subprocess; yields (base url, seconds until /ready answered 200, pid).

    extra_args: more `aotlm serve` options; source: run the aotlm package of this source tree
    (e.g. a `git worktree` of a baseline) instead of the installed one."""
    cmd = [sys.executable, "-m", "aotlm", "serve", str(bundle), "--port", str(port)]
    cmd += ["--max-queued-requests", "4096", "--drain-timeout", "5"]
    cmd += ["--stream-interval", str(stream_interval), *extra_args]
    env = None
    if source is not None:
        env = os.environ | {"PYTHONPATH": str(source.resolve())}
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while not _ready(base):
                if proc.poll() is not None or time.perf_counter() - start > 300:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"aotlm serve did not become ready:\n{tail}")
                time.sleep(0.2)
            yield base, time.perf_counter() - start, proc.pid
        finally:
            proc.terminate()  # SIGTERM: the server drains, then exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(base: str) -> dict[str, float]:
    """/metrics as {name: value}, samples of one name summed over their labels."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{", 1)[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


# --- the load generator ----------------------------------------------------------------------


def _body(model: str, req: Request) -> dict:
    return {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def _result(start: float, times: list[float], text: list[str], usage: dict) -> Result:
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    return Result(
        ttft=times[0] - start,
        itl=np.diff(times).tolist(),
        e2e=end - start,
        output_tokens=usage["completion_tokens"],
        cached_tokens=details.get("cached_tokens") or 0,
        text="".join(text),
    )


async def _one_openai(client: AsyncOpenAI, model: str, req: Request) -> Result:
    body = _body(model, req)
    extra = {"ignore_eos": body.pop("ignore_eos")}
    start = time.perf_counter()
    stream = await client.completions.create(**body, extra_body=extra)
    times, text, usage = [], [], None
    async for chunk in stream:
        if chunk.choices:  # one chunk per engine output: 1 token, or a multi-step burst
            times.append(time.perf_counter())
            text.append(chunk.choices[0].text)
        usage = chunk.usage or usage
    return _result(start, times, text, usage.model_dump())


async def _one_httpx(client: httpx.AsyncClient, model: str, req: Request) -> Result:
    """The same request over plain httpx, parsing the SSE lines with json.loads."""
    start = time.perf_counter()
    times, text, usage = [], [], None
    async with client.stream("POST", "/v1/completions", json=_body(model, req)) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    return _result(start, times, text, usage)


async def _one_lean(conn: SSEConnection, model: str, req: Request) -> Result:
    """The same request over sse_client.py: one keep-alive connection per client task."""
    start = time.perf_counter()
    times, text, usage = [], [], None
    async for chunk in conn.stream("/v1/completions", _body(model, req)):
        if chunk["choices"]:
            times.append(time.perf_counter())
            text.append(chunk["choices"][0]["text"])
        usage = chunk.get("usage") or usage
    return _result(start, times, text, usage)


async def _closed_loop(
    base: str,
    model: str,
    requests: Sequence[Request],
    concurrency: int,
    lead: bool = False,
    client_kind: str = "lean",
) -> tuple[list[Result], float]:
    """`concurrency` tasks send the requests in order, each the next one as soon as its last one
    finished. With `lead`, the first request runs alone before the others start."""
    shared: AsyncOpenAI | httpx.AsyncClient | None = None
    if client_kind == "openai":
        shared = AsyncOpenAI(base_url=f"{base}/v1", api_key="bench", max_retries=0, timeout=600)
        one = _one_openai
    elif client_kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        shared = httpx.AsyncClient(base_url=base, timeout=600, limits=limits)
        one = _one_httpx
    else:
        one = _one_lean
    todo = iter(enumerate(requests))
    results: list[Result | None] = [None] * len(requests)

    async def worker(count: int | None = None) -> None:
        client = shared or SSEConnection(base)  # lean: a keep-alive connection per task
        for n, (i, req) in enumerate(todo, 1):  # one event loop: the shared iterator needs no lock
            results[i] = await one(client, model, req)
            if n == count:
                break
        if shared is None:
            await client.close()

    start = time.perf_counter()
    if lead:
        await worker(count=1)
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if isinstance(shared, AsyncOpenAI):
        await shared.close()
    elif shared is not None:
        await shared.aclose()
    return results, wall


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_workload(
    base: str, pid: int, model: str, requests: Sequence[Request], args, lead: bool
) -> dict:
    before, server_cpu, client_cpu = scrape(base), cpu_seconds(pid), time.process_time()
    loop = _closed_loop(base, model, requests, args.concurrency, lead, args.client)
    results, wall = asyncio.run(loop)
    after = scrape(base)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    summary = summarize(requests, results, wall, delta)
    summary["server_cpu_s"] = cpu_seconds(pid) - server_cpu
    summary["client_cpu_s"] = time.process_time() - client_cpu
    return summary


def _pcts(values: Sequence[float]) -> dict[str, float]:
    ms = 1e3 * np.asarray(values)
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {"mean": float(ms.mean())}


def summarize(requests, results: list[Result], wall: float, delta: dict[str, float]) -> dict:
    tokens = sum(r.output_tokens for r in results)
    return {
        "requests": len(results),
        "seconds": wall,
        "req_s": len(results) / wall,
        "output_tok_s": tokens / wall,
        "output_tokens": tokens,
        "exact_lengths": sum(
            r.output_tokens == q.max_tokens for r, q in zip(results, requests, strict=True)
        ),
        "prompt_tokens": sum(len(q.prompt) for q in requests),
        "ttft_ms": _pcts([r.ttft for r in results]),
        # time per output token after the first (vLLM's TPOT): what streaming feels like per
        # token, whether tokens come one per chunk or in multi-step bursts
        "tpot_ms": _pcts(
            [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
        ),
        "itl_ms": _pcts([x for r in results for x in r.itl]),  # gaps between SSE chunks
        "tokens_per_chunk": tokens / max(1, sum(len(r.itl) + 1 for r in results)),
        "e2e_ms": _pcts([r.e2e for r in results]),
        "cached_prompt_tokens": sum(r.cached_tokens for r in results),
        "prefix_cache_hits": delta.get("aotlm:prefix_cache_hits_total", 0.0),
        "prefix_cache_queries": delta.get("aotlm:prefix_cache_queries_total", 0.0),
        "padded_tokens": delta.get("aotlm:padded_tokens_total", 0.0),
        "real_tokens": delta.get("aotlm:real_tokens_total", 0.0),
        "texts": [r.text for r in results],
    }


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--requests",
        type=int,
        default=128,
        help="Requests per mixed pass (a served pass of 64 lasts ~0.7 s here: a short spell of "
        "a shared machine's load moves it by tens of percent).",
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=7,
        help="Mixed-workload passes (fresh prompts each, served and transformers alike); the "
        "reported ratio is the median of the per-pass ratios.",
    )
    ap.add_argument("--prefix-requests", type=int, default=32, help="Requests per prefix workload.")
    ap.add_argument("--concurrency", type=int, default=16, help="Client tasks (and HF batch size).")
    ap.add_argument("--bundle", type=Path, help="Serve this bundle instead of building one.")
    ap.add_argument(
        "--checkpoint", type=Path, default=CHECKPOINT, help="The bundle's HF checkpoint."
    )
    ap.add_argument("--port", type=int, default=0, help="Server port (default: a free one).")
    ap.add_argument(
        "--client",
        choices=("lean", "httpx", "openai"),
        default="lean",
        help="Load generator: benchmarks/sse_client.py (default: the lightest, so the client "
        "takes the least of the cores the server runs on), httpx + json.loads, or the official "
        "openai client.",
    )
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="The server's --stream-interval: tokens per SSE event (first and last at once).",
    )
    ap.add_argument("--seed", type=int, default=0, help="Seed of prompt and output lengths.")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve.json")
    return ap.parse_args()


def serve_workloads(
    args, log: Path, bundle: Path, model: str, workloads: dict, warm: list[Request], hf
) -> dict:
    """Every workload on the server; right after each mixed pass, `hf` (TransformersBaseline) on
    the same prompts while the server idles, so both sides of a pass's ratio see the same load."""
    port = args.port or free_port()
    with served(bundle, port, log, args.stream_interval) as (base, ready_s, pid):
        warm_up = _closed_loop(base, model, warm, args.concurrency, client_kind=args.client)
        asyncio.run(warm_up)  # untimed: first runs of the executables happen here
        note(f"serving {bundle} on {base} (ready in {ready_s:.1f} s)")
        results = {}
        for n, reqs in workloads.items():
            note(f"  {n}: {len(reqs)} requests at concurrency {args.concurrency}")
            lead = n.startswith("prefix")
            results[n] = run_workload(base, pid, model, reqs, args, lead)
            if n.startswith("mixed"):
                hf.run(reqs)
        compiles = scrape(base).get("aotlm:compiles_after_ready", float("nan"))
    return {"ready_s": ready_s, "workloads": results, "compiles_after_ready": compiles}


# Seconds between one side's pass and the other's: the finished side's idle worker threads
# (OpenMP's, XLA's) may spin a little before they sleep.
SETTLE_S = 0.5


class TransformersBaseline:
    """transformers `generate` workers (serve_baselines.py, no jax in them), one with 1 torch
    thread and one with a thread per core, loaded and warmed before the server starts; `run`
    times a pass on each, the faster counting for that pass."""

    def __init__(self, args, warm: list[Request]) -> None:
        self.threads = sorted({1, os.cpu_count() or 1})
        script = Path(__file__).with_name("serve_baselines.py")
        cmd = [sys.executable, str(script), str(args.checkpoint), str(args.concurrency)]
        self.procs = {
            t: subprocess.Popen(
                [*cmd, str(t)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for t in self.threads
        }
        self.passes: list[dict] = []
        try:
            for t in self.threads:
                self._ask(t, warm)
        except BaseException:
            self.close()
            raise

    def _ask(self, threads: int, requests: Sequence[Request]) -> dict:
        proc = self.procs[threads]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps([asdict(r) for r in requests]) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"transformers baseline ({threads} threads) exited: {proc.wait()}")
        return json.loads(line)

    def run(self, requests: Sequence[Request]) -> None:
        runs = {}
        for t in self.threads:
            time.sleep(SETTLE_S)
            runs[t] = self._ask(t, requests)
        time.sleep(SETTLE_S)
        best = max(self.threads, key=lambda t: runs[t]["output_tok_s"])
        tok_s = {f"threads={t}": runs[t]["output_tok_s"] for t in self.threads}
        self.passes.append(runs[best] | {"threads": best, "tok_s_by_threads": tok_s})

    def result(self) -> dict:
        """The first pass's result (with its token ids, for the agreement check) and "passes"."""
        passes = [{k: v for k, v in p.items() if k != "token_ids"} for p in self.passes]
        return self.passes[0] | {"passes": passes}

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def check_checkpoint(checkpoint: Path, cfg: dict) -> None:
    """The transformers baseline must run the bundle's model: compare the shapes that matter."""
    hf = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    pairs = {"vocab_size": "vocab_size", "hidden_size": "hidden_size"}
    pairs |= {"num_hidden_layers": "num_layers", "intermediate_size": "intermediate_size"}
    diff = {k: (hf.get(k), cfg.get(v)) for k, v in pairs.items() if hf.get(k) != cfg.get(v)}
    if diff:
        raise SystemExit(f"{checkpoint} is not the bundle's model (checkpoint, bundle): {diff}")


def main() -> None:
    args = parse_args()
    load_avg = os.getloadavg()[0]
    if not args.checkpoint.exists():
        from aotlm.tiny import make_tiny_checkpoint

        make_tiny_checkpoint(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            note(
                "building a bundle (tokens up to 512, requests up to 16, decode_steps 32, "
                "max_seq_len 512)"
            )
        bundle = args.bundle or build_default_bundle(Path(tmp), args.checkpoint)
        manifest, digest = read_manifest(bundle)
        cfg = manifest.model.config
        check_checkpoint(args.checkpoint, cfg)
        rng = np.random.default_rng(args.seed)
        src = PromptSource(bundle / "tokenizer/tokenizer.json", cfg["bos_token_id"], rng)
        max_seq = manifest.serving.max_seq_len
        passes = [mixed_requests(src, rng, args.requests, max_seq) for _ in range(args.passes)]
        mixed = passes[0]
        page_size = manifest.serving.page_size
        cold, shared = prefix_requests(src, rng, args.prefix_requests, max_seq, page_size)
        # Untimed warm-up for every side: fresh mixed prompts (no page shared with the timed ones).
        warm = mixed_requests(src, rng, 2 * args.concurrency, max_seq)
        workloads = {"mixed": mixed}
        workloads |= {f"mixed#{i + 1}": p for i, p in enumerate(passes) if i}
        workloads |= {"prefix-cold": cold, "prefix-shared": shared}
        log = Path(tmp) / "server.log"
        note("transformers generate: workers with 1 and per-core torch threads, after each pass")
        baseline = TransformersBaseline(args, warm)
        try:
            name = manifest.name
            served_run = serve_workloads(args, log, bundle, name, workloads, warm, baseline)
        finally:
            baseline.close()
        hf = baseline.result()
        note("aotlm engine in-process, no HTTP: mixed")
        offline = engine_offline(bundle, mixed, warm, args.concurrency)
    report = make_report(args, manifest, digest, load_avg, served_run, offline, hf)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
