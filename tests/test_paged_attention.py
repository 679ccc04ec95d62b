"""The fast attention paths against the jnp reference: the Pallas TPU kernel (run in Pallas' TPU
interpreter) and the blocked jnp path that every other platform runs.

Every case draws a fresh ragged batch: prefill chunks and decode tokens of several requests in one
call, pages scattered over the pool, tokens in shuffled order and padding tokens as the runner
packs them (request row 0, position 0). The interpreter fills every buffer the kernel does not
write with NaN, so an output element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from aotlm.build.export import DISABLED_CHECKS
from aotlm.kernels.attention import paged_attention
from aotlm.kernels.attention_blocked import paged_attention_blocked, phase_widths
from aotlm.kernels.attention_reference import paged_attention_ref
from aotlm.kernels.paged_attention_pallas import BlockSizes

SMALL = BlockSizes(queries=None, kv_pages=2)  # few pages per block keeps interpreting fast


def ragged_batch(
    seed, *, head_dim, heads, kv_heads, page_size, dtype=jnp.float32, layers=None,
    pages_per_seq=4, num_requests=4, with_slots=False,
):  # fmt: skip
    """A random mixed prefill/decode batch; returns (args, scale) in the reference's order, and
    with ``with_slots`` the slots the step wrote its tokens' k/v at (0 for padding)."""
    rng = np.random.default_rng(seed)
    chunks = []  # (start position, length) per request: two prefill chunks, two decode tokens
    for r in range(num_requests):
        length = int(rng.integers(2, 20)) if r % 2 == 0 else 1
        start = int(rng.integers(0, min(pages_per_seq * page_size, 40 * pages_per_seq) - length))
        chunks.append((start, length))
    num_pages = 1 + num_requests * pages_per_seq
    free = rng.permutation(np.arange(1, num_pages))
    tables = np.zeros((num_requests, pages_per_seq), np.int32)
    positions, token_req = [], []
    for r, (start, length) in enumerate(chunks):
        used = -(-(start + length) // page_size)
        tables[r, :used] = free[r * pages_per_seq : r * pages_per_seq + used]
        positions += range(start, start + length)
        token_req += [r] * length
    order = rng.permutation(len(positions))
    padding = int(rng.integers(1, 5))
    positions = np.concatenate([np.asarray(positions)[order], np.zeros(padding)]).astype(np.int32)
    token_req = np.concatenate([np.asarray(token_req)[order], np.zeros(padding)]).astype(np.int32)
    cache_shape = (num_pages, page_size, kv_heads, head_dim)
    if layers:
        cache_shape = (layers, *cache_shape)
    q = rng.standard_normal((len(positions), heads, head_dim))
    k, v = rng.standard_normal(cache_shape), rng.standard_normal(cache_shape)
    arrays = [jnp.asarray(a, dtype) for a in (q, k, v)]
    args = (*arrays, jnp.asarray(positions), jnp.asarray(token_req), jnp.asarray(tables))
    if not with_slots:
        return args, head_dim**-0.5
    return args, head_dim**-0.5, written_slots(positions, token_req, tables, page_size, padding)


def written_slots(positions, token_req, tables, page_size, padding):
    """i32[T]: where each real token's k/v went; the trailing ``padding`` tokens wrote none."""
    positions, token_req, tables = map(np.asarray, (positions, token_req, tables))
    slots = tables[token_req, positions // page_size] * page_size + positions % page_size
    slots[len(slots) - padding :] = 0
    return jnp.asarray(slots.astype(np.int32))


def hidden_slots(positions, token_req, tables, pool_shape):
    """bool[num_pages, S]: the cache slots no token of the batch can see."""
    visible = np.zeros(pool_shape, bool)
    page_size = pool_shape[1]
    for pos, req in zip(np.asarray(positions), np.asarray(token_req), strict=True):
        for j in range(pos + 1):
            visible[tables[req, j // page_size], j % page_size] = True
    return jnp.asarray(~visible)


def run(fn, *args, **kwargs):
    """jit ``fn`` and compile it with XLA's backend optimisations off: the interpreted kernel is a
    large graph that runs once, so compiling it fast is what keeps this file quick."""
    compiled = jax.jit(fn).lower(*args, **kwargs).compile({"xla_backend_optimization_level": 0})
    return compiled(*args, **kwargs)


def kernel(args, scale, **kwargs):
    kwargs.setdefault("block_sizes", SMALL)
    return run(lambda *a: paged_attention(*a, scale, impl="interpret", **kwargs), *args)


def reference(args, scale, **kwargs):
    return run(lambda *a: paged_attention_ref(*a, scale, **kwargs), *args)


def assert_close(out, ref, dtype):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all(), "kernel left unwritten (NaN) output elements"
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)


# Every head size, every GQA ratio 1-8, page sizes 16-128, odd KV head counts, bf16.
CASES = [
    # head_dim, heads, kv_heads, page_size, dtype
    (64, 8, 1, 16, jnp.float32),
    (80, 2, 2, 32, jnp.float32),
    (96, 6, 3, 16, jnp.float32),
    (128, 12, 4, 64, jnp.float32),
    (256, 4, 1, 128, jnp.float32),
    (64, 10, 2, 32, jnp.float32),
    (80, 6, 1, 16, jnp.float32),
    (96, 7, 1, 64, jnp.float32),
    (128, 16, 2, 16, jnp.bfloat16),
    (256, 6, 2, 32, jnp.bfloat16),
]


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "page_size", "dtype"), CASES)
def test_kernel_matches_reference(head_dim, heads, kv_heads, page_size, dtype):
    seed = zlib.crc32(repr((head_dim, heads, kv_heads, page_size)).encode())
    args, scale = ragged_batch(
        seed, head_dim=head_dim, heads=heads, kv_heads=kv_heads, page_size=page_size, dtype=dtype
    )
    out = kernel(args, scale)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, reference(args, scale), dtype)


@pytest.mark.parametrize("window", [1, 40])
def test_sliding_window(window):
    args, scale = ragged_batch(100 + window, head_dim=64, heads=4, kv_heads=2, page_size=16)
    out = kernel(args, scale, window=window)
    assert_close(out, reference(args, scale, window=window), jnp.float32)


@pytest.mark.parametrize("sizes", [BlockSizes(), BlockSizes(queries=32, kv_pages=1)])
def test_block_sizes_and_layer_indexed_cache(sizes):
    """The whole [L, ...] cache with a traced layer index, as a layer scan passes it."""
    args, scale = ragged_batch(7, head_dim=64, heads=8, kv_heads=2, page_size=16, layers=3)
    out = run(
        lambda *a, layer: paged_attention(
            *a, scale, layer=layer, impl="interpret", block_sizes=sizes
        ),
        *args,
        layer=jnp.int32(2),
    )
    q, k, v, *rest = args
    assert_close(out, reference((q, k[2], v[2], *rest), scale), jnp.float32)


def test_garbage_past_the_sequence_never_leaks():
    """NaN in cache slots no token can see (stale pages, the trash page) must not reach outputs."""
    args, scale = ragged_batch(11, head_dim=64, heads=4, kv_heads=1, page_size=16)
    q, k, v, positions, token_req, tables = args
    hide = hidden_slots(positions, token_req, tables, k.shape[:2])[:, :, None, None]
    clean = reference((q, jnp.where(hide, 0, k), jnp.where(hide, 0, v), *args[3:]), scale)
    k, v = jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.nan, v)
    assert_close(kernel((q, k, v, *args[3:]), scale), clean, jnp.float32)


def test_block_sizes_are_validated():
    with pytest.raises(ValueError, match="multiple of 8"):
        BlockSizes(queries=3).resolve(
            group=1, page_size=16, pages_per_seq=4, kv_row_bytes=512, q_dtype=jnp.float32
        )
    sizes = BlockSizes().resolve(
        group=8, page_size=16, pages_per_seq=64, kv_row_bytes=8 * 128 * 2, q_dtype=jnp.bfloat16
    )
    assert sizes == BlockSizes(queries=8, kv_pages=16)


def _export_cpu_tpu():
    args, scale = ragged_batch(3, head_dim=128, heads=8, kv_heads=2, page_size=16, layers=2)

    def step(q, k, v, positions, token_req, tables, layer):
        return paged_attention(q, k, v, positions, token_req, tables, scale, layer=layer)

    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*args, jnp.int32(1))]
    exported = jax_export.export(
        jax.jit(step), platforms=("cpu", "tpu"), disabled_checks=DISABLED_CHECKS
    )(*avals)
    return exported, (*args, jnp.int32(1)), scale


def test_export_for_cpu_and_tpu_carries_the_kernel():
    exported, args, scale = _export_cpu_tpu()
    assert exported.platforms == ("cpu", "tpu")
    assert "tpu_custom_call" in exported.mlir_module()
    exported = jax_export.deserialize(exported.serialize())
    q, k, v, positions, token_req, tables, _ = args
    ref = paged_attention_ref(q, k[1], v[1], positions, token_req, tables, scale)
    assert_close(exported.call(*args), ref, jnp.float32)  # CPU takes its kernel


def test_deviceless_compile_for_v5e():
    """Needs libtpu (jax[tpu]): get_topology_desc compiles for a TPU this machine does not have."""
    pytest.importorskip("libtpu", reason="libtpu not installed: deviceless TPU compile skipped")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    exported, args, _ = _export_cpu_tpu()
    topology = topologies.get_topology_desc("v5e:2x2", "tpu")
    replicated = NamedSharding(Mesh(np.array(topology.devices[:1]), ("x",)), PartitionSpec())
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) for a in args]
    lowered = jax.jit(exported.call).trace(*avals).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.compile().as_text()


# --- the blocked jnp path (every platform but TPU) ---------------------------------------------


def blocked(args, scale, **kwargs):
    return run(lambda *a: paged_attention_blocked(*a, scale, **kwargs), *args)


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "page_size", "dtype"), CASES)
@pytest.mark.parametrize(("query_block", "chunk_pages"), [(1, 1), (8, 2), (4, 3)])
def test_blocked_matches_reference(
    head_dim, heads, kv_heads, page_size, dtype, query_block, chunk_pages
):
    seed = zlib.crc32(repr((head_dim, heads, kv_heads, page_size, query_block)).encode())
    args, scale = ragged_batch(
        seed, head_dim=head_dim, heads=heads, kv_heads=kv_heads, page_size=page_size, dtype=dtype,
        pages_per_seq=7, num_requests=6,
    )  # fmt: skip
    out = blocked(args, scale, query_block=query_block, chunk_pages=chunk_pages)
    assert out.shape == args[0].shape and out.dtype == dtype
    assert_close(out, reference(args, scale), dtype)


@pytest.mark.parametrize("window", [1, 17, 40])
@pytest.mark.parametrize("query_block", [1, 8])
def test_blocked_sliding_window(window, query_block):
    args, scale = ragged_batch(
        200 + window, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8
    )
    out = blocked(args, scale, window=window, query_block=query_block, chunk_pages=1)
    assert_close(out, reference(args, scale, window=window), jnp.float32)


@pytest.mark.parametrize("query_block", [1, 8])
def test_blocked_layer_indexed_cache_and_garbage(query_block):
    """The [L, ...] cache with a traced layer; NaN in every slot no token can see stays out."""
    args, scale = ragged_batch(
        31, head_dim=64, heads=8, kv_heads=2, page_size=16, layers=3, pages_per_seq=6
    )
    q, k, v, positions, token_req, tables = args
    hide = hidden_slots(positions, token_req, tables, k.shape[1:3])[None, :, :, None, None]
    clean = reference((q, k[2], v[2], positions, token_req, tables), scale)
    k, v = jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.nan, v)
    out = run(
        lambda *a, layer: paged_attention_blocked(*a, scale, layer=layer, query_block=query_block),
        q, k, v, positions, token_req, tables, layer=jnp.int32(2),
    )  # fmt: skip
    assert_close(out, clean, jnp.float32)


@pytest.mark.parametrize("query_block", [1, 8])
def test_blocked_token_ignores_other_requests_context(query_block):
    """Extending another request's context (more KV chunks walked, other phases) leaves a
    token's output unchanged up to rounding: it never sees another request's keys."""
    args, scale = ragged_batch(5, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8)
    q, k, v, positions, token_req, tables = args
    mine = np.asarray(token_req) == 1
    base = blocked(args, scale, query_block=query_block, chunk_pages=1)
    longer = np.where(mine, positions, np.maximum(positions, 120)).astype(np.int32)
    tables = jnp.asarray(np.where(tables == 0, 1, tables))  # every page a real one
    out = blocked(
        (q, k, v, jnp.asarray(longer), token_req, tables),
        scale, query_block=query_block, chunk_pages=1,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out)[mine], np.asarray(base)[mine], rtol=1e-6, atol=1e-6)


def test_phase_widths():
    assert phase_widths(16) == (16, 8, 4)
    assert phase_widths(3) == (3, 1)
    assert phase_widths(1) == (1,)


@pytest.mark.parametrize("prefill", [0, 40])
def test_blocked_decodes_with_spread_contexts(prefill):
    """Decode tokens (one per request) at contexts from 1 to 400 keys, alone in a decode-sized
    step or beside a ``prefill``-token chunk (then each decode is walked on its own, not as a
    query block's item): every output matches the reference, and a decode's output stays the
    same up to rounding when the other decodes' contexts change (so its phase does)."""
    rng = np.random.default_rng(11 + prefill)
    decodes, page_size, pages_per_seq, kv_heads, heads, head_dim = 15, 16, 25, 2, 4, 64
    requests = decodes + 1  # request 0: the prefill chunk (or nothing)
    num_pages = 1 + requests * pages_per_seq
    tables = (1 + rng.permutation(num_pages - 1)).reshape(requests, pages_per_seq)
    tables = jnp.asarray(tables.astype(np.int32))
    pad = 3 if prefill else 1  # padding tokens; without a chunk, a 16-token decode-sized step
    num_tokens = decodes + prefill + pad
    q = rng.standard_normal((num_tokens, heads, head_dim))
    k, v = (rng.standard_normal((num_pages, page_size, kv_heads, head_dim)) for _ in "kv")
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    chunk = np.arange(60, 60 + prefill)  # a later chunk: it also walks 60 older keys
    token_req = np.concatenate([np.arange(1, requests), np.zeros(prefill + pad)]).astype(np.int32)
    scale = head_dim**-0.5

    def step(contexts):
        positions = np.concatenate([contexts, chunk, np.zeros(pad)]).astype(np.int32)
        args = (q, k, v, jnp.asarray(positions), jnp.asarray(token_req), tables)
        if not prefill:
            return args, np.asarray(blocked(args, scale))
        slots = written_slots(positions, token_req, tables, page_size, padding=pad)
        return args, np.asarray(blocked(args, scale, slots=slots))

    spread = rng.permutation(np.concatenate([[0, 399], rng.integers(1, 400, decodes - 2)]))
    args, out = step(spread)
    real = slice(0, decodes + prefill)
    assert_close(out[real], np.asarray(reference(args, scale))[real], jnp.float32)
    for _ in range(3):  # each decode again among others of new contexts
        mine = rng.random(decodes) < 0.5
        _, again = step(np.where(mine, spread, rng.integers(0, 400, decodes)))
        np.testing.assert_allclose(again[:decodes][mine], out[:decodes][mine], rtol=1e-6, atol=1e-6)


# --- the step's own keys attended densely (aotlm/kernels/attention_in_step.py) ----------------


@pytest.mark.parametrize(("head_dim", "heads", "kv_heads", "page_size", "dtype"), CASES[::2])
@pytest.mark.parametrize("dense_tile", [256, 8])
def test_in_step_keys_match_reference(head_dim, heads, kv_heads, page_size, dtype, dense_tile):
    """With the step's slots, its own keys come from one dense product (a single tile, or tiles
    of 8 so chunks straddle tiles and queries reach into the tile before) and only older keys
    from the pages: same output as the reference for every real token."""
    seed = zlib.crc32(repr((head_dim, heads, kv_heads, page_size, "in-step")).encode())
    args, scale, slots = ragged_batch(
        seed, head_dim=head_dim, heads=heads, kv_heads=kv_heads, page_size=page_size, dtype=dtype,
        pages_per_seq=7, num_requests=6, with_slots=True,
    )  # fmt: skip
    out = blocked(args, scale, query_block=8, chunk_pages=2, slots=slots, dense_tile=dense_tile)
    assert out.shape == args[0].shape and out.dtype == dtype
    real = np.asarray(slots) != 0  # padding (slot 0) sees nothing: its row is 0, not compared
    assert_close(np.asarray(out)[real], np.asarray(reference(args, scale))[real], dtype)


def test_in_step_single_tile_covers_a_chunk_across_tile_boundaries():
    """In a step of at most one dense tile, a chunk's own keys all come from the dense product
    however far they reach across multiples of the tile; the pages are walked only for the
    context before the chunk (what made continuing chunks cheap: not their first 256 keys)."""
    rng = np.random.default_rng(3)
    page_size, kv_heads, heads, head_dim = 16, 2, 4, 64
    tables = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
    positions = np.array([*range(10, 24), 40, 0], np.int32)  # a chunk across 16, a decode, pad
    token_req = np.array([0] * 14 + [1, 0], np.int32)
    q = jnp.asarray(rng.standard_normal((16, heads, head_dim)), jnp.float32)
    shape = (9, page_size, kv_heads, head_dim)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in "kv")
    args = (q, k, v, jnp.asarray(positions), jnp.asarray(token_req), tables)
    slots = written_slots(positions, token_req, tables, page_size, padding=1)
    out = blocked(args, head_dim**-0.5, query_block=8, slots=slots, dense_tile=16)
    ref = reference(args, head_dim**-0.5)
    assert_close(np.asarray(out)[:15], np.asarray(ref)[:15], jnp.float32)


@pytest.mark.parametrize("window", [1, 17, 40])
@pytest.mark.parametrize("dense_tile", [256, 8])
def test_in_step_keys_sliding_window(window, dense_tile):
    args, scale, slots = ragged_batch(
        300 + window, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8,
        with_slots=True,
    )  # fmt: skip
    out = blocked(
        args, scale, window=window, query_block=8, chunk_pages=1, slots=slots,
        dense_tile=dense_tile,
    )  # fmt: skip
    real = np.asarray(slots) != 0
    ref = reference(args, scale, window=window)
    assert_close(np.asarray(out)[real], np.asarray(ref)[real], jnp.float32)


@pytest.mark.parametrize("dense_tile", [256, 8])
def test_in_step_keys_with_garbage_everywhere_else(dense_tile):
    """NaN in every slot no token can see, the trash page included (where padding writes): the
    dense part must not take padding's keys or values, the merge must not leak the page walk's
    empty state."""
    args, scale, slots = ragged_batch(
        37, head_dim=64, heads=8, kv_heads=2, page_size=16, layers=3, pages_per_seq=6,
        with_slots=True,
    )  # fmt: skip
    q, k, v, positions, token_req, tables = args
    visible = np.zeros(k.shape[1:3], bool)
    for pos, req in zip(np.asarray(positions), np.asarray(token_req), strict=True):
        for j in range(pos + 1):
            visible[tables[req, j // 16], j % 16] = True
    visible[0] = False  # the trash page
    hide = jnp.asarray(~visible)[None, :, :, None, None]
    clean = reference((q, k[2], v[2], positions, token_req, tables), scale)
    k, v = jnp.where(hide, jnp.nan, k), jnp.where(hide, jnp.nan, v)
    out = run(
        lambda *a, layer, slots: paged_attention_blocked(
            *a, scale, layer=layer, query_block=8, slots=slots, dense_tile=dense_tile
        ),
        q, k, v, positions, token_req, tables, layer=jnp.int32(2), slots=slots,
    )  # fmt: skip
    real = np.asarray(slots) != 0
    assert np.isfinite(np.asarray(out)).all()
    assert_close(np.asarray(out)[real], np.asarray(clean)[real], jnp.float32)


@pytest.mark.parametrize("dense_tile", [256, 8])
def test_in_step_token_ignores_other_requests(dense_tile):
    """Other requests' contexts growing leaves a token's output unchanged (up to rounding:
    the phases it is walked in change) with the dense part too: it only ever takes keys of the
    token's own request."""
    args, scale, slots = ragged_batch(
        5, head_dim=64, heads=4, kv_heads=2, page_size=16, pages_per_seq=8, with_slots=True
    )
    q, k, v, positions, token_req, tables = args
    padding = int(np.sum(np.asarray(slots) == 0))
    mine = np.asarray(token_req) == 1
    kwargs = {"query_block": 8, "chunk_pages": 1, "dense_tile": dense_tile}
    tables = jnp.asarray(np.where(tables == 0, 1, tables))  # every page a real one
    base = blocked((*args[:5], tables), scale, slots=slots, **kwargs)
    longer = np.where(mine, positions, np.maximum(positions, 120))
    longer[len(longer) - padding :] = 0
    longer = jnp.asarray(longer.astype(np.int32))
    out = blocked(
        (q, k, v, longer, token_req, tables), scale,
        slots=written_slots(longer, token_req, tables, 16, padding), **kwargs,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(out)[mine], np.asarray(base)[mine], rtol=1e-6, atol=1e-6)
