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

A bfloat16 cache is stored the same way, as the bits of bf16 in uint16 (``BF16_BITS``), for a
reason of XLA:CPU's: a scatter into a bf16 pool is not done in place (with its bf16 float
normalization, it converts the *whole* pool to f32 and back; without it, it still copies the
pool), so writing one token's keys into the bf16 pool of a 0.6B model (28 layers, 1025 pages
of 16: 0.94 GB) took 1.7 s where the same write into float32 or uint16 pages takes 0.03 ms
(measured, jax 0.10.2). A bitcast of the pool inside the graph is no way out: XLA:CPU
materializes it (0.33 s). So the pool is uint16 at the graph boundary; only the step's own keys
are bitcast on the way in, and the pages a kernel reads on the way out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels.quant_matmul import E4M3, E4M3_BITS, e4m3_bits_to_f32

E4M3_MAX = 448.0
KV_CACHE_DTYPES = ("fp8",)
BF16_BITS = jnp.dtype(jnp.uint16)  # how a bfloat16 cache is stored (see the module note)


def is_e4m3(pages: jax.Array) -> bool:
    """Whether a KV page pool holds e4m3 bits (the fp8 cache)."""
    return pages.dtype == E4M3_BITS


def is_bits(pages: jax.Array) -> bool:
    """Whether KV pages hold bits to decode (e4m3 in uint8, bfloat16 in uint16) rather than
    floats a kernel reads as they are."""
    return pages.dtype in (E4M3_BITS, BF16_BITS)


def store(x: jax.Array, pages: jax.Array) -> jax.Array:
    """New keys or values as ``pages`` hold them (bf16 bits for a uint16 pool; e4m3 bits are
    ``encode``'s, which needs the scale)."""
    if pages.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(pages.dtype)


def encode(x: jax.Array, scale: jax.Array) -> jax.Array:
    """uint8 e4m3 bits of ``x / scale``, saturated at +-448 (e4m3fn has no infinity: past 448
    the convert would make NaN)."""
    y = jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX)
    return jax.lax.bitcast_convert_type(y.astype(E4M3), E4M3_BITS)


def decode(pages: jax.Array, dtype) -> jax.Array:
    """KV elements as ``dtype``: e4m3 bits decoded by integer operations (exact, and fused by
    XLA:CPU where its float8 convert is a slow software loop), bf16 bits bitcast, other dtypes
    converted. Without the scale, which ``paged_attention`` applies outside."""
    if pages.dtype == BF16_BITS:
        return jax.lax.bitcast_convert_type(pages, jnp.bfloat16).astype(dtype)
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
    "BF16_BITS",
    "E4M3",
    "E4M3_MAX",
    "KV_CACHE_DTYPES",
    "decode",
    "encode",
    "is_bits",
    "is_e4m3",
    "scaled",
    "store",
]
