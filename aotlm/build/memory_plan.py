"""Memory plan per target: a serving OOM found at build time, not in production.

    total = weights + KV page pool + code of every executable
            + the largest step's transient bytes (temporaries + outputs not aliased to inputs)

Weights and the KV pool are resident for the server's life; one step function runs at a time.
The executables' numbers come from XLA's memory analysis (deviceless TPU compiles have it too);
a target without a compiled tier is planned from weights and KV pool alone.
"""

from __future__ import annotations

import math

import jax

from aotlm.build.model_yaml import BuildConfig
from aotlm.build.targets import Target
from aotlm.errors import ConfigError

GiB = 1 << 30
# Device memory per chip; every number of a plan is per device (on a mesh: one device's shards).
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "tpu7x": 192}


def nbytes(tree) -> int:
    """Bytes on one device: a leaf with a sharding (on a mesh) counts its shard only."""
    return sum(math.prod(_device_shape(a)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _device_shape(a) -> tuple[int, ...]:
    sharding = getattr(a, "sharding", None)
    return a.shape if sharding is None else sharding.shard_shape(a.shape)


def device_limit(target: Target, memory_gib: float | None) -> tuple[int | None, str]:
    """(bytes, where the number comes from); memory_gib overrides the target's own."""
    if memory_gib is not None:
        return int(memory_gib * GiB), f"memory_gib: {memory_gib:g}"
    if target.generation in TPU_HBM_GIB:
        gib = TPU_HBM_GIB[target.generation]
        return gib * GiB, f"{target.generation} HBM per chip: {gib} GiB"
    return None, "no limit known (set memory_gib in model.yaml)"


def memory_plan(
    target: Target,
    build: BuildConfig,
    weights_bytes: int,
    kv_pool_bytes: int,
    executables: dict[str, dict[str, int] | None] | None,
) -> dict:
    """The plan recorded in the manifest; `executables` maps file -> memory stats (or None)."""
    limit, source = device_limit(target, build.memory_gib)
    stats = {f: s for f, s in (executables or {}).items() if s is not None}
    transient = {f: s["temp"] + max(0, s["output"] - s["alias"]) for f, s in stats.items()}
    peak_file = max(transient, key=transient.__getitem__, default="")
    code = sum(s["code"] for s in stats.values())
    total = weights_bytes + kv_pool_bytes + code + transient.get(peak_file, 0)
    return {
        "weights_bytes": weights_bytes,
        "kv_pool_bytes": kv_pool_bytes,
        "code_bytes": code,
        "peak_step": peak_file,
        "peak_step_bytes": transient.get(peak_file, 0),
        "total_bytes": total,
        "limit_bytes": limit,
        "limit": source,
        "executables_analyzed": len(stats),
    }


def check_plan(target: Target, build: BuildConfig, plan: dict) -> None:
    """Fail the build when the plan does not fit, saying what to shrink."""
    limit = plan["limit_bytes"]
    if limit is None or plan["total_bytes"] <= limit:
        return
    per_page = plan["kv_pool_bytes"] // max(1, build.kv_pages)
    peak = f", largest step {plan['peak_step']} {_gib(plan['peak_step_bytes'])}"
    if build.kind == "encoder":  # no KV cache: only weights and the largest embed[S,B]
        raise ConfigError(
            f"{build.source.name}: memory plan for target {target.name}: needs "
            f"{_gib(plan['total_bytes'])} (weights {_gib(plan['weights_bytes'])}"
            f"{peak if plan['peak_step'] else ''}) but the device has {_gib(limit)} "
            f"({plan['limit']}): shrink the largest sequence-length bucket "
            f"({max(build.token_buckets)}) or batch bucket ({max(build.request_buckets)}), "
            "or use a smaller dtype"
        )
    raise ConfigError(
        f"{build.source.name}: memory plan for target {target.name}: needs {_gib(plan['total_bytes'])} "
        f"(weights {_gib(plan['weights_bytes'])}, KV page pool {_gib(plan['kv_pool_bytes'])} for "
        f"kv_pages={build.kv_pages}{peak if plan['peak_step'] else ''}) but the device has "
        f"{_gib(limit)} ({plan['limit']}): shrink kv_pages (each page is {per_page} bytes), "
        f"the largest token bucket ({max(build.token_buckets)}) or request bucket "
        f"({max(build.request_buckets)}), use a smaller dtype, or shard the model with a mesh"
    )


def _gib(n: int) -> str:
    return f"{n / GiB:.3f} GiB"
