"""The fp8 KV cache (aotlm/kernels/kv_quant.py): e4m3 pages, per-layer scales, every attention
implementation reading them as the reference reads the dequantized cache."""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from aotlm.kernels import kv_quant
from aotlm.kernels.attention import paged_attention
from aotlm.kernels.attention_reference import paged_attention_ref, write_kv
from tests.test_paged_attention import CASES, SMALL, assert_close, ragged_batch, run


def test_e4m3_round_trip_within_its_precision():
    """Encoding is e4m3's round-to-nearest-even of x / scale (numpy's ml_dtypes as the oracle),
    decoding is exact: a normal value comes back within half a unit of e4m3's 3-bit mantissa
    (relative 2^-4); past 448 * scale it saturates instead of becoming NaN."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * np.exp(rng.uniform(-6, 3, 4096))).astype(np.float32)
    scale = np.float32(np.abs(x).max() / 448)
    bits = np.asarray(jax.jit(kv_quant.encode)(x, scale))
    expected = (x / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(bits, expected)
    back = np.asarray(jax.jit(kv_quant.decode, static_argnums=1)(bits, jnp.float32)) * scale
    np.testing.assert_array_equal(
        back, bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
    )
    normal = np.abs(x / scale) >= 2.0**-6
    rel = np.abs(back - x)[normal] / np.abs(x)[normal]
    assert rel.max() <= 2.0**-4 + 1e-7
    sub = ~normal  # subnormals: absolute error at most half the smallest step, 2^-10 * scale
    assert np.abs(back - x)[sub].max() <= 2.0**-10 * scale * (1 + 1e-6)
    over = np.asarray(kv_quant.encode(jnp.asarray([1e6, -1e6, 448.0 * 3]), jnp.float32(1.0)))
    decoded = over.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(decoded, [448.0, -448.0, 448.0])


def _fp8(args, scales):
    """The batch's f32 pages as e4m3 bits with per-tensor scales, and their dequantized values."""
    q, k, v, *rest = args
    bits = [kv_quant.encode(a, s) for a, s in zip((k, v), scales, strict=True)]
    exact = [kv_quant.decode(b, jnp.float32) * s for b, s in zip(bits, scales, strict=True)]
    return (q, *bits, *rest), (q.astype(jnp.float32), *exact, *rest)


def _scales(args):
    return jnp.asarray([jnp.abs(args[1]).max() / 448, jnp.abs(args[2]).max() / 448], jnp.float32)


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "page_size", "dtype"), CASES[::3])
@pytest.mark.parametrize("impl", ["reference", "blocked", "cpu", "interpret"])
def test_every_attention_reads_fp8_pages_as_the_reference_reads_their_values(
    head_dim, heads, kv_heads, page_size, dtype, impl
):
    seed = zlib.crc32(repr((head_dim, heads, kv_heads, page_size, "fp8")).encode())
    args, scale = ragged_batch(
        seed, head_dim=head_dim, heads=heads, kv_heads=kv_heads, page_size=page_size,
        dtype=jnp.float32,
    )  # fmt: skip
    scales = _scales(args) * 3.0  # not 1: the fold into q and the output is what is tested
    fp8, exact = _fp8(args, scales)
    fp8 = (fp8[0].astype(dtype), *fp8[1:])
    kwargs = {"block_sizes": SMALL} if impl == "interpret" else {}
    out = run(lambda *a: paged_attention(*a, scale, impl=impl, kv_scale=scales, **kwargs), *fp8)
    assert out.dtype == dtype and out.shape == args[0].shape
    ref = run(lambda *a: paged_attention_ref(*a, scale), *exact)
    assert_close(out, ref, dtype)


def test_fp8_pages_against_the_unquantized_cache():
    """What the cache costs: attention over e4m3 pages stays within a few percent of attention
    over the f32 pages they were made from (the bound tests/test_quantization.py's bundle
    bounds rest on)."""
    args, scale = ragged_batch(7, head_dim=64, heads=8, kv_heads=2, page_size=16)
    fp8, _ = _fp8(args, _scales(args))
    out = run(lambda *a: paged_attention(*a, scale, impl="blocked", kv_scale=_scales(args)), *fp8)
    ref = np.asarray(run(lambda *a: paged_attention_ref(*a, scale), *args))
    err = np.abs(np.asarray(out) - ref).max() / np.abs(ref).max()
    assert err < 0.06, err


def test_write_kv_encodes_with_the_layer_scale():
    pages = jnp.zeros((2, 3, 4, 1, 8), jnp.uint8)
    k = jnp.linspace(-2.0, 2.0, 16).reshape(2, 1, 8)
    v = -k
    slots = jnp.asarray([5, 6], jnp.int32)  # page 1, offsets 1 and 2
    scale = jnp.asarray([0.01, 0.02], jnp.float32)
    kp, vp = jax.jit(write_kv)(pages, pages, 1, k, v, slots, scale)
    np.testing.assert_array_equal(kp[1, 1, 1:3], kv_quant.encode(k, scale[0]))
    np.testing.assert_array_equal(vp[1, 1, 1:3], kv_quant.encode(v, scale[1]))
    assert not np.asarray(kp[0]).any() and not np.asarray(vp[:, 0]).any()
    with pytest.raises(ValueError, match="needs the layer's kv_scale"):
        write_kv(pages, pages, 1, k, v, slots)
