"""The manifest: the bundle's table of contents, typed, and the thing its digest is computed over.

The build constructs a `Manifest`, the reader returns one (aotlm/bundle/manifest_read.py checks
every field first), and everything else reads its attributes: defaults and field names live
here only. On disk it is msgpack of `Manifest.to_dict()` with sorted keys, so equal content gives
equal bytes. Free-form records (a model's config, a fingerprint, a memory plan, the bucket plan)
stay plain maps: their owners (models/, bundle/fingerprint.py, the planner) define them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from aotlm.bundle.format import FORMAT_NAME, FORMAT_VERSION

DECODER = "decoder"  # generation over a paged KV cache
ENCODER = "encoder"  # embeddings; no KV cache
MODEL_KINDS = (DECODER, ENCODER)

BucketKey = tuple[str, tuple[int, ...]]
Aval = tuple[tuple[int, ...], str]  # (shape, dtype name)


def kv_dtype_name(dtype: str, kv_cache_dtype: str | None) -> str:
    """The KV pages' storage dtype: uint8 holding e4m3 bits for ``kv_cache_dtype: fp8``,
    uint16 holding bfloat16 bits for a bfloat16 model (aotlm/kernels/kv_quant.py says why),
    else the model's ``dtype``."""
    if kv_cache_dtype == "fp8":
        return "uint8"
    return "uint16" if dtype == "bfloat16" else dtype


def legacy_kv_dtype_name(dtype: str, kv_cache_dtype: str | None) -> str:
    """The KV pages' dtype in bundles of format 11 and older, which do not record it: bfloat16
    pages were stored as bfloat16."""
    return "uint8" if kv_cache_dtype == "fp8" else dtype


def bucket_key(name: str, bucket: Mapping[str, int]) -> BucketKey:
    """("forward", (T,)), ("logits", (T, R)), ("sample", (R,)): tokens before requests."""
    return name, tuple(bucket[k] for k in ("tokens", "requests") if k in bucket)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Function:
    """One exported graph: exported/<name>_<bucket>.jaxexp."""

    name: str
    bucket: Mapping[str, int]  # {"tokens": T} / {"tokens": T, "requests": R} / {"requests": R}
    file: str
    donate_argnums: tuple[int, ...]
    in_avals: tuple[Aval, ...]
    out_avals: tuple[Aval, ...]
    # A sharded export: {nr_devices, in_shardings, out_shardings} (HLO sharding strings); None:
    # one device.
    shardings: Mapping[str, Any] | None = None

    @property
    def key(self) -> BucketKey:
        return bucket_key(self.name, self.bucket)


@dataclass(frozen=True)
class Executable:
    """One serialized executable of a compiled target (a pickle: see runtime/load/trust.py)."""

    name: str
    bucket: Mapping[str, int]
    file: str  # compiled/<target>/<name>_<bucket>.bin
    memory: Mapping[str, int] | None = None  # XLA's memory analysis, when it gave one

    @property
    def key(self) -> BucketKey:
        return bucket_key(self.name, self.bucket)


@dataclass(frozen=True)
class CompiledTarget:
    fingerprint: Mapping[str, Any]  # aotlm/bundle/fingerprint.py
    executables: tuple[Executable, ...]

    @property
    def platform(self) -> str:
        return str(self.fingerprint.get("platform", ""))


@dataclass(frozen=True)
class TargetEntry:
    """What the build did for one model.yaml target: its tier, why, and its memory plan."""

    tier: str  # "compiled" or "stablehlo"
    reason: str
    memory_plan: Mapping[str, Any]


@dataclass(frozen=True)
class Attention:
    """What a decoder's attention runs per platform (the Pallas kernel's resolved block sizes on
    TPU, aotlm's CPU kernel or blocked jnp on CPU) and the custom calls a loader must have."""

    impl: str
    kernel: str
    block_sizes: Mapping[str, int]
    cpu: str  # "kernel" or "jnp"
    custom_calls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Serving:
    """The shapes the graphs were built for; the KV fields are None for encoders."""

    dtype: str
    max_seq_len: int
    targets: tuple[str, ...]
    platforms: tuple[str, ...]
    tp: int = 1  # tensor-parallel degree (model.yaml mesh.tp); 1: one device
    ep: int = 1  # expert-parallel degree (model.yaml mesh.ep); the mesh has tp * ep devices
    page_size: int | None = None
    kv_pages: int | None = None
    pages_per_seq: int | None = None
    decode_steps: int = 1  # K of decode[R]; 1: the bundle has no decode graphs
    attention: Attention | None = None
    kv_cache_dtype: str | None = None  # "fp8": e4m3 KV pages; None: pages in `dtype`
    # The pages' storage dtype (kv_dtype_name); None in bundles of format 11 and older.
    kv_pages_dtype: str | None = None
    # model.yaml `lora:` as {max_loras, max_rank, targets} (aotlm/models/lora.py): forward and
    # decode take adapter slots; None: no adapters.
    lora: Mapping[str, Any] | None = None

    @property
    def kv_dtype(self) -> str:
        """The KV pages' dtype name (jnp.dtype takes it)."""
        if self.kv_pages_dtype is not None:
            return self.kv_pages_dtype
        return legacy_kv_dtype_name(self.dtype, self.kv_cache_dtype)


@dataclass(frozen=True)
class ModelInfo:
    kind: str  # DECODER or ENCODER
    architecture: str  # the HF architecture name
    config: Mapping[str, Any]  # the family's config, as its to_dict wrote it
    pooling: str | None = None  # encoders: how token states become one embedding
    normalize: bool | None = None  # encoders: L2-normalized embeddings


@dataclass(frozen=True)
class Buckets:
    tokens: tuple[int, ...]
    requests: tuple[int, ...]
    plan: Mapping[str, Any] | None = None  # the planner's result, when model.yaml planned them


@dataclass(frozen=True)
class Manifest:
    name: str
    model: ModelInfo
    serving: Serving
    buckets: Buckets
    functions: tuple[Function, ...]
    compiled: Mapping[str, CompiledTarget]  # target name -> its executables
    targets: Mapping[str, TargetEntry]
    aotlm_version: str
    jax_version: str
    jaxlib_version: str
    files: Mapping[str, FileEntry] = field(default_factory=dict)  # filled by the writer
    format_version: int = FORMAT_VERSION
    # Bytes and dtypes of the weights per kind (aotlm/models/quantize.py weights_by_kind).
    weights: Mapping[str, Any] = field(default_factory=dict)
    # What was quantized and how, and the quality gate's figures (aotlm/build/quality.py);
    # None: an unquantized bundle.
    quantization: Mapping[str, Any] | None = None

    @property
    def kind(self) -> str:
        return self.model.kind

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    def function(self, name: str) -> Function:
        """The first bucket of function `name` (every bucket has the same pytree structure)."""
        return next(f for f in self.functions if f.name == name)

    def to_dict(self) -> dict:
        """The wire form (what is packed and hashed)."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "aotlm_version": self.aotlm_version,
            "jax_version": self.jax_version,
            "jaxlib_version": self.jaxlib_version,
            "name": self.name,
            "model": _model_dict(self.model),
            "serving": _serving_dict(self.serving),
            "buckets": _buckets_dict(self.buckets),
            "functions": [_function_dict(f) for f in self.functions],
            "compiled": {
                t: {
                    "fingerprint": dict(c.fingerprint),
                    "executables": [_executable_dict(e) for e in c.executables],
                }
                for t, c in self.compiled.items()
            },
            "targets": {
                t: {"tier": e.tier, "reason": e.reason, "memory_plan": dict(e.memory_plan)}
                for t, e in self.targets.items()
            },
            "files": {p: {"sha256": e.sha256, "size": e.size} for p, e in self.files.items()},
            "weights": dict(self.weights),
        } | ({"quantization": dict(self.quantization)} if self.quantization is not None else {})


def _model_dict(m: ModelInfo) -> dict:
    out = {"kind": m.kind, "architecture": m.architecture, "config": dict(m.config)}
    if m.kind == ENCODER:
        out |= {"pooling": m.pooling, "normalize": m.normalize}
    return out


def _serving_dict(s: Serving) -> dict:
    out: dict[str, Any] = {
        "dtype": s.dtype,
        "max_seq_len": s.max_seq_len,
        "targets": list(s.targets),
        "platforms": list(s.platforms),
    }
    if s.page_size is not None:  # a decoder: its KV cache and decode graphs
        out |= {
            "page_size": s.page_size,
            "kv_pages": s.kv_pages,
            "pages_per_seq": s.pages_per_seq,
            "decode_steps": s.decode_steps,
        }
        if s.kv_cache_dtype is not None:
            out["kv_cache_dtype"] = s.kv_cache_dtype
        if s.kv_pages_dtype is not None:
            out["kv_dtype"] = s.kv_pages_dtype
        if s.lora is not None:
            out["lora"] = dict(s.lora)
    if s.attention is not None:
        a = s.attention
        out["attention"] = {
            "impl": a.impl,
            "kernel": a.kernel,
            "block_sizes": dict(a.block_sizes),
            "cpu": a.cpu,
            "custom_calls": list(a.custom_calls),
        }
    if s.tp * s.ep > 1:
        out["mesh"] = {"tp": s.tp} | ({"ep": s.ep} if s.ep > 1 else {})
    return out


def _buckets_dict(b: Buckets) -> dict:
    out: dict[str, Any] = {"tokens": list(b.tokens), "requests": list(b.requests)}
    if b.plan is not None:
        out["plan"] = dict(b.plan)
    return out


def _function_dict(f: Function) -> dict:
    return {
        "name": f.name,
        "bucket": dict(f.bucket),
        "file": f.file,
        "donate_argnums": list(f.donate_argnums),
        "in_avals": [[list(shape), dtype] for shape, dtype in f.in_avals],
        "out_avals": [[list(shape), dtype] for shape, dtype in f.out_avals],
        **dict(f.shardings or {}),
    }


def _executable_dict(e: Executable) -> dict:
    return {
        "name": e.name,
        "bucket": dict(e.bucket),
        "file": e.file,
        "memory": dict(e.memory) if e.memory is not None else None,
    }


def _sorted(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def pack_manifest(manifest: Manifest | Mapping[str, Any]) -> bytes:
    """msgpack with sorted keys. A raw wire dict is accepted too (tools and tests that write a
    document as-is, hostile ones included: the reader must refuse those)."""
    doc = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    return msgpack.packb(_sorted(doc), use_bin_type=True)
