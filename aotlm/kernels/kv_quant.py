"""The fp8 KV cache: e4m3 pages with one scale per layer for keys and one for values.

``quantization: {kv_cache_dtype: fp8}`` stores each page element as the bits of
``e4m3(x / scale)`` in uint8 (for the reason weights are stored so: XLA:CPU widens a float8
array before it fuses anything; aotlm/kernels/quant_matmul.py). The scales are per layer, f32
``[L, 2]`` (keys, values) in the params pytree as ``kv_scale``, calibrated by the build on the
evaluation text: ``max |k|`` (resp. ``|v|``) of the layer over the text / 448, e4m3's largest
value; a value past it at serving time saturates to +-448 * scale rather than overflowing.

The attention kernels never see the scales: a per-layer scale factors out of both products,
``q . (k * s_k) == (q * s_k) . k`` and ``sum p (v * s_v) == s_v * sum p v``, so
``paged_attention`` folds ``s_k`` into the queries and ``s_v`` into the output, and every
implementation (the jnp reference, the blocked jnp path, the Pallas kernel, the C++ kernel)
only decodes e4m3 bits to floats, exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels.quant_matmul import E4M3, E4M3_BITS, e4m3_bits_to_f32

E4M3_MAX = 448.0
KV_CACHE_DTYPES = ("fp8",)


def is_e4m3(pages: jax.Array) -> bool:
    """Whether a KV page pool holds e4m3 bits (the fp8 cache)."""
    return pages.dtype == E4M3_BITS


def encode(x: jax.Array, scale: jax.Array) -> jax.Array:
    """uint8 e4m3 bits of ``x / scale``, saturated at +-448 (e4m3fn has no infinity: past 448
    the convert would make NaN)."""
    y = jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX)
    return jax.lax.bitcast_convert_type(y.astype(E4M3), E4M3_BITS)


def decode(pages: jax.Array, dtype) -> jax.Array:
    """KV elements as ``dtype``: e4m3 bits decoded by integer operations (exact, and fused by
    XLA:CPU where its float8 convert is a slow software loop), other dtypes converted. Without
    the scale, which ``paged_attention`` applies outside."""
    if not is_e4m3(pages):
        return pages.astype(dtype)
    return (e4m3_bits_to_f32(pages) * jnp.float32(2.0**8)).astype(dtype)


def scaled(attend, q: jax.Array, kv_scale: jax.Array | None) -> jax.Array:
    """``attend(q')`` over an fp8 cache with the layer's ``kv_scale`` (f32 [2]) folded in: q
    times the key scale in, the output times the value scale out (None: ``attend(q)``)."""
    if kv_scale is None:
        return attend(q)
    out = attend((q.astype(jnp.float32) * kv_scale[0]).astype(q.dtype))
    return (out.astype(jnp.float32) * kv_scale[1]).astype(q.dtype)


__all__ = [
    "E4M3",
    "E4M3_MAX",
    "KV_CACHE_DTYPES",
    "decode",
    "encode",
    "is_e4m3",
    "scaled",
]
