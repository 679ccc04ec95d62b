"""Startup benchmark: time to ready, build time with --jobs 1 / 2, and rebuild time.

    .venv/bin/python benchmarks/startup.py [--models tiny,large] [--out benchmarks/results/startup.json]

For each model, on the same bucket set (artifacts/tiny-llama.yaml's), every mode runs in a fresh
subprocess and is timed from after its imports to "every bucket can run":
  (a) jit        plain `jax.jit` of the step functions, one warm-up call per bucket (a cold start)
  (b) jit+cache  the same with a warm JAX persistent compilation cache (a restart)
  (c) stablehlo  `load_bundle` compiling the bundle's exports (trust policy "never")
  (d) compiled   `load_bundle` deserializing the bundle's executables (built on this machine)
  (e) floor      reading every byte of the bundle from disk (page cache warm, as for c and d)
Build: `aotlm build` with --jobs 1 and --jobs 2 (empty cache), then a rebuild with nothing changed,
each as a subprocess (wall time, imports included) and as the build's own `seconds`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("jit", "jit_cache", "stablehlo", "compiled", "floor")
LARGE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8}


def child(mode: str, bundle: Path, cache: Path) -> dict:
    """One measurement in this (fresh) process; returns seconds to ready and compiles."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from aotlm.runtime.load.compile_guard import CompileCounter

    if mode == "jit_cache":
        jax.config.update("jax_compilation_cache_dir", str(cache / "jax-cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    counter = CompileCounter()
    if mode == "floor":
        start = time.perf_counter()
        size = sum(len(p.read_bytes()) for p in sorted(bundle.rglob("*")) if p.is_file())
        return {"ready_s": time.perf_counter() - start, "bytes": size, "compiles": 0}
    if mode in ("jit", "jit_cache"):
        return _jit_warmup(bundle, counter)
    from aotlm.runtime.load.loader import load_bundle
    from aotlm.runtime.load.trust import TrustPolicy

    trust = TrustPolicy("never" if mode == "stablehlo" else "local", cache_dir=cache)
    start = time.perf_counter()
    loaded = load_bundle(bundle, counter=counter, trust=trust)
    jax.block_until_ready(loaded.params)
    ready = time.perf_counter() - start
    assert loaded.tier == ("stablehlo" if mode == "stablehlo" else "compiled"), loaded.timings
    return {"ready_s": ready, "compiles": counter.before_seal, "timings": loaded.timings}


def _jit_warmup(bundle: Path, counter) -> dict:
    """What peers do: jit the step functions, call each bucket once on dummy inputs."""
    import jax
    import numpy as np
    from jax import export as jax_export

    from aotlm.build.steps import DONATE_ARGNUMS, step_functions
    from aotlm.bundle import open_bundle
    from aotlm.bundle.format import WEIGHTS_FILE
    from aotlm.models.checkpoint import unflatten_params
    from aotlm.models.config import model_config_from_dict
    from aotlm.safetensors_io import read_safetensors

    # The inputs' tree structures (named step inputs) from the exports, outside the timing: a
    # peer's code knows them.
    pre = open_bundle(bundle)
    trees = {
        fn.key: jax_export.deserialize(bytearray(pre.read(fn.file))).in_tree
        for fn in pre.manifest.functions
    }
    start = time.perf_counter()
    b = open_bundle(bundle)
    model = model_config_from_dict(b.manifest.model.config)
    params = jax.device_put(unflatten_params(read_safetensors(b.file(WEIGHTS_FILE))))
    steps = b.manifest.serving.decode_steps
    fns = {
        n: jax.jit(
            functools.partial(f, max_steps=steps) if n == "decode" else f,
            donate_argnums=DONATE_ARGNUMS[n],
        )
        for n, f in step_functions(model).items()
    }
    for fn in b.manifest.functions:
        dummies = [jax.device_put(np.zeros(shape, dtype)) for shape, dtype in fn.in_avals]
        args, _ = jax.tree.unflatten(trees[fn.key], dummies)
        args = list(args)
        if fn.name in ("forward", "decode"):
            args[0] = params  # the real params come first
        if fn.name == "logits":
            args[0] = params.get("lm_head", params["embed"])
        jax.block_until_ready(fns[fn.name](*args))
    return {"ready_s": time.perf_counter() - start, "compiles": counter.before_seal}


def run_child(mode: str, bundle: Path, cache: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--bundle",
        str(bundle),
        "--cache",
        str(cache),
    ]
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def run_build(yaml: Path, out: Path, cache: Path, jobs: int, no_cache: bool) -> dict:
    cmd = [sys.executable, "-m", "aotlm", "build", str(yaml), "-o", str(out), "--json"]
    cmd += ["--jobs", str(jobs), "--cache-dir", str(cache)] + (["--no-cache"] if no_cache else [])
    start = time.perf_counter()
    out_text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result = json.loads(out_text.strip().splitlines()[-1])
    return {
        "process_s": time.perf_counter() - start,
        "build_s": result["seconds"],
        "exported": result["exported"],
        "compiled": result["compiled"],
        "digest": result["digest"],
    }


def make_model(kind: str, tmp: Path) -> Path:
    """The tiny checkpoint as a model.yaml, or the same with LARGE dimensions (random weights)."""
    from safetensors.numpy import save_file

    from aotlm.tiny import make_tiny_checkpoint, random_weights

    ckpt = make_tiny_checkpoint(tmp / f"ckpt-{kind}")
    dtype = "float32"
    if kind == "large":
        config = json.loads((ckpt / "config.json").read_text()) | LARGE
        (ckpt / "config.json").write_text(json.dumps(config, indent=2))
        save_file(random_weights(config, 0), str(ckpt / "model.safetensors"), {"format": "pt"})
        dtype = "bfloat16"
    spec = (ROOT / "artifacts/tiny-llama.yaml").read_text()
    spec = spec.replace("../checkpoints/tiny-llama", str(ckpt)).replace("float32", dtype)
    path = tmp / f"{kind}.yaml"
    path.write_text(spec)
    return path


def bench_model(kind: str, tmp: Path) -> dict:
    yaml = make_model(kind, tmp)
    cache = tmp / f"cache-{kind}"
    bundle = tmp / f"bundle-{kind}"
    build = {
        "jobs1": run_build(yaml, tmp / "b1", cache, jobs=1, no_cache=True),
        "jobs2": run_build(yaml, bundle, cache, jobs=2, no_cache=False),
        "rebuild": run_build(yaml, bundle, cache, jobs=2, no_cache=False),
    }
    shutil.rmtree(tmp / "b1")
    run_child("jit_cache", bundle, cache)  # fill the persistent compilation cache (untimed)
    ready = {mode: run_child(mode, bundle, cache) for mode in MODES}
    return {"build": build, "ready": ready}


def table(results: dict) -> str:
    lines = []
    for kind, r in results["models"].items():
        ready, build = r["ready"], r["build"]
        d, floor = ready["compiled"]["ready_s"], ready["floor"]["ready_s"]
        lines.append(f"\nmodel {kind}  ({r['graphs']} graphs, bundle {r['bundle_mib']:.1f} MiB)")
        lines.append(f"{'mode':<24}{'ready s':>10}{'process s':>11}{'compiles':>10}{'vs (d)':>9}")
        for label, mode in zip(
            ("(a) jax.jit", "(b) jit + persistent", "(c) bundle stablehlo", "(d) bundle compiled",
             "(e) floor: read bytes"), MODES, strict=True
        ):  # fmt: skip
            m = ready[mode]
            lines.append(
                f"{label:<24}{m['ready_s']:>10.3f}{m['process_s']:>11.2f}{m['compiles']:>10}"
                f"{m['ready_s'] / d:>8.1f}x"
            )
        lines.append(
            f"goals: a/d {ready['jit']['ready_s'] / d:.1f}x (>=20), "
            f"b/d {ready['jit_cache']['ready_s'] / d:.1f}x (>=3), d/e {d / floor:.1f}x (<=2)"
        )
        lines.append(
            f"{'build':<24}{'build s':>10}{'process s':>11}{'exported':>10}{'compiled':>9}"
        )
        for label, key in (("--jobs 1", "jobs1"), ("--jobs 2", "jobs2"), ("rebuild", "rebuild")):
            b = build[key]
            lines.append(
                f"{label:<24}{b['build_s']:>10.2f}{b['process_s']:>11.2f}{b['exported']:>10}"
                f"{b['compiled']:>9}"
            )
        lines.append(
            f"rebuild / full build: {build['rebuild']['build_s'] / build['jobs1']['build_s']:.1%} "
            f"(build s), {build['rebuild']['process_s'] / build['jobs1']['process_s']:.1%} (process)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,large")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/startup.json")
    ap.add_argument("--child", choices=MODES)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--cache", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bundle, args.cache)))
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    results = {"backend": "cpu", "jax": jax.__version__, "cpus": os.cpu_count(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            r = bench_model(kind, Path(tmp))
            bundle = Path(tmp) / f"bundle-{kind}"
            m = json.loads(
                subprocess.check_output(
                    [sys.executable, "-m", "aotlm", "inspect", str(bundle), "--json"]
                )
            )
            r["graphs"], r["bundle_mib"] = m["total_functions"], m["total_bytes"] / 2**20
            results["models"][kind] = r
            print(table({"models": {kind: r}}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
