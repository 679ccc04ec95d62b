"""Paged attention in plain jnp, fast enough to serve with: the path every non-TPU platform runs.

Same contract as ``paged_attention_ref`` (its twin, and what the tests hold it to). The reference
gathers every request page for every *token* (``T * P * S`` keys), which made a 256-token prefill
step on CPU ~40x slower than the matmuls around it. This path does the work the Pallas kernel does,
in XLA ops:

- Keys are gathered once per work item (a run of one request's tokens inside one query block,
  ``aotlm/kernels/work_items.py``), not once per token: a prefill chunk re-reads its pages
  ``T / query_block`` times instead of ``T`` times.
- The KV positions are walked in chunks of a few pages by a ``while_loop`` with an online
  softmax, and the loop stops at the longest context in the step (starts at the first page any
  token's window can see). A decode step at context 200 of a 2048-token model reads ~200 keys
  per token, not 2048. Chunks past a token's own position are masked, and leave its running
  max, sum and output unchanged: a token never sees another request's keys.
- The loop is vectorised over items, so every item walks every chunk visited.
- With a query block of 1 the items are the tokens themselves (no sort, no regrouping): the
  decode-sized steps' shape. In larger steps a request with one token in the step (a decode
  beside prefill chunks) is walked that way too, not as an item filling a query block with one
  real row: a mixed step with 15 decodes and a 240-token chunk took half the attention time.
  Walks run in phases of shrinking width (``_phases``), so a decode at context 20 does not
  walk to its neighbour's 2000, nor a fresh prompt's query blocks to the older context of a
  chunk continuing a long one.

Numerics follow the reference: scores and softmax statistics in float32, probabilities cast to
v's dtype before the value product, masked scores at float32 min so no row can become NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels import kv_quant
from aotlm.kernels.attention_in_step import (
    DENSE_TILE,
    MASK,
    in_step_attention,
    in_step_start,
)
from aotlm.kernels.work_items import BLOCK, HI, KV_HI, KV_LO, LO, MAX_POS, REQ, cdiv, work_items

# Keys per step of the KV loop. Measured on XLA:CPU (benchmarks/attention.py): 32-128 keys keep
# a chunk's scores and values in cache; 512 was 2-3x slower per key.
CHUNK_KEYS = 64


def default_query_block(num_tokens: int) -> int:
    """Query tokens per work item for a T-token step (a static choice per token bucket).

    1 for decode-sized steps (each token is its own request: larger blocks only add masked
    rows); 8 above that, where a prefill chunk's tokens share their pages (measured best of 1, 4,
    8, 16 at T = 64 and 256 on XLA:CPU).
    """
    return 1 if num_tokens <= 16 else 8


def paged_attention_blocked(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    token_req: jax.Array,
    block_tables: jax.Array,
    scale: float,
    *,
    window: int | None = None,
    layer: jax.Array | int | None = None,
    query_block: int | None = None,
    chunk_pages: int | None = None,
    slots: jax.Array | None = None,
    dense_tile: int = DENSE_TILE,
) -> jax.Array:
    """``paged_attention_ref``'s contract. k_pages/v_pages: one layer ``[N, S, KV, D]`` or the
    whole cache ``[L, N, S, KV, D]`` with ``layer`` (gathered from directly: no layer copy).

    slots: i32[T], where this step wrote each token's key and value (0: padding, wrote nothing
    real). With it, steps of more than one query block per item attend to the step's own keys
    densely (aotlm/kernels/attention_in_step.py) and walk the pages only for older keys.
    """
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    elif layer is None:
        raise ValueError("a [L, num_pages, S, KV, D] cache needs layer=")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    num_tokens, num_heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[2], k_pages.shape[3]
    num_requests, pages_per_seq = block_tables.shape
    group = num_heads // kv_heads
    bq = query_block or default_query_block(num_tokens)
    chunk = min(chunk_pages or max(1, CHUNK_KEYS // page_size), pages_per_seq)
    chunk_keys = chunk * page_size
    # Pad the page tables to whole chunks with the trash page: its key positions lie past every
    # position, so it is always masked.
    tables = jnp.pad(
        block_tables, ((0, 0), (0, cdiv(pages_per_seq, chunk) * chunk - pages_per_seq))
    )
    qg = q.reshape(num_tokens, kv_heads, group, head_dim)
    walk = _Walk(k_pages, v_pages, layer, chunk, scale, window)
    if bq == 1:
        state = _token_walk(walk, qg, positions, positions, tables[token_req])
        return _finish(state, q.shape, q.dtype)
    paged_hi, dense, single = positions, None, None
    if slots is not None:
        valid = slots != 0
        lo = in_step_start(positions, token_req, valid, num_requests, dense_tile)
        # The pages hold only what came before lo; padding (slot 0) sees nothing.
        paged_hi = jnp.where(valid, jnp.minimum(positions, lo - 1), -1)
        page, offset = slots // page_size, slots % page_size
        keys = tuple(
            kv_quant.decode(pages[layer, page, offset], q.dtype)
            if kv_quant.is_bits(pages)
            else pages[layer, page, offset]
            for pages in (k_pages, v_pages)
        )  # [T, KV, D]
        dense = in_step_attention(
            qg, *keys, positions, token_req, valid, lo, scale, window, dense_tile
        )
        # A request with one token in the step (a decode) walks its pages on its own, as in a
        # decode step: as an item it would fill a query block of bq rows, one of them real.
        count = jax.ops.segment_sum(valid.astype(jnp.int32), token_req, num_requests)
        alone = valid & (count[token_req] == 1)
        rows = jnp.nonzero(alone, size=min(num_requests, num_tokens), fill_value=num_tokens)[0]
        used, at = rows < num_tokens, jnp.minimum(rows, num_tokens - 1)
        far = jnp.iinfo(jnp.int32).max // 2  # unused rows: no key visible, no chunk needed
        single = rows, _token_walk(
            walk, qg[at], jnp.where(used, paged_hi[at], -1), jnp.where(used, positions[at], far),
            tables[token_req[at]],
        )  # fmt: skip
        paged_hi = jnp.where(alone, -1, paged_hi)  # nothing left for its item to walk
    items = work_items(paged_hi, token_req, num_requests, bq, chunk_keys, window)
    meta, t_pad = items.meta, items.pos.shape[0]
    valid_item = meta[LO] < meta[HI]
    bounds = (
        jnp.min(jnp.where(valid_item, meta[KV_LO], jnp.iinfo(jnp.int32).max)),
        jnp.max(meta[KV_HI]) - 1,
    )
    q_sorted = jnp.pad(qg[items.order], ((0, t_pad - num_tokens), (0, 0), (0, 0), (0, 0)))
    blocks = q_sorted.reshape(t_pad // bq, bq, kv_heads, group, head_dim)
    win_pos = jnp.pad(positions[items.order], (0, t_pad - num_tokens), mode="edge")
    args = (
        blocks[meta[BLOCK]], items.pos.reshape(-1, bq)[meta[BLOCK]],
        win_pos.reshape(-1, bq)[meta[BLOCK]], meta[MAX_POS], tables[meta[REQ]],
    )  # fmt: skip
    state = _phases(walk, args, meta[KV_HI], bounds, phase_widths(meta.shape[1]))
    # Each token's row: its item's state at its offset in the query block.
    sorted_row = (
        jnp.zeros_like(items.order)
        .at[items.order]
        .set(jnp.arange(num_tokens, dtype=items.order.dtype))
    )
    item, offset = items.item_of_row[sorted_row], sorted_row % bq
    state = tuple(x[item, :, :, offset] for x in state)  # [T, KV, G(, D)]
    if single is not None:
        rows, walked = single
        state = tuple(x.at[rows].set(y, mode="drop") for x, y in zip(state, walked, strict=True))
    if dense is not None:
        state = _merge(state, dense)
    return _finish(state, q.shape, q.dtype)


def _token_walk(walk: _Walk, qg, hi, win_pos, pages):
    """Each row its own item (a query block of one): qg [W, KV, G, D]; hi: i32[W], the last key
    position a row sees (-1: none); win_pos: the position its window counts from; pages: its
    request's page table. Returns the row states ([W, KV, G] stats, [W, KV, G, D] output)."""
    chunk_keys = walk.chunk * walk.k_pages.shape[2]
    lo_key = jnp.zeros_like(win_pos) if walk.window is None else win_pos - walk.window + 1
    bounds = (jnp.min(jnp.maximum(lo_key, 0)) // chunk_keys, jnp.max(hi) // chunk_keys)
    args = (qg[:, None], hi[:, None], win_pos[:, None], hi, pages)
    state = _phases(walk, args, hi // chunk_keys + 1, bounds, phase_widths(qg.shape[0]))
    return tuple(x[:, :, :, 0] for x in state)


def phase_widths(rows: int) -> tuple[int, ...]:
    """Static sub-batch sizes of a walk's phases: every row, the furthest-reaching half, then a
    quarter. More phases walk fewer masked chunks but each costs a copy of the loop to compile,
    and measured no faster on XLA:CPU (16 decodes, contexts 16..448)."""
    return tuple(sorted({w for w in (rows, rows // 2, rows // 4) if w}, reverse=True))


def _phases(walk: _Walk, args: tuple, kv_end: jax.Array, bounds, widths: tuple[int, ...]):
    """Walk the items in phases of shrinking width: phase k runs the ``widths[k]`` items that
    reach furthest (all of them first) over the chunks only they still need; a vectorised loop
    runs every item it holds to the furthest one's end. Each item still visits its own chunks
    in order and never sees another's keys, but the width it runs at depends on the other
    items, and XLA:CPU's reductions round differently per width: a token's output can move in
    the last bits (1e-7 relative) with what else is in the step, as it already did between
    request buckets. kv_end: i32[W], the chunk after each item's last."""
    first, last = bounds
    state = walk.start(args[0])
    if len(widths) == 1:
        return walk(*args, first, last, state)
    order = jnp.argsort(-kv_end, stable=True)  # furthest-reaching first
    ends = kv_end[order]
    lo = first
    for k, width in enumerate(widths):
        # What items past the next phase's width need ends before ends[next width].
        hi = last if k + 1 == len(widths) else jnp.minimum(ends[widths[k + 1]] - 1, last)
        if k == 0:
            state = walk(*args, lo, hi, state)
        else:  # skipped when no chunk is left: its gathers would cost as much as a chunk

            def run(state, top=order[:width], lo=lo, hi=hi):
                sub = walk(*(a[top] for a in args), lo, hi, tuple(x[top] for x in state))
                return tuple(x.at[top].set(y) for x, y in zip(state, sub, strict=True))

            state = jax.lax.cond(lo <= hi, run, lambda state: state, state)
        lo = jnp.maximum(lo, hi + 1)
    return state


def _merge(a, b):
    """One online-softmax state (max, sum, output) from two over disjoint keys."""
    m = jnp.maximum(a[0], b[0])
    wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _finish(state, shape, dtype) -> jax.Array:
    """The attention output [T, NH, D] from each token's state ([T, KV, G] stats)."""
    _, total, acc = state
    # total >= 1 once any key was seen (the row max contributes exp(0)); every real token sees
    # at least its own key, the guard only keeps padding rows finite.
    out = acc / jnp.maximum(total, 1e-30)[..., None]
    return out.reshape(shape).astype(dtype)


class _Walk:
    """Online-softmax attention of W items over their request's pages, chunk by chunk.

    Called with q: [W, B, KV, G, D] (B query rows per item); pos: i32[W, B], the last key
    position each row sees; win_pos: i32[W, B], the positions a sliding window is counted from
    (the rows' own; ``pos`` can stop before them); item_max: i32[W],
    the largest position of the item's own rows (its request has written every slot up to it);
    pages: i32[W, P'] (P' a multiple of ``chunk``); the first and last chunk index to visit
    (traced scalars; none when last < first); and the state to continue (``start`` makes one):
    running max and sum [W, KV, G, B], unnormalised output [W, KV, G, B, D], all float32.

    Layouts are chosen so both products are plain batched matmuls with the query rows as the
    left operand: ``[G*B, D] @ [D, keys]`` then ``[G*B, keys] @ [keys, D]`` per (item, KV head),
    the key transpose fused into the page gather. With keys on the left instead, XLA:CPU ran the
    decode-shaped product (G*B = 2 columns) 5x slower.
    """

    def __init__(self, k_pages, v_pages, layer, chunk: int, scale: float, window: int | None):
        self.k_pages, self.v_pages, self.layer = k_pages, v_pages, layer
        self.chunk, self.scale, self.window = chunk, scale, window

    @staticmethod
    def start(q: jax.Array):
        items, rows, kv_heads, group, head_dim = q.shape
        stats = (items, kv_heads, group, rows)
        return (
            jnp.full(stats, MASK, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros((*stats, head_dim), jnp.float32),
        )

    def __call__(self, q, pos, win_pos, item_max, pages, first, last, state):
        items, rows, kv_heads, group, head_dim = q.shape
        k_pages, v_pages, layer, chunk, window = (
            self.k_pages, self.v_pages, self.layer, self.chunk, self.window
        )  # fmt: skip
        chunk_keys = chunk * k_pages.shape[2]
        q = q.transpose(0, 2, 3, 1, 4).reshape(items, kv_heads, group * rows, head_dim)
        batch = ((0, 1), (0, 1))

        def body(carry):
            c, m, total, acc = carry
            ids = jax.lax.dynamic_slice_in_dim(pages, c * chunk, chunk, axis=1)  # [W, chunk]
            keys = k_pages[layer, ids].reshape(items, chunk_keys, kv_heads, head_dim)
            values = v_pages[layer, ids].reshape(items, chunk_keys, kv_heads, head_dim)
            if kv_quant.is_bits(values):  # e4m3 (scales applied outside) or bf16 bits
                values = kv_quant.decode(values, q.dtype)
            keys = kv_quant.decode(keys, q.dtype).transpose(0, 2, 3, 1)  # [W, KV, D, keys]
            s = jax.lax.dot_general(
                q, keys, (((3,), (2,)), batch), preferred_element_type=jnp.float32
            )
            s = s.reshape(items, kv_heads, group, rows, chunk_keys) * jnp.float32(self.scale)
            key_pos = c * chunk_keys + jnp.arange(chunk_keys, dtype=jnp.int32)
            visible = key_pos[None, None, :] <= pos[:, :, None]  # [W, B, chunk_keys]
            if window is not None:
                visible &= key_pos[None, None, :] > win_pos[:, :, None] - window
            s = jnp.where(visible[:, None, None], s, MASK)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            total = total * alpha + jnp.sum(p, axis=-1)
            # Zero the values past the item's last position: stale slots of a reused page (or
            # the trash page) may hold inf/NaN, and 0 * NaN would leak into this item's rows.
            written = key_pos[None, :] <= item_max[:, None]  # [W, chunk_keys]
            values = jnp.where(written[:, :, None, None], values, jnp.zeros((), values.dtype))
            values = values.transpose(0, 2, 1, 3)  # [W, KV, keys, D]
            p = p.astype(values.dtype).reshape(items, kv_heads, group * rows, chunk_keys)
            pv = jax.lax.dot_general(
                p, values, (((3,), (2,)), batch), preferred_element_type=jnp.float32
            )
            pv = pv.reshape(items, kv_heads, group, rows, head_dim)
            return c + 1, m_new, total, acc * alpha[..., None] + pv

        _, *state = jax.lax.while_loop(lambda carry: carry[0] <= last, body, (first, *state))
        return tuple(state)
