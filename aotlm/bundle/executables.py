"""Compile an exported function, and serialize the result: the one recipe build and loader share.

The loader's StableHLO tier and the build's compiled tier must produce the same executable, so
both call `compile_exported` on the *deserialized* export with the donation restated, and with
the same compiler options (`compiler_options`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import export as jax_export
from jax.experimental import serialize_executable
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from aotlm.models.sharding import device_mesh

# XLA:CPU's bf16 float normalization widens a bf16 dynamic-slice to f32 by converting its whole
# operand, and loop-invariant code motion then hoists that convert out of the layer scan: every
# call converted every stacked bf16 weight (measured, jax 0.10.2: 28 layers' q projections at 16
# tokens 105 ms, f32 weights 26 ms). Without the hoist the convert stays per layer slice and the
# dot runs in f32 (12 ms); without the normalization pass instead, the dots run XLA:CPU's bf16
# kernels (16 ms; a 0.6B decode step 157 vs 141 ms). So graphs with bf16 inputs compile without
# the hoist on CPU; f32 graphs keep it (they lose ~15% without it). (bf16 KV pages are uint16
# bits for the same normalization: aotlm/kernels/kv_quant.py.)
BF16_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}

MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "code": "generated_code_size_in_bytes",
}


def compile_exported(
    exp: jax_export.Exported, donate: tuple[int, ...], devices: Sequence[Any] = (), ep: int = 1
) -> jax.stages.Compiled:
    """`jax.jit(exp.call, donate_argnums=...)`, compiled for the default device or for
    `devices[0]` (of this process, or of a deviceless TPU topology); an export sharded over a
    mesh of N devices (`exp.nr_devices`) for that mesh over the first N of `devices` (default:
    this process's), with the shardings the export carries. ``ep``: the mesh's expert axis
    (the tp axis has the other nr_devices / ep devices)."""
    n = exp.nr_devices
    if n > 1:
        mesh = device_mesh(n // ep, devices or jax.devices(), ep=ep)
        shardings = mesh_in_shardings(exp, mesh)
    else:
        shardings = [SingleDeviceSharding(devices[0]) if devices else None] * len(exp.in_avals)
    structs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        for a, s in zip(exp.in_avals, shardings, strict=True)
    ]
    args, kwargs = jax.tree.unflatten(exp.in_tree, structs)
    lowered = jax.jit(exp.call, donate_argnums=donate).lower(*args, **kwargs)
    return lowered.compile(compiler_options=compiler_options(exp, (devices or jax.devices())[0]))


def compiler_options(exp: jax_export.Exported, device: Any) -> dict[str, str]:
    """The XLA options a compile of ``exp`` for ``device``'s platform gets."""
    bf16 = any(a.dtype == jnp.bfloat16 for a in exp.in_avals)
    return dict(BF16_CPU_COMPILER_OPTIONS) if device.platform == "cpu" and bf16 else {}


def mesh_in_shardings(exp: jax_export.Exported, mesh: Mesh) -> list[NamedSharding]:
    """A sharded export's input shardings on `mesh`. An argument the function does not use
    (forward's lm_head) is exported with no sharding: it is replicated, like the rest."""
    return [s or NamedSharding(mesh, P()) for s in exp.in_shardings_jax(mesh)]


def serialize_compiled(compiled: jax.stages.Compiled, exp: jax_export.Exported) -> bytes:
    """The executable's bytes (a pickle: load only after the fingerprint, digest and trust checks).

    The pytree structures are not stored: the loader takes them from the export, so they are
    checked here to be the ones the loader will pass.
    """
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    if in_tree != exp.in_tree or out_tree != exp.out_tree:
        raise AssertionError(f"compiled trees {in_tree}, {out_tree} differ from the export's")
    return payload


def load_compiled(
    payload: bytes, exp: jax_export.Exported, devices: list[Any]
) -> jax.stages.Compiled:
    """Unpickle an executable onto `devices`. Callers check digest, fingerprint and trust first."""
    return serialize_executable.deserialize_and_load(
        payload, exp.in_tree, exp.out_tree, execution_devices=devices
    )


def memory_stats(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """argument / output / alias / temp / code bytes from XLA's memory analysis (None if absent)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return {k: int(getattr(stats, attr, 0) or 0) for k, attr in MEMORY_FIELDS.items()}
