"""Paged attention: jnp reference vs blocked jnp path vs the kernels, against the bytes floor.

    .venv/bin/python benchmarks/attention.py [--repeats 20] [--peak-gbps X] [--out PATH]

The floor is what any implementation must move through HBM: every KV position some token can see,
read once (keys and values, all KV heads), plus q read and the output written. ``floor_us`` is that
over the device's peak bandwidth (a table for TPU/GPU kinds, or --peak-gbps), so ``x_floor`` =
time / floor says how far an implementation is from the memory-bandwidth limit. The blocked jnp
path (what every non-TPU platform serves with) and the reference run everywhere, in the same run
(`blocked_vs_reference` is their speed ratio), and the blocked path given the step's slots
(``in-step``: the step's own keys attended densely, the pages walked only for older keys, as the
model's forward runs it; `in_step_vs_blocked`); the Pallas kernel only where jax's backend is TPU,
aotlm's C++ kernel (``cpu``) where it is CPU (`cpu_vs_in_step`: against the jnp path it replaced).
On CPU pass --peak-gbps (the machine's memory bandwidth) to get the floor. Prints a table and
writes benchmarks/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from aotlm.kernels.attention import paged_attention

ROOT = Path(__file__).resolve().parent.parent
# Peak HBM bandwidth in GB/s by device kind (vendor figures), for the floor in microseconds.
PEAK_GBPS = {
    "TPU v4": 1200,
    "TPU v5 lite": 819,
    "TPU v5e": 819,
    "TPU v5p": 2765,
    "TPU v6 lite": 1640,
    "TPU v6e": 1640,
    "NVIDIA H100": 3350,
    "NVIDIA H200": 4800,
}


@dataclass(frozen=True)
class Shape:
    name: str
    chunks: tuple[tuple[int, int], ...]  # (context before the chunk, chunk length) per request
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"


def shapes(small: bool) -> list[Shape]:
    """Decode, prefill and a mixed step; Llama-3-8B attention dims. ``small`` for CPU."""
    ctx = 512 if small else 2048
    dims = {"heads": 8, "kv_heads": 2} if small else {}
    return [
        Shape("decode", tuple((ctx, 1) for _ in range(16 if small else 64)), **dims),
        Shape("prefill", ((0, 256 if small else 1024),), **dims),
        Shape("mixed", ((ctx, 64),) * 2 + tuple((ctx, 1) for _ in range(16)), **dims),
        Shape("decode-d64", tuple((ctx, 1) for _ in range(16)), head_dim=64, **dims),
    ]


def make_inputs(shape: Shape, seed: int = 0):
    """Random q and cache with each request's pages scattered over the pool; and the slots the
    step's tokens were written at."""
    rng = np.random.default_rng(seed)
    s = shape.page_size
    pages_per_seq = max(-(-(c + n) // s) for c, n in shape.chunks)
    num_pages = 1 + len(shape.chunks) * pages_per_seq
    free = rng.permutation(np.arange(1, num_pages)).reshape(len(shape.chunks), pages_per_seq)
    positions = np.concatenate([np.arange(c, c + n) for c, n in shape.chunks]).astype(np.int32)
    token_req = np.concatenate([np.full(n, r) for r, (_, n) in enumerate(shape.chunks)])
    dtype = jnp.dtype(shape.dtype)
    cache = (num_pages, s, shape.kv_heads, shape.head_dim)
    q = rng.standard_normal((len(positions), shape.heads, shape.head_dim))
    arrays = [
        jnp.asarray(a, dtype) for a in (q, rng.standard_normal(cache), rng.standard_normal(cache))
    ]
    slots = free[token_req, positions // s] * s + positions % s
    inputs = (
        *arrays,
        jnp.asarray(positions),
        jnp.asarray(token_req.astype(np.int32)),
        jnp.asarray(free.astype(np.int32)),
    )
    return inputs, jnp.asarray(slots.astype(np.int32))


def floor_bytes(shape: Shape) -> int:
    """KV positions visible to some token (K and V, all KV heads) + q in + out, in bytes."""
    item = jnp.dtype(shape.dtype).itemsize
    kv = sum(c + n for c, n in shape.chunks) * 2 * shape.kv_heads * shape.head_dim * item
    tokens = sum(n for _, n in shape.chunks)
    return kv + 2 * tokens * shape.heads * shape.head_dim * item


def time_us(fn, args, repeats: int) -> float:
    """Median wall time of a compiled call, after one warm-up."""
    compiled = jax.jit(fn).lower(*args).compile()
    compiled(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peak-gbps", type=float, default=None, help="HBM bandwidth for the floor")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/attention.json")
    args = ap.parse_args()
    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if kind.startswith(k)), None)
    kernel = {"tpu": ["pallas"], "cpu": ["cpu"]}.get(backend, [])
    impls = ["reference", "blocked", "in-step", *kernel]
    note = "" if kernel else f"{backend}: no kernel here (reference and blocked)"
    rows = []
    for shape in shapes(small=backend == "cpu"):
        inputs, slots = make_inputs(shape)
        scale = shape.head_dim**-0.5
        floor = floor_bytes(shape)
        row = {**asdict(shape), "tokens": int(inputs[0].shape[0]), "floor_bytes": floor}
        row["floor_us"] = floor / (peak * 1e3) if peak else None
        for impl in impls:
            kwargs = {"impl": "blocked", "slots": slots} if impl == "in-step" else {"impl": impl}
            us = time_us(
                lambda *a, kwargs=kwargs, scale=scale: paged_attention(*a, scale, **kwargs),
                inputs,
                args.repeats,
            )
            row[f"{impl}_us"] = us
            row[f"{impl}_gbps"] = floor / (us * 1e3)
            row[f"{impl}_x_floor"] = us / row["floor_us"] if peak else None
        row["blocked_vs_reference"] = row["reference_us"] / row["blocked_us"]
        row["in_step_vs_blocked"] = row["blocked_us"] / row["in-step_us"]
        if "cpu" in impls:
            row["cpu_vs_in_step"] = row["in-step_us"] / row["cpu_us"]
        rows.append(row)
    report = {
        "backend": backend,
        "device_kind": kind,
        "peak_gbps": peak,
        "note": note,
        "jax": jax.__version__,
        "rows": rows,
    }
    print(f"backend {backend} ({kind})  peak {peak or '?'} GB/s  jax {jax.__version__}  {note}")
    head = f"{'shape':>11} {'tokens':>6} {'floor MB':>8} {'floor us':>9}"
    head += "".join(f" {i + ' us':>13} {'GB/s':>7} {'x floor':>7}" for i in impls)
    print(head + " blocked/ref in-step/blocked" + (" cpu/in-step" if "cpu" in impls else ""))
    for r in rows:
        line = f"{r['name']:>11} {r['tokens']:>6} {r['floor_bytes'] / 1e6:>8.2f} {r['floor_us'] or float('nan'):>9.1f}"
        for i in impls:
            x = r[f"{i}_x_floor"]
            line += (
                f" {r[f'{i}_us']:>13.1f} {r[f'{i}_gbps']:>7.1f} {x if x else float('nan'):>7.1f}"
            )
        line += f" {r['blocked_vs_reference']:>10.1f}x {r['in_step_vs_blocked']:>14.2f}x"
        print(line + (f" {r['cpu_vs_in_step']:>10.2f}x" if "cpu_vs_in_step" in r else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
