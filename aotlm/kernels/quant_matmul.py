"""Matmuls over weight-only quantized weights (w8a16): int8 or fp8 (e4m3) weights, one f32 scale
per output channel.

A quantized weight is a dict ``{"weight": int8 | uint8 [..., in, out], "scale": f32 [..., out]}``
(aotlm/models/quantize.py makes them): int8 values, or uint8 holding float8_e4m3fn bits. Why
bits in uint8 rather than the float8 type: XLA:CPU widens every float8 array to a wider float
before it fuses anything (a float8 weight costs a full f32 copy per step, whatever the graph
does with it), while a uint8 array fuses like int8. A per-output-channel scale factors out of
the contraction, ``x @ (q * s) == (x @ q) * s``, so the dot reads the 1-byte weights and the
scale multiplies its [T, out] result. ``dequantize`` is the jnp twin and oracle.

What each platform runs (chosen inside the graph by a per-platform lowering rule, as paged
attention is, so one multi-platform export carries both):

- CPU: f32 operands. XLA:CPU fuses an int8 -> f32 convert into the dot (28 layers of a
  1024x3072 matrix at batch 1: 9.7 ms from int8 vs 21 ms from f32 and 148 ms from bf16, whose
  dot XLA:CPU emulates). Its e4m3 -> f32 convert is a slow per-element software routine (122
  ms), so e4m3 is decoded with integer operations instead (``e4m3_bits_to_f32``), exact for
  every finite value, which XLA fuses into the dot (13.7 ms).
- Elsewhere (TPU, GPU): the weight converted to the activations' dtype (exact for int8 and e4m3
  in bf16) and the dot accumulated in f32: the MXU / tensor cores stay on bf16.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E4M3_BITS = jnp.dtype(jnp.uint8)  # how e4m3 weights and KV pages are stored
_E4M3_SHIFT = 2.0**8  # e4m3_bits_to_f32 returns the value times 2^-8


def is_quantized(w: Any) -> bool:
    return isinstance(w, dict) and "scale" in w


def dequantize(w: Any, dtype=jnp.float32) -> jax.Array:
    """The weight as ``dtype`` (the twin: q * scale, in f32 then cast)."""
    if not is_quantized(w):
        return w.astype(dtype)
    q = values(w["weight"], jnp.float32)
    return (q * jnp.expand_dims(w["scale"], -2)).astype(dtype)


def values(weight: jax.Array, dtype) -> jax.Array:
    """A quantized weight's values (int8, or e4m3 from its bits) as ``dtype``, by a plain
    convert: what TPU and GPU fuse into their matmuls (CPU: see ``_cpu``)."""
    weight = e4m3_from_bits(weight) if weight.dtype == E4M3_BITS else weight
    return weight.astype(dtype)


def e4m3_from_bits(bits: jax.Array) -> jax.Array:
    """uint8 e4m3 bits -> float8_e4m3fn (free on TPU and GPU, which convert it natively)."""
    return jax.lax.bitcast_convert_type(bits, E4M3)


def e4m3_bits_to_f32(bits: jax.Array) -> jax.Array:
    """uint8 e4m3 bits -> f32 times 2^-8, by integer operations (see the module note): the 7
    magnitude bits shifted under float16's exponent (bias 15 against e4m3's 7) and the sign
    bit moved to bit 15 make a float16 that is the value times 2^-8, subnormals included, and
    float16 -> f32 is exact. Not f32 bits directly: e4m3's subnormals would be f32 subnormals,
    which XLA:CPU flushes to zero."""
    u = bits.astype(jnp.uint16)
    half = ((u & 0x7F) << 7) | ((u & 0x80) << 8)
    return jax.lax.bitcast_convert_type(half, jnp.float16).astype(jnp.float32)


def _dot(x, w):
    return jax.lax.dot_general(
        x, w, (((x.ndim - 1,), (w.ndim - 2,)), ((), ())), preferred_element_type=jnp.float32
    )


def _cpu(x, weight, scale):
    scale = scale.astype(jnp.float32)
    if weight.dtype == E4M3_BITS:
        w, scale = e4m3_bits_to_f32(weight), scale * _E4M3_SHIFT
    else:
        w = weight.astype(jnp.float32)
    return (_dot(x.astype(jnp.float32), w) * scale).astype(x.dtype)


def _native(x, weight, scale):
    return (_dot(x, values(weight, x.dtype)) * scale.astype(jnp.float32)).astype(x.dtype)


def _lowering(fn):
    return lambda ctx, *args: mlir.lower_fun(fn, multiple_results=False)(ctx, *args)


_qdot_p = Primitive("aotlm_quantized_dot")
_qdot_p.def_impl(lambda *args: jax.jit(_qdot_p.bind)(*args))
_qdot_p.def_abstract_eval(
    lambda x, w, s: jax.core.ShapedArray((*x.shape[:-1], w.shape[-1]), x.dtype)
)
mlir.register_lowering(_qdot_p, _lowering(_native))
mlir.register_lowering(_qdot_p, _lowering(_cpu), platform="cpu")


def _batched(args, dims):
    # Under vmap (the experts' jnp twin) the per-platform choice is not needed: the twin.
    x, w, s = (
        jnp.moveaxis(a, d, 0) if d is not None else a for a, d in zip(args, dims, strict=True)
    )
    axes = tuple(0 if d is not None else None for d in dims)
    out = jax.vmap(lambda x, w, s: x @ dequantize({"weight": w, "scale": s}, x.dtype), axes)(
        x, w, s
    )
    return out, 0


batching.primitive_batchers[_qdot_p] = _batched


def dense_f32(x: jax.Array, w: jax.Array, *, transposed: bool = False) -> jax.Array:
    """``x @ w`` (``x @ w.T`` when `transposed`): x [..., K], w [K, N] (or [N, K]) -> f32
    [..., N]. The f32 result keeps XLA:CPU's bf16 dot on its fast matmul path (4x a bf16-result
    one at 2k rows; TPU and GPU accumulate in f32 anyway). A single bf16 row runs as two (the
    second a copy): XLA:CPU takes a one-row bf16 dot down a path ~8x slower than a two-row one
    (a 151,936 x 1024 LM head: 199 ms vs 20 ms; a 1024 x 3072 layer 0.61 vs 0.22 ms); elsewhere
    the copy costs one more row of a memory-bound dot."""
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    single = rows.shape[0] == 1 and x.dtype == jnp.bfloat16
    if single:
        rows = jnp.concatenate([rows, rows])
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    out = jax.lax.dot_general(rows, w, dims, preferred_element_type=jnp.float32)
    return (out[:1] if single else out).reshape(*lead, out.shape[-1])


def linear(x: jax.Array, w: Any) -> jax.Array:
    """``x @ w`` for a plain [in, out] weight or a quantized one; [..., in] -> [..., out] in
    x's dtype, accumulated in f32 (``dense_f32``)."""
    if not is_quantized(w):
        return dense_f32(x, w).astype(x.dtype)
    if w["weight"].ndim != 2:
        raise ValueError(f"linear takes one [in, out] weight, got {w['weight'].shape}")
    return _qdot_p.bind(x, w["weight"], w["scale"])


def take(w: Any, index) -> Any:
    """``w[index]`` for a plain or a quantized weight (an expert out of a stack)."""
    return jax.tree.map(lambda a: a[index], w)


__all__ = [
    "E4M3_BITS", "dense_f32", "dequantize", "e4m3_bits_to_f32", "e4m3_from_bits", "is_quantized",
    "linear", "take", "values",
]  # fmt: skip
