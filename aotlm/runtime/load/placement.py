"""Put a sharded bundle (manifest `serving.mesh`) onto this process's devices.

The layout is the one the exports carry (aotlm/models/sharding.py wrote it at build time): the
loader reads it back from the forward export, so a bundle is served as it was built whatever
this aotlm's own layout code says. Weights go tensor by tensor from the mmapped safetensors
file, each device receiving only its shard, so no device (and no host buffer beyond one shard)
ever holds the whole model; KV pools are created shard by shard too. Transfers only: nothing
here compiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from jax import export as jax_export
from jax.sharding import Mesh, NamedSharding

from aotlm.bundle import Bundle
from aotlm.bundle.executables import mesh_in_shardings
from aotlm.errors import BundleError
from aotlm.models.checkpoint import flatten_params, unflatten_params
from aotlm.models.sharding import device_mesh
from aotlm.safetensors_io import SafetensorsFile


def serving_mesh(bundle: Bundle) -> Mesh | None:
    """The mesh over this process's first tp * ep devices; None for a one-device bundle."""
    tp, ep = bundle.manifest.serving.tp, bundle.manifest.serving.ep
    n = tp * ep
    if n == 1:
        return None
    devices = jax.devices()
    if len(devices) < n:
        platform = devices[0].platform
        hint = (
            f" (on CPU: start the process with XLA_FLAGS=--xla_force_host_platform_device_count={n})"
            if platform == "cpu"
            else ""
        )
        raise BundleError(
            f"{bundle.path}: the bundle is sharded over a mesh of {n} devices (model.yaml "
            f"mesh: {{tp: {tp}{f', ep: {ep}' if ep > 1 else ''}}}) but this process sees "
            f"{len(devices)} {platform} device(s): serve it where {n} devices are "
            f"visible{hint}, or rebuild it with a smaller mesh"
        )
    return device_mesh(tp, devices, ep=ep)


def forward_shardings(exp: jax_export.Exported, mesh: Mesh) -> tuple[dict, NamedSharding]:
    """({flat param name: sharding}, KV pages sharding) from an export of forward(params,
    k_pages, v_pages, ...), placed on `mesh`."""
    (params, k_pages, *_), _ = jax.tree.unflatten(exp.in_tree, mesh_in_shardings(exp, mesh))
    return flatten_params(params), k_pages


def place_weights(path: Path, shardings: Mapping[str, NamedSharding]) -> dict:
    """The params pytree, each tensor read from the mmapped file and split as `shardings` says."""
    out = {}
    with SafetensorsFile(path) as f:
        if set(f.keys()) != set(shardings):
            raise BundleError(
                f"{path}: tensors {sorted(set(f.keys()) ^ set(shardings))} do not match the "
                "forward export's arguments: rebuild the bundle"
            )
        for name in f:
            view = f.get(name)  # read-only view of the mapping; each shard is copied out of it
            out[name] = jax.make_array_from_callback(
                view.shape, shardings[name], lambda index, view=view: np.array(view[index])
            )
    return unflatten_params(out)


def sharded_zeros(shape: tuple[int, ...], dtype: np.dtype, sharding: NamedSharding) -> jax.Array:
    """Zeros laid out as `sharding`, each device's shard made on the host separately."""
    return jax.make_array_from_callback(
        shape,
        sharding,
        lambda index: np.zeros(sharding.shard_shape(shape), dtype),
    )
