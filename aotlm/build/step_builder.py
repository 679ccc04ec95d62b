"""Export and compile every (function, bucket) of a build, through the build cache.

`StepBuilder.step` turns one `StepSpec` into its serialized export and one executable per compiled
target; `build_steps` runs them on a thread pool (XLA compiles release the GIL). Cache keys name
everything an artifact depends on: the avals and shardings, donation, the model config, the
target platforms and fingerprints, jax/jaxlib, and `source_version()` (the traced code).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jaxlib
from jax import export as jax_export

import aotlm
from aotlm.build.cache import BuildCache, cache_key
from aotlm.build.export import export_step, target_platforms
from aotlm.build.families import ModelFamily
from aotlm.build.model_yaml import BuildConfig
from aotlm.build.signatures import StepSpec
from aotlm.build.steps import DONATE_ARGNUMS
from aotlm.build.targets import COMPILED, Target
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.executables import (
    compile_exported,
    compiler_options,
    memory_stats,
    serialize_compiled,
)
from aotlm.kernels.paged_attention_pallas import BlockSizes

# (done, total, spec, seconds) after each function is exported and compiled.
Progress = Callable[[int, int, StepSpec, float], None]


@functools.cache
def source_version() -> str:
    """sha256 of the code that is traced into the graphs (models, kernels, the build side).

    Computed once per process: it stands for the code this process imported and traces.
    """
    root = Path(aotlm.__file__).parent
    h = hashlib.sha256()
    # all of build/, not only the step functions: a module the steps come to import is then
    # never left out, and a cache miss after a build-code edit costs only time
    traced = [p for sub in ("models", "kernels", "build") for p in (root / sub).rglob("*")]
    for path in sorted(p for p in traced if p.suffix in (".py", ".cc")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _avals(spec: StepSpec) -> dict:
    """What an export depends on besides the code: avals, and on a mesh their shardings."""
    args = spec.args
    leaves = [[list(a.shape), str(a.dtype)] for a in jax.tree.leaves(args)]
    out = {"tree": str(jax.tree.structure(args)), "leaves": leaves}
    if spec.out_shardings is not None:
        out["shardings"] = [str(a.sharding) for a in jax.tree.leaves(args)]
        out["out_shardings"] = str(spec.out_shardings)
    return out


@dataclass
class BuiltStep:
    """One (function, bucket): its export and its executable per compiled target."""

    spec: StepSpec
    export: bytes
    exp: jax_export.Exported
    compiled: dict[str, tuple[bytes, dict | None]]  # target name -> (payload, memory stats)
    seconds: float
    exported: int = 0  # fresh work done (not from the cache)
    compiled_count: int = 0


class StepBuilder:
    """Exports and compiles one spec at a time, through the build cache when there is one."""

    def __init__(
        self, family: ModelFamily, cfg, build: BuildConfig, plans, cache: BuildCache | None
    ):
        lora = {"lora": True} if build.lora is not None else {}
        self.fns = (
            family.sharded_step_functions(cfg, build.tp, build.ep, **lora)  # type: ignore[misc]
            if build.tp * build.ep > 1
            else family.step_functions(cfg, **lora)
        )
        if "forward" in self.fns:
            # Static arguments of the traced forward (and of the forward inside decode): what a
            # cpu target's attention runs, and the Pallas kernel's block sizes.
            static: dict = {"cpu_attention": build.attention_cpu}
            if build.attention_blocks != (None, None):
                static["block_sizes"] = BlockSizes(*build.attention_blocks)
            if build.lora is not None:
                static["lora_rank"] = build.lora.max_rank
            for name in ("forward", "decode"):
                if name in self.fns:
                    self.fns[name] = functools.partial(self.fns[name], **static)
        if "decode" in self.fns:
            self.fns["decode"] = functools.partial(self.fns["decode"], max_steps=build.decode_steps)
        self.platforms = target_platforms(build.targets)
        self.plans = [p for p in plans if p.tier == COMPILED]
        self.cache = cache
        self.key_base = {
            "model": cfg.to_dict(),
            "platforms": list(self.platforms),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "source": source_version(),
            "attention_blocks": list(build.attention_blocks),
            "attention_cpu": build.attention_cpu,
        }
        if build.lora is not None:  # the slots' width is in the avals, the rank is not
            self.key_base["lora_rank"] = build.lora.max_rank
        self.decode_steps = build.decode_steps
        self.ep = build.ep

    def _cached(self, key: str, make: Callable[[], tuple[bytes, dict]]):
        hit = self.cache.get(key) if self.cache else None
        if hit is not None:
            return hit[0], hit[1], 0
        data, meta = make()
        if self.cache:
            self.cache.put(key, data, meta)
        return data, meta, 1

    def step(self, spec: StepSpec) -> BuiltStep:
        start = time.perf_counter()
        donate = DONATE_ARGNUMS[spec.name]
        # decode's steps per call shape only decode graphs (its outputs are [K, R])
        steps = {"decode_steps": self.decode_steps} if spec.name == "decode" else {}
        key = cache_key(
            kind="export", name=spec.name, bucket=spec.bucket, avals=_avals(spec),
            donate=list(donate), **self.key_base, **steps,
        )  # fmt: skip
        export, _, n_exported = self._cached(
            key,
            lambda: (bytes(export_step(self.fns[spec.name], spec, self.platforms).serialize()), {}),
        )
        exp = jax_export.deserialize(bytearray(export))
        out = BuiltStep(spec, export, exp, {}, 0.0, exported=n_exported)
        for plan in self.plans:

            def make(plan=plan):
                compiled = compile_exported(exp, donate, plan.devices, ep=self.ep)
                return serialize_compiled(compiled, exp), {"memory": memory_stats(compiled)}

            device = (plan.devices or jax.devices())[0]
            key = cache_key(
                kind="compiled", export=sha256_bytes(export), donate=list(donate),
                fingerprint=plan.fingerprint, jax=jax.__version__, jaxlib=jaxlib.__version__,
                options=compiler_options(exp, device),
            )  # fmt: skip
            payload, meta, n = self._cached(key, make)
            out.compiled[plan.target.name] = (payload, meta.get("memory"))
            out.compiled_count += n
        out.seconds = time.perf_counter() - start
        return out


def build_steps(
    builder: StepBuilder, specs, jobs: int, progress: Progress | None
) -> list[BuiltStep]:
    results = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for done, step in enumerate(pool.map(builder.step, specs), start=1):
            results.append(step)
            if progress:
                progress(done, len(specs), step.spec, step.seconds)
    return results


def compiled_file(target: Target, spec: StepSpec) -> str:
    """compiled/<target>/<function>_<bucket>.bin, named like the export."""
    stem = spec.file.rsplit("/", 1)[-1].removesuffix(".jaxexp")
    return f"compiled/{target.dirname}/{stem}.bin"
