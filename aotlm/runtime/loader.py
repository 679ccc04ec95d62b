"""Load a verified bundle: weights to the device, each exported function compiled exactly once.

Order matters for safety: the bundle (manifest digest, format version, every file's sha256) is
verified before any byte of it is deserialized, and the compile counter is sealed only after every
executable exists, so anything compiled later shows up as a compile after ready.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import export as jax_export

from aotlm.bundle import Bundle, open_bundle
from aotlm.bundle.format import WEIGHTS_FILE
from aotlm.errors import BundleError
from aotlm.models import ModelConfig
from aotlm.models.checkpoint import unflatten_params
from aotlm.models.config import model_config_from_dict
from aotlm.runtime.compile_guard import CompileCounter
from aotlm.safetensors_io import read_safetensors

BucketKey = tuple[str, tuple[int, ...]]


def bucket_key(name: str, bucket: dict[str, int]) -> BucketKey:
    """("forward", (T,)), ("logits", (T, R)), ("sample", (R,)): tokens before requests."""
    return name, tuple(bucket[k] for k in ("tokens", "requests") if k in bucket)


@dataclass
class LoadedBundle:
    bundle: Bundle
    model: ModelConfig
    executables: dict[BucketKey, jax.stages.Compiled]
    params: dict
    k_pages: jax.Array
    v_pages: jax.Array
    counter: CompileCounter
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def serving(self) -> dict:
        return self.bundle.manifest["serving"]

    @property
    def token_buckets(self) -> tuple[int, ...]:
        return tuple(self.bundle.manifest["buckets"]["tokens"])

    @property
    def request_buckets(self) -> tuple[int, ...]:
        return tuple(self.bundle.manifest["buckets"]["requests"])


def _compile(exp: jax_export.Exported, donate: tuple[int, ...]) -> jax.stages.Compiled:
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exp.in_avals]
    args, kwargs = jax.tree.unflatten(exp.in_tree, structs)
    return jax.jit(exp.call, donate_argnums=donate).lower(*args, **kwargs).compile()


def _check_platform(bundle: Bundle) -> None:
    platform = jax.default_backend()
    platforms = bundle.manifest["serving"].get("platforms", [])
    if platform not in platforms:
        raise BundleError(
            f"{bundle.path}: built for {platforms}, but this process runs on {platform!r}: "
            f"rebuild with `--target {platform}`"
        )


def load_bundle(path: Path | str, counter: CompileCounter | None = None) -> LoadedBundle:
    """Verify, load weights, compile every function once; the caller seals `counter` when ready."""
    counter = counter or CompileCounter()
    t0 = time.perf_counter()
    bundle = open_bundle(path)
    _check_platform(bundle)
    t1 = time.perf_counter()
    model = model_config_from_dict(bundle.manifest["model"]["config"])
    params = jax.device_put(unflatten_params(read_safetensors(bundle.file(WEIGHTS_FILE))))
    t2 = time.perf_counter()
    executables = {}
    for entry in bundle.manifest["functions"]:
        try:
            exp = jax_export.deserialize(bytearray(bundle.read(entry["file"])))
        except Exception as e:  # a verified file that jax cannot read: written by another jax
            raise BundleError(
                f"{bundle.file(entry['file'])}: jax {jax.__version__} cannot deserialize it ({e}); "
                f"the bundle was built with jax {bundle.manifest['jax_version']}: rebuild it"
            ) from e
        key = bucket_key(entry["name"], entry["bucket"])
        executables[key] = _compile(exp, tuple(entry["donate_argnums"]))
    serving = bundle.manifest["serving"]
    shape = (
        model.num_layers,
        serving["kv_pages"],
        serving["page_size"],
        model.num_kv_heads,
        model.head_dim,
    )
    k_pages = jnp.zeros(shape, serving["dtype"])
    v_pages = jnp.zeros(shape, serving["dtype"])
    t3 = time.perf_counter()
    timings = {"verify_s": t1 - t0, "weights_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0}
    return LoadedBundle(bundle, model, executables, params, k_pages, v_pages, counter, timings)
