"""Weight-only quantization at build time: which tensors, how, and what the params become.

Schemes (model.yaml ``quantization: {weights: ...}``):

- ``int8``: symmetric per output channel, ``scale = max|w| / 127`` over the input axis,
  ``q = round_half_even(w / scale)`` in [-127, 127].
- ``fp8``: e4m3 (float8_e4m3fn) per output channel, ``scale = max|w| / 448``, ``q = e4m3(w /
  scale)`` rounded to nearest even, stored as its bits in uint8 (aotlm/kernels/quant_matmul.py
  says why).

Quantized: every linear projection of the layers: attention's q/k/v/o, the MLP's gate/up/down,
the experts and the shared expert. Kept in the serving dtype, a documented choice: the
embedding and the LM head (a token's row is read once per step either way and the logits are
where quantization error shows most), norms, biases and the MoE routers (top-k selection is
sensitive to small errors and the routers are tiny). Scales are f32. A quantized tensor ``wq``
becomes ``{"weight": q, "scale": s}`` in the params pytree (aotlm/kernels/quant_matmul.py).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np

from aotlm.kernels.quant_matmul import is_quantized

SCHEMES = ("int8", "fp8")
KEPT = ["embedding", "lm_head", "norms", "biases", "routers"]  # in the serving dtype
QUANTIZED_KEYS = (
    "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
    "we_gate", "we_up", "we_down", "ws_gate", "ws_up", "ws_down",
    "w_in", "w_out",  # the encoders' (aotlm/models/bert.py) MLP
)  # fmt: skip
STORAGE = {"int8": np.dtype(np.int8), "fp8": np.dtype(np.uint8)}  # fp8: e4m3 bits
_QMAX = {"int8": 127.0, "fp8": 448.0}


def channel_scales(w: np.ndarray, scheme: str) -> np.ndarray:
    """f32 [..., out] scales of a [..., in, out] weight (1 where a channel is all zeros)."""
    amax = np.max(np.abs(w.astype(np.float32)), axis=-2)
    return np.where(amax > 0, amax / _QMAX[scheme], 1.0).astype(np.float32)


def quantize_weight(w: np.ndarray, scheme: str) -> dict[str, np.ndarray]:
    """A [..., in, out] float weight -> {"weight": int8 | e4m3, "scale": f32 [..., out]}."""
    scale = channel_scales(w, scheme)
    x = w.astype(np.float32) / scale[..., None, :]
    if scheme == "int8":
        q = np.clip(np.rint(x), -127, 127).astype(np.int8)
    else:
        q = np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return {"weight": q, "scale": scale}


def dequantize_weight(w: dict[str, np.ndarray]) -> np.ndarray:
    """The numpy reference: q * scale in f32."""
    q = w["weight"]
    q = q.view(ml_dtypes.float8_e4m3fn) if q.dtype == np.uint8 else q
    return q.astype(np.float32) * w["scale"][..., None, :]


def quantize_params(params: dict, scheme: str | None) -> dict:
    """The params pytree with every ``QUANTIZED_KEYS`` layer tensor quantized (numpy, host)."""
    if scheme is None:
        return params
    layers = {
        k: quantize_weight(v, scheme) if k in QUANTIZED_KEYS else v
        for k, v in params["layers"].items()
    }
    return {**params, "layers": layers}


def quantized_avals(params: dict, scheme: str | None) -> dict:
    """``quantize_params`` on ShapeDtypeStructs: what the graphs take."""
    if scheme is None:
        return params

    def aval(a):
        scale_shape = (*a.shape[:-2], a.shape[-1])
        return {
            "weight": jax.ShapeDtypeStruct(a.shape, STORAGE[scheme]),
            "scale": jax.ShapeDtypeStruct(scale_shape, np.float32),
        }

    layers = {k: aval(v) if k in QUANTIZED_KEYS else v for k, v in params["layers"].items()}
    return {**params, "layers": layers}


def quantized_spec(spec: Any) -> dict:
    """A weight's PartitionSpec -> its quantized form's: the scale's is the weight's with the
    input axis (second to last) dropped, so scales split with their output channels."""
    parts = tuple(spec)
    scale = type(spec)(*parts[:-2], parts[-1]) if len(parts) >= 2 else spec
    return {"weight": spec, "scale": scale}


def quantized_specs(specs: dict, scheme: str | None) -> dict:
    """``param_specs`` with the structure of ``quantized_avals``."""
    if scheme is None:
        return specs
    layers = {
        k: quantized_spec(v) if k in QUANTIZED_KEYS else v for k, v in specs["layers"].items()
    }
    return {**specs, "layers": layers}


_KINDS = {
    "embed": "embedding", "lm_head": "lm_head", "final_norm": "norms",
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "bq": "attention", "bk": "attention", "bv": "attention",
    "w_gate": "mlp", "w_up": "mlp", "w_down": "mlp", "w_in": "mlp", "w_out": "mlp",
    "bo": "attention", "b_in": "mlp", "b_out": "mlp",
    "word_emb": "embedding", "pos_emb": "embedding", "type_emb": "embedding",
    "we_gate": "experts", "we_up": "experts", "we_down": "experts",
    "ws_gate": "shared_expert", "ws_up": "shared_expert", "ws_down": "shared_expert",
    "router": "router", "ws_router": "router", "kv_scale": "kv_scales",
}  # fmt: skip


def weights_by_kind(params: dict) -> dict[str, dict[str, Any]]:
    """{kind: {"bytes": n, "dtypes": [...]}} over a params pytree (arrays or avals), scales
    counted as their own kind: what `aotlm inspect` shows."""
    out: dict[str, dict[str, Any]] = {}

    def add(kind: str, a, name: str | None = None) -> None:
        entry = out.setdefault(kind, {"bytes": 0, "dtypes": []})
        entry["bytes"] += int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
        name = name or str(np.dtype(a.dtype))
        if name not in entry["dtypes"]:
            entry["dtypes"].append(name)

    flat = {**{k: v for k, v in params.items() if k != "layers"}, **params.get("layers", {})}
    for key, value in flat.items():
        kind = _KINDS.get(key, "norms")
        if is_quantized(value):
            bits = np.dtype(value["weight"].dtype) == np.uint8
            add(kind, value["weight"], "float8_e4m3fn" if bits else None)
            add("scales", value["scale"])
        else:
            add(kind, value)
    return {k: out[k] for k in sorted(out)}
