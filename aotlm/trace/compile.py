"""Compile an exported function, and serialize the result: the one recipe build and loader share.

The loader's StableHLO tier and the build's compiled tier must produce the same executable, so
both call `compile_exported` on the *deserialized* export with the donation restated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import export as jax_export
from jax.experimental import serialize_executable
from jax.sharding import SingleDeviceSharding

MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "code": "generated_code_size_in_bytes",
}


def compile_exported(
    exp: jax_export.Exported, donate: tuple[int, ...], device: Any = None
) -> jax.stages.Compiled:
    """`jax.jit(exp.call, donate_argnums=...)`, compiled for the default device or for `device`
    (a device of this process, or of a deviceless TPU topology)."""
    sharding = None if device is None else SingleDeviceSharding(device)
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in exp.in_avals]
    args, kwargs = jax.tree.unflatten(exp.in_tree, structs)
    return jax.jit(exp.call, donate_argnums=donate).lower(*args, **kwargs).compile()


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
