"""aotlm's C++ paged-attention kernel for XLA:CPU (aotlm/kernels/cpu/paged_attention.cc) against
its jnp twin and oracle, the reference; how graphs pick it; and how bundles that need it load."""

from __future__ import annotations

import shutil
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from bundle_factory import write_model_yaml
from test_bundle import _rewrite_manifest
from test_paged_attention import (
    CASES,
    assert_close,
    blocked,
    hidden_slots,
    ragged_batch,
    reference,
    run,
)

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle import read_manifest
from aotlm.errors import BundleError, ConfigError
from aotlm.kernels import cpu_attention
from aotlm.kernels.attention import paged_attention
from aotlm.runtime.load.loader import load_bundle


def cpu_kernel(args, scale, **kwargs):
    return run(lambda *a: paged_attention(*a, scale, impl="cpu", **kwargs), *args)


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "page_size", "dtype"), CASES)
def test_kernel_matches_reference(head_dim, heads, kv_heads, page_size, dtype):
    seed = zlib.crc32(repr(("cpu", head_dim, heads, kv_heads, page_size)).encode())
    args, scale = ragged_batch(
        seed, head_dim=head_dim, heads=heads, kv_heads=kv_heads, page_size=page_size, dtype=dtype,
        pages_per_seq=7, num_requests=6,
    )  # fmt: skip
    out = cpu_kernel(args, scale)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, reference(args, scale), dtype)


def test_float16_and_a_step_large_enough_to_split_over_threads():
    """Long chunks (hundreds of keys per token): the kernel splits its items over XLA's intra-op
    pool; float16 is converted on load like bfloat16."""
    for dtype in (jnp.float32, jnp.float16):
        args, scale = ragged_batch(
            77, head_dim=64, heads=8, kv_heads=2, page_size=16, dtype=dtype,
            pages_per_seq=24, num_requests=8,
        )  # fmt: skip
        assert_close(cpu_kernel(args, scale), reference(args, scale), dtype)


@pytest.mark.parametrize("window", [1, 17, 40])
def test_sliding_window(window):
    args, scale = ragged_batch(
        300 + window, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8
    )
    out = cpu_kernel(args, scale, window=window)
    assert_close(out, reference(args, scale, window=window), jnp.float32)


def test_layer_indexed_cache_and_garbage_never_leaks():
    """The [L, ...] cache with a traced layer; NaN in every slot no token can see stays out."""
    args, scale = ragged_batch(
        41, head_dim=64, heads=8, kv_heads=2, page_size=16, layers=3, pages_per_seq=6
    )
    q, k, v, positions, token_req, tables = args
    hide = hidden_slots(positions, token_req, tables, k.shape[1:3])[None, :, :, None, None]
    clean = reference((q, k[2], v[2], positions, token_req, tables), scale)
    k, v = jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.nan, v)
    out = run(
        lambda *a, layer: paged_attention(*a, scale, layer=layer, impl="cpu"),
        q, k, v, positions, token_req, tables, layer=jnp.int32(2),
    )  # fmt: skip
    assert_close(out, clean, jnp.float32)


def test_token_output_does_not_depend_on_the_rest_of_the_step():
    """Batch invariance: a token's output is bit-identical whatever else is in the step (other
    requests' contexts, how many there are): each (query block, KV head) is computed alone."""
    args, scale = ragged_batch(5, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8)
    q, k, v, positions, token_req, tables = args
    mine = np.asarray(token_req) == 1
    base = np.asarray(cpu_kernel(args, scale))
    longer = np.where(mine, positions, np.maximum(positions, 120)).astype(np.int32)
    tables = jnp.asarray(np.where(tables == 0, 1, tables))
    out = np.asarray(cpu_kernel((q, k, v, jnp.asarray(longer), token_req, tables), scale))
    np.testing.assert_array_equal(out[mine], base[mine])


@pytest.mark.parametrize("window", [None, 13])
def test_token_output_does_not_depend_on_how_its_prompt_was_chunked(window):
    """A prompt's tokens computed as one chunk or as shorter chunks that start elsewhere (so its
    query blocks hold other rows and walk other key ranges) give bit-identical outputs."""
    rng = np.random.default_rng(3)
    pages, page_size, kv_heads, heads, head_dim = 6, 16, 2, 4, 64
    q = jnp.asarray(rng.standard_normal((90, heads, head_dim)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((pages + 1, page_size, kv_heads, head_dim)), jnp.float32)
        for _ in "kv"
    )
    tables = jnp.asarray(np.arange(1, pages + 1, dtype=np.int32)[None])
    scale = head_dim**-0.5

    def chunk(start, stop):
        positions = jnp.arange(start, stop, dtype=jnp.int32)
        args = (q[start:stop], k, v, positions, jnp.zeros_like(positions), tables)
        return np.asarray(cpu_kernel(args, scale, window=window))

    whole = chunk(0, 90)
    for start, stop in [(5, 37), (37, 38), (38, 90), (61, 67)]:
        np.testing.assert_array_equal(chunk(start, stop), whole[start:stop])


def test_auto_on_cpu_is_the_kernel_and_jnp_is_the_blocked_path():
    args, scale = ragged_batch(9, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=6)
    lowered = jax.jit(lambda *a: paged_attention(*a, scale)).lower(*args).as_text()
    assert cpu_attention.TARGET in lowered
    auto = run(lambda *a: paged_attention(*a, scale), *args)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(cpu_kernel(args, scale)))
    jnp_path = run(lambda *a: paged_attention(*a, scale, cpu="jnp"), *args)
    np.testing.assert_array_equal(np.asarray(jnp_path), np.asarray(blocked(args, scale)))
    with pytest.raises(ValueError, match="cpu must be one of"):
        paged_attention(*args, scale, cpu="fast")


def test_bundle_records_the_kernel_and_the_loader_checks_it(tiny_bundle, tmp_path):
    manifest = read_manifest(tiny_bundle[0])[0].to_dict()
    attention = manifest["serving"]["attention"]
    assert attention["cpu"] == "kernel"
    assert attention["custom_calls"] == [cpu_attention.TARGET]
    # A bundle built by an aotlm with another kernel version is refused before anything loads.
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle[0], other)
    renamed = {**attention, "custom_calls": ["aotlm_paged_attention_cpu_v999"]}
    _rewrite_manifest(other, serving={**manifest["serving"], "attention": renamed})
    with pytest.raises(BundleError, match=r"aotlm_paged_attention_cpu_v999.*rebuild the bundle"):
        load_bundle(other)


def test_missing_library_is_refused_with_the_fix(tiny_bundle, monkeypatch):
    monkeypatch.setattr(
        cpu_attention, "_register", lambda: "aotlm/kernels/_cpu_attention*.so is not built"
    )
    with pytest.raises(BundleError, match=r"not built.*attention: \{cpu: jnp\}"):
        load_bundle(tiny_bundle[0])


def test_jnp_choice_builds_without_the_custom_call(tiny_checkpoint, tmp_path):
    spec = write_model_yaml(tmp_path / "spec", tiny_checkpoint, attention={"cpu": "jnp"})
    build_bundle(load_build_config(spec), tmp_path / "b", compile_targets=False)
    attention = read_manifest(tmp_path / "b")[0].serving.attention
    assert attention.cpu == "jnp" and attention.custom_calls == ()
    bad = write_model_yaml(tmp_path / "bad", tiny_checkpoint, attention={"cpu": "fast"})
    with pytest.raises(ConfigError, match=r"attention\.cpu: must be one of kernel, jnp"):
        load_build_config(bad)
