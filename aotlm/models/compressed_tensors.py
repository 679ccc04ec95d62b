"""Pre-quantized checkpoints in the compressed-tensors format (llm-compressor's output; what
vLLM loads as ``quant_method: compressed-tensors``): int8 or fp8 weights with per-channel or
per-tensor scales, read as they are, never re-quantized.

Supported, from config.json ``quantization_config``: ``format`` ``int-quantized``,
``float-quantized`` or ``naive-quantized``; every config group's ``weights`` 8 bits, ``type``
``int`` (symmetric) or ``float`` (e4m3), ``strategy`` ``channel`` or ``tensor``, static. A
projection's tensors are ``<name>.weight`` (int8 or F8_E4M3, [out, in]) and
``<name>.weight_scale`` ([out, 1] or [out] per channel, [1] or [] per tensor). Activation
quantization (``input_activations``, W8A8) is read but not applied: the weights run w8a16, the
activations in the serving dtype (more precise than the checkpoint asks; ``input_scale``
tensors are not read). A projection the checkpoint left unquantized (``ignore``) is quantized
by the build with the checkpoint's scheme, and a quantized tensor aotlm keeps in high
precision (the LM head) is dequantized. Anything else (4-bit packing, groups or blocks,
asymmetric zero points, sparsity, a KV cache scheme, another ``quant_method``) is refused,
naming the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from aotlm.errors import CheckpointError

FORMATS = ("int-quantized", "float-quantized", "naive-quantized")
STRATEGIES = ("channel", "tensor")
SCALE_SUFFIX = "_scale"  # <name>.weight -> <name>.weight_scale
IGNORED_SUFFIXES = (".input_scale", ".output_scale")  # activation scales: not applied
_STORED = {"int": np.dtype(np.int8), "float": np.dtype(ml_dtypes.float8_e4m3fn)}
_SCHEME = {"int": "int8", "float": "fp8"}
_SCALE_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


@dataclass(frozen=True)
class PreQuantized:
    """What a compressed-tensors checkpoint holds: aotlm's scheme name and the layout."""

    scheme: str  # "int8" or "fp8"
    strategy: str  # "channel" or "tensor"
    format: str
    activations: str | None  # the checkpoint's activation scheme, not applied (None: none)


def _refuse(path: Path, key: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: quantization_config.{key}: {what}; aotlm reads compressed-tensors checkpoints "
        f"with 8-bit int or fp8 weights, per channel or per tensor ({', '.join(FORMATS)})"
    )


def read_prequantized(checkpoint_dir: Path) -> PreQuantized | None:
    """The checkpoint's quantization (None: not quantized); refuses what aotlm cannot serve."""
    path = Path(checkpoint_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the config reader reports an unreadable config.json
    q = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    if not q:
        return None
    if not isinstance(q, dict):
        raise _refuse(path, "", f"expected a mapping, got {q!r}")
    method = q.get("quant_method")
    if method != "compressed-tensors":
        raise _refuse(path, "quant_method", f"{method!r} is not supported")
    fmt = q.get("format")
    if fmt not in FORMATS:
        raise _refuse(path, "format", f"{fmt!r} is not supported")
    for key in ("sparsity_config", "kv_cache_scheme", "transform_config"):
        if q.get(key):
            raise _refuse(path, key, "is not supported (remove it or use an unquantized model)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(path, "config_groups", "expected at least one group")
    seen: set[tuple[str, str]] = set()
    activations = None
    for name, group in groups.items():
        at = f"config_groups.{name}"
        w = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(w, dict):
            raise _refuse(path, f"{at}.weights", "expected the weights' quantization arguments")
        if w.get("num_bits") != 8:
            raise _refuse(path, f"{at}.weights.num_bits", f"{w.get('num_bits')!r} is not 8")
        if w.get("type") not in _STORED:
            raise _refuse(path, f"{at}.weights.type", f"{w.get('type')!r} is not int or float")
        if w.get("strategy") not in STRATEGIES:
            raise _refuse(path, f"{at}.weights.strategy", f"{w.get('strategy')!r} is not supported")
        if w.get("symmetric") is False:
            raise _refuse(
                path, f"{at}.weights.symmetric", "asymmetric (zero points) is not supported"
            )
        if w.get("dynamic"):
            raise _refuse(path, f"{at}.weights.dynamic", "dynamic weight scales are not supported")
        if w.get("group_size") or w.get("block_structure"):
            raise _refuse(path, f"{at}.weights", "group or block scales are not supported")
        targets = group.get("targets")
        if targets not in (["Linear"], "Linear"):
            raise _refuse(path, f"{at}.targets", f'{targets!r}: only ["Linear"] is supported')
        seen.add((w["type"], w["strategy"]))
        a = group.get("input_activations")
        if isinstance(a, dict):
            activations = f"{a.get('type', '?')}{a.get('num_bits', '?')} {a.get('strategy', '?')}"
    if len(seen) != 1:
        raise _refuse(path, "config_groups", f"mixed weight schemes {sorted(seen)}")
    ((kind, strategy),) = seen
    return PreQuantized(_SCHEME[kind], strategy, fmt, activations)


def read_quantized(files: dict, name: str, hf_shape: tuple[int, ...], pq: PreQuantized):
    """(q [out, in] as stored, f32 scale [out]) of one quantized projection ``name``
    (``<..>.weight``); None when the checkpoint left it unquantized. Errors name the tensor."""
    f = files[name]
    if f.dtype(name) in _SCALE_DTYPES:
        return None  # in `ignore`: high precision
    if f.dtype(name) != _STORED["int" if pq.scheme == "int8" else "float"]:
        raise CheckpointError(
            f"{f.path}: tensor {name!r} has dtype {f.dtype(name)}, want "
            f"{'int8' if pq.scheme == 'int8' else 'F8_E4M3'} (quantization_config says {pq.scheme})"
        )
    if f.shape(name) != hf_shape:
        raise CheckpointError(
            f"{f.path}: tensor {name!r} has shape {f.shape(name)}, want {hf_shape}"
        )
    scale_name = name + SCALE_SUFFIX
    if scale_name not in files:
        raise CheckpointError(f"{f.path}: missing tensor {scale_name!r} (the scales of {name!r})")
    sf = files[scale_name]
    out = hf_shape[0]
    allowed = {"channel": ((out, 1), (out,)), "tensor": ((1,), (), (1, 1))}[pq.strategy]
    if sf.shape(scale_name) not in allowed:
        raise CheckpointError(
            f"{sf.path}: tensor {scale_name!r} has shape {sf.shape(scale_name)}, want "
            f"{' or '.join(str(s) for s in allowed)} ({pq.strategy} scales of {name!r})"
        )
    if sf.dtype(scale_name) not in _SCALE_DTYPES:
        raise CheckpointError(f"{sf.path}: tensor {scale_name!r} has dtype {sf.dtype(scale_name)}")
    scale = np.broadcast_to(sf.get(scale_name).astype(np.float32).reshape(-1), (out,))
    return f.get(name), np.ascontiguousarray(scale)


def stored_bits(q: np.ndarray) -> np.ndarray:
    """A checkpoint's quantized values as aotlm stores them (e4m3 as its uint8 bits)."""
    return q.view(np.uint8) if q.dtype == _STORED["float"] else q


def dequantized(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """f32 [out, in] of a quantized projection (one the build keeps in high precision)."""
    return q.astype(np.float32) * scale[:, None]


def tolerated(name: str) -> bool:
    """Checkpoint tensors the loader does not read (activation scales)."""
    return name.endswith(IGNORED_SUFFIXES)


def is_scale(name: str) -> bool:
    return name.endswith(".weight" + SCALE_SUFFIX)


def summary(pq: PreQuantized) -> dict[str, Any]:
    """The manifest's record of where the quantization came from."""
    out: dict[str, Any] = {"format": f"compressed-tensors {pq.format}", "strategy": pq.strategy}
    if pq.activations:
        out["activations_not_applied"] = pq.activations
    return out
