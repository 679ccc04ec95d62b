"""Cut a flat, ragged batch of query tokens into (query block, request) work items.

Both fast attention paths (the Pallas TPU kernel and the blocked jnp path used everywhere else)
share this partition, so they agree on which tokens are computed together. Tokens are stably
sorted by request, padded to a multiple of the query block ``bq``, and cut into the maximal runs
of one request inside one query block. There are at most ``T / bq + R - 1`` of them: a static
bound, so the item count is static and unused items have an empty row range.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Rows of the per-item metadata table (the Pallas kernel reads it from SMEM).
BLOCK, REQ, LO, HI, KV_LO, KV_HI, MAX_POS = range(7)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class WorkItems(NamedTuple):
    order: jax.Array  # i32[T]: the tokens sorted by request
    pos: jax.Array  # i32[T_pad]: their positions, padded with the last one
    meta: jax.Array  # i32[7, W]: one column per item, rows BLOCK..MAX_POS
    item_of_row: jax.Array  # i32[T_pad]: the item each sorted row belongs to


def work_items(
    positions: jax.Array,
    token_req: jax.Array,
    num_requests: int,
    bq: int,
    kv_tokens: int,
    window: int | None,
) -> WorkItems:
    """The partition, with W static.

    ``order`` sorts the tokens by request; row ``i`` of the sorted, padded batch is query block
    ``i // bq``. Per item w: ``meta[BLOCK]`` its query block, ``meta[REQ]`` its request,
    ``[LO, HI)`` its rows inside the block (empty for unused items), ``[KV_LO, KV_HI)`` the KV
    blocks of ``kv_tokens`` keys its positions can see (window included; both 0 when unused),
    ``meta[MAX_POS]`` its largest position.
    """
    num_tokens = positions.shape[0]
    t_pad = cdiv(num_tokens, bq) * bq
    num_items = min(t_pad // bq + min(num_requests, num_tokens) - 1, t_pad)
    order = jnp.argsort(token_req, stable=True)
    req = jnp.pad(token_req[order], (0, t_pad - num_tokens), mode="edge")
    pos = jnp.pad(positions[order], (0, t_pad - num_tokens), mode="edge")
    row = jnp.arange(t_pad, dtype=jnp.int32)
    starts = (row % bq == 0) | (req != jnp.roll(req, 1))
    item_of_row = jnp.cumsum(starts.astype(jnp.int32)) - 1
    first = jnp.nonzero(starts, size=num_items, fill_value=t_pad)[0].astype(jnp.int32)
    valid = first < t_pad
    block = jnp.minimum(first, t_pad - 1) // bq
    end = jnp.minimum(jnp.append(first[1:], t_pad), (block + 1) * bq)
    max_pos = jax.ops.segment_max(pos, item_of_row, num_items)
    min_pos = jax.ops.segment_min(pos, item_of_row, num_items)
    lo_key = jnp.zeros_like(min_pos) if window is None else jnp.maximum(min_pos - window + 1, 0)
    meta = jnp.stack(
        [
            block,
            req[jnp.minimum(first, t_pad - 1)],
            first - block * bq,
            end - block * bq,
            jnp.where(valid, lo_key // kv_tokens, 0),
            jnp.where(valid, max_pos // kv_tokens + 1, 0),
            jnp.where(valid, max_pos, 0),
        ]
    ).astype(jnp.int32)
    return WorkItems(order, pos, meta, item_of_row)
