"""Load a verified bundle: weights to the device, and one executable per exported function.

Two tiers: the bundle's serialized executables for this platform (a file load, no compile), or
the portable StableHLO compiled here once. Order matters for safety: the bundle (manifest digest,
format version, every file's sha256) is verified before any byte of it is deserialized; a
serialized executable (a pickle) is loaded only when its target's fingerprint equals this
process's and the trust policy allows it. The compile counter is sealed by the caller only after
every executable exists, so anything compiled later shows up as a compile after ready.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export
from jax.sharding import Mesh

from aotlm.bundle import DECODER, Bundle, Manifest, open_bundle
from aotlm.bundle.executables import compile_exported, load_compiled
from aotlm.bundle.fingerprint import fingerprint_diff, local_fingerprint, local_platform
from aotlm.bundle.format import MANIFEST_FILE, WEIGHTS_FILE
from aotlm.bundle.manifest import BucketKey, CompiledTarget, Function, Serving
from aotlm.errors import BundleError
from aotlm.kernels import (
    cpu_attention,
    step_inputs,  # noqa: F401  (registers the exports' input pytrees)
)
from aotlm.models import ModelConfig
from aotlm.models.bert import EncoderConfig
from aotlm.models.catalog import model_config
from aotlm.models.checkpoint import unflatten_params
from aotlm.models.llama import layer_shapes
from aotlm.models.lora import empty_lora, lora_config
from aotlm.runtime.load.compile_guard import CompileCounter
from aotlm.runtime.load.placement import (
    forward_shardings,
    place_weights,
    serving_mesh,
    sharded_zeros,
)
from aotlm.runtime.load.trust import TrustPolicy
from aotlm.safetensors_io import read_safetensors

log = logging.getLogger(__name__)


@dataclass
class LoadedBundle:
    bundle: Bundle
    model: ModelConfig | EncoderConfig
    executables: dict[BucketKey, jax.stages.Compiled]
    params: dict
    k_pages: jax.Array | None  # None for encoders: no KV cache
    v_pages: jax.Array | None
    counter: CompileCounter
    # seconds per phase, plus "tier" ("compiled" or "stablehlo") and "tier_reason" (why not compiled)
    timings: dict[str, float | str] = field(default_factory=dict)
    mesh: Mesh | None = None  # a sharded bundle's mesh (serving.mesh); None: one device

    @property
    def tier(self) -> str:
        return str(self.timings.get("tier", "stablehlo"))

    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def kind(self) -> str:
        """The model kind: decoder (generates text) or encoder (embeddings)."""
        return self.manifest.kind

    @property
    def serving(self) -> Serving:
        return self.manifest.serving

    @property
    def token_buckets(self) -> tuple[int, ...]:
        return self.manifest.buckets.tokens

    @property
    def request_buckets(self) -> tuple[int, ...]:
        return self.manifest.buckets.requests


def _check_platform(bundle: Bundle) -> None:
    platform = local_platform()
    platforms = list(bundle.manifest.serving.platforms)
    if platform not in platforms:
        raise BundleError(
            f"{bundle.path}: built for {platforms}, but this process runs on {platform!r}: "
            f"rebuild with `--target {platform}`"
        )


def _check_custom_calls(bundle: Bundle) -> None:
    """Every aotlm kernel the graphs call on this platform is registered, or the bundle is refused
    before anything is deserialized (XLA would fail later, naming only the missing target)."""
    if local_platform() != "cpu":
        return
    attention = bundle.manifest.serving.attention
    needed = attention.custom_calls if attention is not None else ()
    for target in needed:
        if target != cpu_attention.TARGET:
            raise BundleError(
                f"{bundle.path / MANIFEST_FILE}: the graphs call kernel {target!r}, which this "
                f"aotlm does not have (it has {cpu_attention.TARGET}): rebuild the bundle with "
                "this aotlm, or serve it with the aotlm that built it"
            )
        try:
            cpu_attention.require()
        except cpu_attention.KernelUnavailable as e:
            raise BundleError(
                f"{bundle.path}: {e}; or rebuild the bundle with `attention: {{cpu: jnp}}` in "
                "model.yaml"
            ) from None


def _deserialize_export(bundle: Bundle, entry: Function) -> jax_export.Exported:
    try:
        return jax_export.deserialize(bytearray(bundle.read(entry.file)))
    except Exception as e:  # a verified file that jax cannot read: written by another jax
        raise BundleError(
            f"{bundle.file(entry.file)}: jax {jax.__version__} cannot deserialize it ({e}); "
            f"the bundle was built with jax {bundle.manifest.jax_version}: rebuild it"
        ) from e


def choose_compiled_target(bundle: Bundle, trust: TrustPolicy) -> tuple[CompiledTarget | None, str]:
    """(the compiled entry this process may load, "") or (None, why the StableHLO tier is used).

    Checked in this order, all before any pickle is touched: a target compiled for this
    platform, its fingerprint equal to this process's field by field, the trust policy.
    (Every file's sha256 was verified by open_bundle already.)
    """
    platform = local_platform()
    candidates = {
        name: entry
        for name, entry in bundle.manifest.compiled.items()
        if entry.platform == platform
    }
    if not candidates:
        return None, f"the bundle has no compiled executables for {platform}"
    local = local_fingerprint(bundle.manifest.serving.tp, bundle.manifest.serving.ep)
    diffs = {}
    for name, entry in sorted(candidates.items()):
        diffs[name] = fingerprint_diff(dict(entry.fingerprint), local)
        if not diffs[name]:
            refusal = trust.refusal(bundle.path, bundle.digest)
            return (None, refusal) if refusal else (entry, "")
    name, diff = min(diffs.items(), key=lambda kv: len(kv[1]))
    return None, f"fingerprint of target {name} does not match this process: {'; '.join(diff)}"


def _load_compiled(
    bundle: Bundle, entry: CompiledTarget, devices: list
) -> dict[BucketKey, jax.stages.Compiled]:
    """Deserialize every executable of a checked compiled target, a few at a time.

    The pytree structures come from the exports: one per function name, since every bucket of a
    function has the same structure (checked against each bucket's avals in the manifest).
    """
    functions = {f.key: f for f in bundle.manifest.functions}
    trees: dict[str, jax_export.Exported] = {}
    jobs = []
    for ex in entry.executables:
        key = ex.key
        if key not in functions:
            raise BundleError(f"{bundle.file(ex.file)}: no exported function {key}: rebuild")
        if ex.name not in trees:
            trees[ex.name] = _deserialize_export(bundle, functions[key])
        exp = trees[ex.name]
        if exp.in_tree.num_leaves != len(functions[key].in_avals):
            raise BundleError(f"{bundle.file(ex.file)}: inputs do not match its export: rebuild")
        jobs.append((key, ex.file, exp))
    missing = sorted(set(functions) - {key for key, _, _ in jobs})
    if missing:
        raise BundleError(f"{bundle.path}: compiled tier lacks {missing}: rebuild it")

    def load(job):
        key, rel, exp = job
        return key, load_compiled(bundle.read(rel), exp, devices)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(pool.map(load, jobs))


def _compile_all(bundle: Bundle) -> dict[BucketKey, jax.stages.Compiled]:
    return {
        f.key: compile_exported(
            _deserialize_export(bundle, f), f.donate_argnums, ep=bundle.manifest.serving.ep
        )
        for f in bundle.manifest.functions
    }


def load_bundle(
    path: Path | str,
    counter: CompileCounter | None = None,
    trust: TrustPolicy | None = None,
) -> LoadedBundle:
    """Verify, load weights, get every function's executable; the caller seals `counter`.

    Executables come from the bundle's compiled tier when a target's fingerprint matches this
    process and `trust` (default: bundles built on this machine) allows unpickling them;
    otherwise each export is compiled here, once, and the log says why.
    """
    counter = counter or CompileCounter()
    trust = trust or TrustPolicy()
    t0 = time.perf_counter()
    bundle = open_bundle(path)
    _check_platform(bundle)
    _check_custom_calls(bundle)
    mesh = serving_mesh(bundle)  # None: one device; refused when this process has too few
    t1 = time.perf_counter()
    model = model_config(bundle.manifest.model, bundle.path)
    kv_sharding = None
    if mesh is None:
        params = unflatten_params(read_safetensors(bundle.file(WEIGHTS_FILE)))
        if bundle.manifest.serving.lora is not None:  # the adapter slots start empty
            params["lora"] = empty_lora(
                layer_shapes(model),
                lora_config(bundle.manifest.serving.lora),
                params["embed"].dtype,
            )
        params = jax.device_put(params)
    else:  # each device gets its shards, as the forward export lays them out
        forward = _deserialize_export(bundle, bundle.manifest.function("forward"))
        shardings, kv_sharding = forward_shardings(forward, mesh)
        params = place_weights(bundle.file(WEIGHTS_FILE), shardings)
    t2 = time.perf_counter()
    entry, reason = choose_compiled_target(bundle, trust)
    executables = None
    if entry is not None:
        try:
            # the default device, or the mesh's devices in the mesh's order (the executables'
            # logical device i runs on devices[i])
            devices = jax.devices()[:1] if mesh is None else list(mesh.devices.flat)
            executables = _load_compiled(bundle, entry, devices)
        except BundleError:
            raise
        except Exception as e:  # checked and still unloadable: compile instead, say so
            reason = f"deserializing the compiled tier failed ({type(e).__name__}: {e})"
    if executables is None:
        log.warning("%s: compiling StableHLO at startup: %s", bundle.path, reason)
        executables = _compile_all(bundle)
    tier = "stablehlo" if reason else "compiled"
    k_pages = v_pages = None  # encoders keep no KV cache
    if bundle.manifest.kind == DECODER:
        serving = bundle.manifest.serving
        shape = (
            model.num_layers,
            serving.kv_pages,
            serving.page_size,
            model.num_kv_heads,
            model.head_dim,
        )
        # device_put of host zeros: no compile (jnp.zeros would compile a broadcast)
        dtype = jnp.dtype(serving.kv_dtype)
        if kv_sharding is None:
            k_pages = jax.device_put(np.zeros(shape, dtype))
            v_pages = jax.device_put(np.zeros(shape, dtype))
        else:
            k_pages = sharded_zeros(shape, dtype, kv_sharding)
            v_pages = sharded_zeros(shape, dtype, kv_sharding)
    t3 = time.perf_counter()
    timings = {
        "verify_s": t1 - t0,
        "weights_s": t2 - t1,
        "executables_s": t3 - t2,
        "total_s": t3 - t0,
        "tier": tier,
        "tier_reason": reason,
    }
    if tier == "stablehlo":
        timings["compile_s"] = t3 - t2
    return LoadedBundle(
        bundle, model, executables, params, k_pages, v_pages, counter, timings, mesh
    )
