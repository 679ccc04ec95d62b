"""Quantized weights against unquantized ones on a memory-bound model, in one run.

    .venv/bin/python benchmarks/quant.py [--hidden 1024] [--layers 28] [--intermediate 3072]
        [--vocab 151936] [--max-tokens 32] [--passes 3] [--variants bf16,int8,fp8,bf16-kv8,int8-kv8,f32,int8-f32]
        [--out benchmarks/results/quant.json]

One random-weight checkpoint (Qwen3-0.6B's shapes by default: 28 layers, hidden 1024, 16 heads
of 128, 8 KV heads, MLP 3072, a tied 151,936-token embedding; 0.6B parameters) is built into a
bundle per variant: ``bf16`` (serving dtype bfloat16), ``int8`` and ``fp8`` (bf16 with int8 /
e4m3 weights), ``bf16-kv8`` and ``int8-kv8`` (the fp8 KV cache, bf16 or int8 weights), and, because XLA:CPU runs bf16 dots far below memory speed, ``f32`` and
``int8-f32`` (int8 weights, f32 serving dtype) as the CPU-honest pair. For each: bundle size,
build time, the quality gate's figures (KL, top-1, perplexity against its unquantized twin),
decode tok/s at batch 1 and 16 (8-token prompts, greedy, ignore_eos), time per decode step and
that time over the memory floor: bytes one step reads (every layer weight, the LM head, the
KV of the context) / copy bandwidth measured in the same run (numpy copy of 512 MiB, bytes
read + written per second). Passes alternate variants so all see the same machine; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {  # name -> (serving dtype, weight scheme, kv_cache_dtype)
    "bf16": ("bfloat16", None, None),
    "int8": ("bfloat16", "int8", None),
    "fp8": ("bfloat16", "fp8", None),
    "bf16-kv8": ("bfloat16", None, "fp8"),
    "int8-kv8": ("bfloat16", "int8", "fp8"),
    "f32": ("float32", None, None),
    "int8-f32": ("float32", "int8", None),
}
BATCHES = (1, 16)
PROMPT = 8


def _checkpoint(root: Path, args) -> Path:
    from aotlm.tiny import write_checkpoint

    shape = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64),
        "num_key_value_heads": max(1, args.hidden // 128),
        "head_dim": 128 if args.hidden >= 128 else 32,
        "intermediate_size": args.intermediate,
        "vocab_size": args.vocab,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    }
    return write_checkpoint(root / "ckpt", shape, seed=1)


def _bundle(root: Path, name: str, ckpt: Path, args) -> tuple[Path, float]:
    from aotlm.build.bundle import build_bundle
    from aotlm.build.model_yaml import load_build_config

    dtype, scheme, kv = VARIANTS[name]
    spec = {
        "model": str(ckpt), "dtype": dtype, "max_seq_len": 128,
        "buckets": {"tokens": [16], "requests": list(BATCHES), "page_size": 16},
        "targets": ["cpu"], "decode_steps": 4,
    }  # fmt: skip
    if scheme or kv:
        quant = {"weights": scheme, "kv_cache_dtype": kv}
        spec |= {
            "quantization": {k: v for k, v in quant.items() if v},
            "quality": {"max_tokens": args.quality_tokens},
        }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = time.perf_counter()
    build_bundle(load_build_config(path), root / name)
    return root / name, time.perf_counter() - start


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second a numpy copy moves (read + written), best of ``repeats``."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def step_bytes(engine, batch: int, context: int) -> int:
    """Bytes one decode step of ``batch`` rows reads: every layer weight (quantized ones and
    their scales), the LM head, and each row's KV for ``context`` positions."""
    loaded = engine.loaded
    layers = jax.tree.leaves(loaded.params["layers"])
    weights = sum(a.nbytes for a in layers) + loaded.params["embed"].nbytes  # tied head
    cfg = loaded.model
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * loaded.k_pages.dtype.itemsize
    return weights + batch * context * kv


def _decode(engines: dict, args) -> dict:
    from aotlm.runtime.generation.sampling_params import SamplingParams

    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, PROMPT).tolist() for _ in range(max(BATCHES))]
    full = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    loaded = {n: e.compiles_after_ready for n, e in engines.items()}
    for engine in engines.values():  # warm every graph the passes use
        for b in BATCHES:
            engine.generate(
                prompts[:b], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
            )
    times = {n: {b: [] for b in BATCHES} for n in engines}
    for _ in range(args.passes):
        for name, engine in engines.items():
            for b in BATCHES:
                start = time.perf_counter()
                engine.generate(prompts[:b], one)
                prefill = time.perf_counter() - start
                start = time.perf_counter()
                engine.generate(prompts[:b], full)
                times[name][b].append(
                    (time.perf_counter() - start - prefill) / (args.max_tokens - 1)
                )
    compiles = {n: e.compiles_after_ready - loaded[n] for n, e in engines.items()}
    return {
        n: {b: statistics.median(t) for b, t in per.items()} for n, per in times.items()
    }, compiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--quality-tokens", type=int, default=128)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quant.json")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")

    from aotlm.bundle import open_bundle
    from aotlm.runtime.generation.engine import Engine

    bandwidth = copy_bandwidth()
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = _checkpoint(root, args)
        for name in names:
            path, seconds = _bundle(root, name, ckpt, args)
            m = open_bundle(path).manifest
            rows[name] = {
                "bundle_bytes": sum(f.size for f in m.files.values()),
                "weights_bytes": m.files["weights/model.safetensors"].size,
                "build_s": seconds,
                "quality": (m.quantization or {}).get("quality"),
            }
        engines = {n: Engine.from_bundle(root / n) for n in names}
        params = sum(
            int(np.prod(a.shape)) for a in jax.tree.leaves(engines[names[0]].loaded.params)
        )
        step_s, compiles = _decode(engines, args)
        context = PROMPT + args.max_tokens // 2  # mean positions a step attends to
        for name, engine in engines.items():
            for b in BATCHES:
                floor = step_bytes(engine, b, context) / bandwidth
                rows[name][f"batch{b}"] = {
                    "ms_per_step": 1e3 * step_s[name][b],
                    "tok_s": b / step_s[name][b],
                    "floor_ms": 1e3 * floor,
                    "x_floor": step_s[name][b] / floor,
                }
            rows[name]["compiles_after_ready"] = compiles[name]
        bandwidth_gbs = bandwidth / 1e9
    print(f"model: {params / 1e9:.2f}B parameters; copy bandwidth {bandwidth_gbs:.2f} GB/s "
          f"(read + written); decode after {PROMPT}-token prompts, {args.max_tokens} tokens")  # fmt: skip
    head = f"{'variant':9} {'bundle MB':>9} " + " ".join(
        f"{'b' + str(b) + ' tok/s':>10} {'ms/step':>8} {'x floor':>7}" for b in BATCHES
    )
    print(head + f" {'mean KL':>9} {'top-1':>6} {'ppl q/unq':>15}")
    for name, r in rows.items():
        cells = " ".join(
            f"{r[f'batch{b}']['tok_s']:>10.2f} {r[f'batch{b}']['ms_per_step']:>8.1f} "
            f"{r[f'batch{b}']['x_floor']:>7.2f}"
            for b in BATCHES
        )
        q = r["quality"]
        quality = (
            f"{q['mean_kl']:>9.5f} {q['top1_agreement']:>6.3f} "
            f"{q['perplexity']:>7.1f}/{q['perplexity_unquantized']:<7.1f}"
            if q else f"{'-':>9} {'-':>6} {'-':>15}"
        )  # fmt: skip
        print(f"{name:9} {r['bundle_bytes'] / 1e6:>9.1f} {cells} {quality}")
    ratios = {}
    pairs = (("int8", "bf16"), ("fp8", "bf16"), ("bf16-kv8", "bf16"), ("int8-kv8", "bf16"),
             ("int8-kv8", "bf16-kv8"), ("int8-f32", "f32"))  # fmt: skip
    for quant, base in pairs:
        if quant in rows and base in rows:
            ratios[f"{quant}/{base}"] = {
                f"batch{b}": rows[quant][f"batch{b}"]["tok_s"] / rows[base][f"batch{b}"]["tok_s"]
                for b in BATCHES
            }
            print(f"{quant} / {base} decode tok/s: " + ", ".join(
                f"batch {b} {v:.2f}x" for b, v in zip(BATCHES, ratios[f'{quant}/{base}'].values(), strict=True)
            ))  # fmt: skip
    if "int8" in rows:
        print(f"goal: int8 >= 1.6x bf16 at batch 1, within 1.5x of its floor: "
              f"{ratios.get('int8/bf16', {}).get('batch1', float('nan')):.2f}x, "
              f"{rows['int8']['batch1']['x_floor']:.2f}x floor")  # fmt: skip
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params,
        "copy_bandwidth_gbs": bandwidth_gbs,
        "variants": rows,
        "ratios": ratios,
        "platform": jax.devices()[0].platform,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
