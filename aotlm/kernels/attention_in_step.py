"""Attention of a step's tokens to the keys written in the same step, as dense masked matmuls.

The prefill half of the blocked path (aotlm/kernels/attention_blocked.py). Walking the pages,
every query block of a prefill chunk gathers its request's keys again: a 240-token chunk re-read
its own pages 30 times, and those gathers were half of a 256-token step on XLA:CPU. A chunk's own
keys are the step's tokens themselves, so they are taken once (one row per token, at its slot)
and attended with plain [T, T] matmuls; the pages are walked only for the keys before them.

The split, per query token i of request r: keys at positions ``[lo_i, pos_i]`` come from here and
those before ``lo_i`` from the pages, with ``lo_i`` = the first position of r in this step (and,
in steps of more than DENSE_TILE tokens, at least pos_i rounded down to a multiple of it). It
depends only on the request's own tokens, so which keys a token sees does not depend on what
else is in the step. Bounding ``pos_i - lo_i`` by the tile keeps the dense part linear in T:
with T > DENSE_TILE, tokens are sorted by (request, position) and each tile of queries attends
to its own tile and the one before it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK = float(jnp.finfo(jnp.float32).min)
# Positions per dense tile: a query attends here to at most this many of its request's keys.
DENSE_TILE = 256


def in_step_start(
    positions: jax.Array, token_req: jax.Array, valid: jax.Array, num_requests: int, tile: int
) -> jax.Array:
    """i32[T]: lo_i, the first key position the dense part covers for each token (int32 max for
    tokens whose request wrote nothing in this step: the pages hold all they see). A step of at
    most one tile is one dense product over all its keys: lo_i is then the request's first
    position in the step however far back, and only a chunk's older context is walked in the
    pages (rounding to the tile there made a chunk starting at 56 walk its first 256 keys)."""
    big = jnp.iinfo(jnp.int32).max
    first = jax.ops.segment_min(jnp.where(valid, positions, big), token_req, num_requests)
    if positions.shape[0] <= tile:
        return first[token_req]
    return jnp.maximum(first[token_req], positions // tile * tile)


def in_step_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    token_req: jax.Array,
    valid: jax.Array,
    lo: jax.Array,
    scale: float,
    window: int | None,
    tile: int = DENSE_TILE,
):
    """Online-softmax state of each query over the step's own keys in ``[lo_i, pos_i]``.

    q: [T, KV, G, D]; k, v: [T, KV, D], the keys and values the step wrote (``valid``: the token
    wrote them; padding did not). Returns running max and sum [T, KV, G] and the unnormalised
    output [T, KV, G, D], float32, to merge with the paged part.
    """
    num_tokens = q.shape[0]
    v = jnp.where(valid[:, None, None], v, jnp.zeros((), v.dtype))  # padding may hold NaN
    if num_tokens <= tile:
        keys = (k, v, positions, token_req, valid)
        state = _dense(q[None], *(x[None] for x in keys), positions[None], token_req[None],
                       lo[None], scale, window)  # fmt: skip
        return tuple(x[0] for x in state)
    # Sorted by (request, position), a query's keys lie at most `tile` rows before it.
    order = jnp.lexsort((positions, token_req))
    tiles = -(-num_tokens // tile)
    pad = tiles * tile - num_tokens

    def tiled(x, fill):  # [T, ...] sorted -> [tiles, tile, ...]
        x = jnp.pad(x[order], [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(tiles, tile, *x.shape[1:])

    def band(x):  # [tiles, tile, ...] -> [tiles, 2 * tile, ...]: the tile before, then its own
        before = jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])
        return jnp.concatenate([before, x], axis=1)

    keys = (tiled(k, 0), tiled(v, 0), tiled(positions, 0), tiled(token_req, -1),
            tiled(valid, False))  # fmt: skip
    keys = tuple(band(x) for x in keys)  # the first tile's "before" is zeros: never valid
    state = _dense(tiled(q, 0), *keys, tiled(positions, 0), tiled(token_req, -1), tiled(lo, 0),
                   scale, window)  # fmt: skip
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(num_tokens, dtype=order.dtype))
    return tuple(x.reshape(tiles * tile, *x.shape[2:])[unsort] for x in state)


def _dense(q, k, v, k_pos, k_req, k_valid, q_pos, q_req, q_lo, scale, window):
    """Per tile n: q [n, Tq, KV, G, D] over keys [n, Tk, KV, D]; -> per query (m, total, acc).

    Both products are laid out as batched matmuls over (tile, KV head), the G query heads of a
    KV head stacked with the queries as rows, like the page walk's."""
    tiles, num_q, kv_heads, group, head_dim = q.shape
    num_k = k.shape[1]
    visible = (
        k_valid[:, None, :]
        & (k_req[:, None, :] == q_req[:, :, None])
        & (k_pos[:, None, :] >= q_lo[:, :, None])
        & (k_pos[:, None, :] <= q_pos[:, :, None])
    )  # [n, Tq, Tk]
    if window is not None:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - window
    rows = q.transpose(0, 2, 3, 1, 4).reshape(tiles, kv_heads, group * num_q, head_dim)
    batch = ((0, 1), (0, 1))
    s = jax.lax.dot_general(
        rows, k.transpose(0, 2, 1, 3), (((3,), (3,)), batch), preferred_element_type=jnp.float32
    ).reshape(tiles, kv_heads, group, num_q, num_k)
    s = jnp.where(visible[:, None, None], s * jnp.float32(scale), MASK)
    m = jnp.max(s, axis=-1)
    # Exactly 0 for hidden keys once the row saw one key (its own, for every real token).
    p = jnp.exp(s - m[..., None])
    total = jnp.sum(p, axis=-1)
    p = p.astype(v.dtype).reshape(tiles, kv_heads, group * num_q, num_k)
    acc = jax.lax.dot_general(
        p, v.transpose(0, 2, 1, 3), (((3,), (2,)), batch), preferred_element_type=jnp.float32
    ).reshape(tiles, kv_heads, group, num_q, head_dim)
    # Per query: [n, Tq, KV, G(, D)].
    return m.transpose(0, 3, 1, 2), total.transpose(0, 3, 1, 2), acc.transpose(0, 3, 1, 2, 4)
