"""bfloat16 models on XLA:CPU: the KV cache stored as bf16 bits in uint16 pages, and the compile
options that keep bf16 data movement in bf16 (aotlm/kernels/kv_quant.py and
aotlm/bundle/executables.py say why). Every attention path reads the bits as the bf16 values
they are, and a bf16 bundle serves the same logits as the f32 one within bf16's precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bundle_factory import build_from_yaml, bundle_last_logits, write_model_yaml
from test_bundle import _rewrite_manifest
from test_paged_attention import assert_close, ragged_batch, reference, run

from aotlm.bundle import read_manifest
from aotlm.bundle.executables import compile_exported
from aotlm.bundle.manifest import Serving
from aotlm.errors import BundleError
from aotlm.kernels import kv_quant
from aotlm.kernels.attention import paged_attention
from aotlm.kernels.attention_reference import write_kv
from aotlm.runtime.generation.engine import Engine


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def test_bf16_pages_round_trip_bit_exactly():
    rng = np.random.default_rng(0)
    pool = jnp.zeros((2, 3, 4, 2, 8), kv_quant.BF16_BITS)
    k = jnp.asarray(rng.standard_normal((5, 2, 8)) * 100, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((5, 2, 8)), jnp.float32)  # converted to bf16 on write
    slots = jnp.asarray([4, 5, 6, 9, 11], jnp.int32)
    kp, vp = write_kv(pool, pool, 1, k, v, slots)
    assert kp.dtype == vp.dtype == jnp.uint16
    page, off = np.asarray(slots) // 4, np.asarray(slots) % 4
    np.testing.assert_array_equal(np.asarray(kp[1, page, off]), np.asarray(_bits(k)))
    got = kv_quant.decode(vp[1, page, off], jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(v.astype(jnp.bfloat16), np.float32))
    assert not np.asarray(kp[0]).any(), "another layer was written"


@pytest.mark.parametrize("impl", ["reference", "blocked", "cpu", "interpret"])
def test_every_attention_path_reads_bf16_bits_as_their_values(impl):
    """The same cache as bf16 pages and as their bits in uint16: identical outputs."""
    args, scale = ragged_batch(
        11, head_dim=64, heads=4, kv_heads=2, page_size=16, dtype=jnp.bfloat16, pages_per_seq=5,
        num_requests=3,
    )  # fmt: skip
    q, k, v, positions, token_req, tables = args
    as_pages = run(lambda *a: paged_attention(*a, scale, impl=impl), *args)
    as_bits = run(
        lambda *a: paged_attention(*a, scale, impl=impl),
        q, _bits(k), _bits(v), positions, token_req, tables,
    )  # fmt: skip
    assert as_bits.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(as_bits, np.float32), np.asarray(as_pages, np.float32))
    assert_close(as_bits, reference(args, scale), jnp.bfloat16)


def test_cpu_compiles_never_widen_a_whole_scanned_bf16_stack():
    """The regression this guards: XLA:CPU widened every stacked bf16 weight a layer scan slices
    to f32 before the loop, on every call (a 0.6B model's step took 4x its f32 one). Compiled the
    way bundles are, the loop carries no f32 copy of the stack (each layer's slice is widened
    inside it)."""
    layers, hidden = 4, 64

    def layer_scan(x, stacked):
        def body(x, w):
            y = jax.lax.dot_general(
                x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
            )
            return x + y.astype(x.dtype), None

        return jax.lax.scan(body, x, stacked)[0]

    x = jax.ShapeDtypeStruct((2, hidden), jnp.bfloat16)
    stacked = jax.ShapeDtypeStruct((layers, hidden, hidden), jnp.bfloat16)
    exp = jax.export.export(jax.jit(layer_scan))(x, stacked)
    stack = f"f32[{layers},{hidden},{hidden}]"

    def carried(hlo: str) -> bool:
        return any(" while(" in line and stack in line for line in hlo.splitlines())

    assert not carried(compile_exported(exp, ()).as_text())
    default = jax.jit(layer_scan).lower(x, stacked).compile().as_text()
    assert carried(default), "XLA:CPU no longer hoists the widening: drop the option"


@pytest.fixture(scope="module")
def bf16_and_f32(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    bundles = {}
    for dtype in ("bfloat16", "float32"):
        spec = write_model_yaml(root / dtype, tiny_checkpoint, dtype=dtype)
        build_from_yaml(spec, root / f"{dtype}-bundle")
        bundles[dtype] = root / f"{dtype}-bundle"
    return bundles


def test_a_bf16_bundle_keeps_bits_pages_and_serves_the_f32_logits(bf16_and_f32):
    manifest = read_manifest(bf16_and_f32["bfloat16"])[0]
    assert manifest.serving.kv_dtype == "uint16"
    assert read_manifest(bf16_and_f32["float32"])[0].serving.kv_dtype == "float32"
    engines = {d: Engine.from_bundle(p) for d, p in bf16_and_f32.items()}
    assert engines["bfloat16"].runner.k_pages.dtype == np.uint16
    prompt = [(7 * i + 3) % 200 + 5 for i in range(40)]  # two chunks: the second reads the cache
    ours, f32 = (bundle_last_logits(engines[d], prompt) for d in ("bfloat16", "float32"))
    # bf16 weights and activations: ~3 significant digits per op, over 2 layers.
    np.testing.assert_allclose(ours, f32, atol=0.05 * np.abs(f32).max())
    assert np.corrcoef(ours, f32)[0, 1] > 0.999
    assert all(e.compiles_after_ready == 0 for e in engines.values())


def test_format_11_bf16_pages_stay_bf16_and_a_wrong_recorded_dtype_is_refused(
    bf16_and_f32, tmp_path
):
    legacy = Serving(dtype="bfloat16", max_seq_len=8, targets=("cpu",), platforms=("cpu",))
    assert legacy.kv_dtype == "bfloat16"  # no kv_dtype recorded: pages in the serving dtype
    import shutil

    b = tmp_path / "b"
    shutil.copytree(bf16_and_f32["bfloat16"], b)
    serving = read_manifest(b)[0].to_dict()["serving"]
    _rewrite_manifest(b, serving=serving | {"kv_dtype": "bfloat16"})
    with pytest.raises(BundleError, match=r"serving\.kv_dtype: expected uint16"):
        read_manifest(b)
