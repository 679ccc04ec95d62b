"""The grouped expert MLP (aotlm/kernels/grouped_mlp.py) against its jnp twin, every path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from aotlm.kernels.grouped_mlp import block_rows, grouped_mlp


def _case(t, k, e, h=32, i=24, seed=0, nowhere=0.2, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((e, h, i), (e, h, i), (e, i, h))]
    x = rng.normal(size=(t, h)).astype(np.float32)
    expert = np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)
    expert[rng.random((t, k)) < nowhere] = e  # routed nowhere (padding, another device's)
    weight = rng.random((t, k)).astype(np.float32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), *(cast(a) for a in w), jnp.asarray(expert), jnp.asarray(weight)


@pytest.mark.parametrize("impl", ["blocked", "ragged", "auto"])
@pytest.mark.parametrize(
    ("t", "k", "e"), [(1, 2, 8), (5, 2, 8), (16, 4, 16), (64, 8, 8), (300, 2, 4)]
)
def test_every_path_equals_the_dense_twin(impl, t, k, e):
    args = _case(t, k, e, seed=t)
    ref = grouped_mlp(*args, impl="reference")
    out = jax.jit(lambda *a: grouped_mlp(*a, impl=impl))(*args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_tokens_routed_nowhere_get_nothing_and_cost_no_block():
    x, wg, wu, wd, expert, weight = _case(8, 2, 8, nowhere=0.0)
    expert = expert.at[3:].set(8).at[:3].set(jnp.asarray([[0, 1], [1, 0], [0, 1]]))
    out = np.asarray(
        jax.jit(lambda *a: grouped_mlp(*a, impl="blocked"))(x, wg, wu, wd, expert, weight)
    )
    assert not out[3:].any() and np.abs(out[:3]).min() > 0
    # Negative ids (an expert-parallel device's view of another's experts) route nowhere too.
    out_neg = jax.jit(grouped_mlp)(x, wg, wu, wd, expert.at[3:].set(-5), weight)
    np.testing.assert_array_equal(np.asarray(out_neg), out)


def test_bfloat16_close_to_float32():
    args32 = _case(16, 2, 8)
    args16 = _case(16, 2, 8, dtype=jnp.bfloat16)
    ref = np.asarray(grouped_mlp(*args32, impl="reference"))
    out = np.asarray(jax.jit(grouped_mlp)(*args16), np.float32)
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()


def test_block_rows_follow_the_expected_rows_per_expert():
    assert block_rows(1, 2, 8) == 8 and block_rows(16, 2, 8) == 8
    assert block_rows(256, 4, 32) == 32 and block_rows(1024, 4, 8) == 128


def test_one_export_carries_the_loop_for_cpu_and_ragged_dot_for_tpu():
    args = _case(16, 2, 8)
    cpu = export.export(jax.jit(grouped_mlp), platforms=("cpu",))(*args).mlir_module()
    tpu = export.export(jax.jit(grouped_mlp), platforms=("tpu",))(*args).mlir_module()
    both = export.export(jax.jit(grouped_mlp), platforms=("cpu", "tpu"))(*args)
    assert "stablehlo.while" in cpu and "chlo.ragged_dot" not in cpu
    assert "chlo.ragged_dot" in tpu and "stablehlo.while" not in tpu
    assert both.platforms == ("cpu", "tpu")
    np.testing.assert_allclose(
        np.asarray(both.call(*args)),
        np.asarray(grouped_mlp(*args, impl="reference")),
        rtol=2e-5,
        atol=2e-5,
    )


@pytest.mark.parametrize("impl", ["blocked", "ragged", "auto", "reference"])
def test_stacked_layers_with_an_index_equal_the_layers_slice(impl):
    x, wg, wu, wd, expert, weight = _case(16, 2, 8)
    stack = [jnp.stack([w * 0.5, w, w * 2.0]) for w in (wg, wu, wd)]
    fn = jax.jit(lambda layer: grouped_mlp(x, *stack, expert, weight, layer, impl=impl))
    for layer in range(3):
        ref = grouped_mlp(x, *(w[layer] for w in stack), expert, weight, impl="reference")
        np.testing.assert_allclose(np.asarray(fn(layer)), np.asarray(ref), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("impl", ["blocked", "ragged", "auto"])
def test_quantized_experts_equal_the_dense_twin_on_their_dequantized_weights(impl, scheme):
    """Every path over {weight, scale} experts (ragged: the scale applied per row after the
    dot, the TPU/GPU path) equals the reference on the dequantized weights."""
    from aotlm.models.quantize import dequantize_weight, quantize_weight

    x, *ws, expert, weight = _case(16, 4, 8, seed=3)
    quantized = [quantize_weight(np.asarray(w), scheme) for w in ws]
    ref = grouped_mlp(
        x, *(jnp.asarray(dequantize_weight(q)) for q in quantized), expert, weight,
        impl="reference",
    )  # fmt: skip
    out = jax.jit(lambda *a: grouped_mlp(*a, impl=impl))(x, *quantized, expert, weight)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5)
