"""Ragged paged attention as a Pallas TPU (Mosaic) kernel; same contract as ``paged_attention_ref``.

Why a kernel: the reference gathers ``T * P * S`` keys per call, so a decode step reads every
request's whole page table once per *token* and materialises it in HBM. The kernel instead reads
each needed page once per (query block, request) straight from the page pool with DMAs, and keeps
scores in VMEM with an online softmax, so a decode step moves close to the KV bytes it must read.

Layout of the work (all decided by cheap jnp code before the kernel, inside the same graph):
- Tokens are stably sorted by request, padded to a multiple of the query block ``bq``, and cut
  into *work items*: the maximal runs of one request inside one query block. There are at most
  ``T / bq + R - 1`` of them, a static bound, so the grid is static; unused items do nothing.
- q is laid out ``[KV, T*G, D]`` (row ``t*G + g`` is query head ``kv*G + g`` of token t), so
  each KV head's query tile is a plain 2-D ``[bq*G, D]`` slab and GQA needs no in-kernel reshape.
- One grid step per item: loop over the KV blocks (``kv_pages`` pages each) that the item's
  positions can see (sliding window included), double-buffered DMAs of whole pages from the HBM
  pool (prefetching the next item's first block across grid steps), online softmax per KV head.
  The item's rows are then written into the output block, which stays resident in VMEM while
  consecutive items share it; the grid axis is therefore sequential ("arbitrary").

Known limits: one TensorCore (no megacore split); rows of a query block that belong to another
item are computed and discarded, so ``bq`` trades decode waste against prefill KV re-reads.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from aotlm.kernels import kv_quant
from aotlm.kernels.work_items import BLOCK, HI, KV_HI, KV_LO, LO, MAX_POS, REQ, cdiv, work_items

MASK = float(jnp.finfo(jnp.float32).min)  # as the reference: a fully masked row stays finite
LANES = 128


@dataclass(frozen=True)
class BlockSizes:
    """Kernel tiling, a build-time choice recorded in the bundle manifest (tune per target).

    queries: query tokens per block. Each grid step computes a whole ``queries * G`` row tile
      (G = NH // KV), so small is best for decode (one token per request) and large for prefill
      (fewer re-reads of the KV pages). The rows must fill whole sublane tiles (8 for 32-bit q,
      16 for 16-bit). None: the smallest legal value with at least 64 rows.
    kv_pages: pages per KV block (one DMA round and one ``[rows, kv_pages * S]`` score tile).
      None: about 256 keys, at most 1 MiB per buffer, at most the pages of one sequence.
    """

    queries: int | None = None
    kv_pages: int | None = None

    def resolve(
        self, *, group: int, page_size: int, pages_per_seq: int, kv_row_bytes: int, q_dtype
    ) -> BlockSizes:
        """Concrete sizes for one model and cache; raises ValueError on an illegal choice.

        kv_row_bytes: bytes of one key position across KV heads (``KV * D * itemsize``).
        """
        sublanes = 8 * (4 // jnp.dtype(q_dtype).itemsize)
        unit = sublanes // math.gcd(group, sublanes)
        queries = self.queries or unit * cdiv(cdiv(64, group), unit)
        if queries < 1 or (queries * group) % sublanes:
            raise ValueError(
                f"block_sizes.queries={queries} times {group} query heads per KV head must be a "
                f"multiple of {sublanes} (use a multiple of {unit})"
            )
        keys = min(256, max(page_size, (1 << 20) // kv_row_bytes))
        kv_pages = self.kv_pages or max(1, keys // page_size)
        if kv_pages < 1:
            raise ValueError(f"block_sizes.kv_pages must be >= 1 (got {kv_pages})")
        return BlockSizes(queries, min(kv_pages, pages_per_seq))

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)


DEFAULT_BLOCK_SIZES = BlockSizes()


def _head_rows(buf, head: int) -> jax.Array:
    """One KV head's keys (or values) of a page buffer ``[pages, S, KV, D]`` as ``[pages*S, D]``.

    Indexing the head on the ref (not a strided load of a flattened buffer) is what Mosaic
    compiles for every dtype, head count and head size we support (strided loads need 32-bit
    data and 128-lane rows; flattening needs KV to fill whole sublane tiles).
    """
    pages, page_size, _, head_dim = buf.shape
    return buf[:, :, head, :].reshape(pages * page_size, head_dim)


def _kernel(
    layer_ref, tables_ref, meta_ref,  # scalar prefetch (SMEM)
    q_ref, pos_ref, k_hbm, v_hbm,  # inputs: q [KV, bq*G, D], row positions [bq*G, 1], pools
    o_ref,  # output block [KV, bq*G, D]
    k_buf, v_buf, sems, m_ref, l_ref, acc_ref, slot_ref,  # scratch
    *, scale: float, window: int | None, group: int,
):  # fmt: skip
    num_kv, rows, _ = q_ref.shape
    _, kv_pages, page_size, _, _ = k_buf.shape
    kv_tokens = kv_pages * page_size
    pages_per_seq = tables_ref.shape[1]
    w, num_items = pl.program_id(0), pl.num_programs(0)

    def copies(item, kv_block, slot):
        out = []
        for i in range(kv_pages):
            index = jnp.minimum(kv_block * kv_pages + i, pages_per_seq - 1)
            page = tables_ref[meta_ref[REQ, item], index]
            for hbm, buf in ((k_hbm, k_buf), (v_hbm, v_buf)):
                src = hbm.at[layer_ref[0], page]
                out.append(pltpu.make_async_copy(src, buf.at[slot, i], sems.at[slot]))
        return out

    @pl.when(w == 0)
    def _():
        slot_ref[0] = 0
        for c in copies(0, meta_ref[KV_LO, 0], 0):
            c.start()

    row_pos = pos_ref[...]  # [rows, 1]
    kv_lo, kv_hi, max_pos = meta_ref[KV_LO, w], meta_ref[KV_HI, w], meta_ref[MAX_POS, w]
    nxt = jnp.minimum(w + 1, num_items - 1)
    next_has_work = (w + 1 < num_items) & (meta_ref[KV_LO, nxt] < meta_ref[KV_HI, nxt])

    def body(kv_block, slot):
        last = kv_block + 1 >= kv_hi
        n_item = jnp.where(last, nxt, w)
        n_block = jnp.where(last, meta_ref[KV_LO, nxt], kv_block + 1)

        @pl.when(~last | next_has_work)
        def _():
            for c in copies(n_item, n_block, 1 - slot):
                c.start()

        for c in copies(w, kv_block, slot):
            c.wait()
        key_pos = kv_block * kv_tokens + jax.lax.broadcasted_iota(jnp.int32, (1, kv_tokens), 1)
        visible = key_pos <= row_pos
        if window is not None:
            visible &= key_pos > row_pos - window
        first = kv_block == kv_lo  # start the softmax state here: no separate reset pass
        key_col = kv_block * kv_tokens + jax.lax.broadcasted_iota(jnp.int32, (kv_tokens, 1), 0)
        for h in range(num_kv):
            k = _head_rows(k_buf.at[slot], h)
            v = _head_rows(v_buf.at[slot], h)
            if kv_quant.is_bits(v):  # e4m3 or bf16 bits in VMEM, decoded here (fp8: scaled outside)
                k, v = kv_quant.decode(k, q_ref.dtype), kv_quant.decode(v, q_ref.dtype)
            v = jnp.where(key_col <= max_pos, v, jnp.zeros_like(v))  # never 0 * garbage
            s = jax.lax.dot_general(
                q_ref[h], k.astype(q_ref.dtype), (((1,), (1,)), ((), ())),
                preferred_element_type=jnp.float32,
            )  # fmt: skip
            s = jnp.where(visible, s * scale, MASK)
            m_prev = jnp.where(first, -jnp.inf, m_ref[h])  # [rows, LANES], lanes all equal
            l_prev = jnp.where(first, 0.0, l_ref[h])
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_next)
            p = jnp.exp(s - m_next[:, :1])
            m_ref[h] = m_next
            l_ref[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
            acc_ref[h] = jnp.where(first, 0.0, acc_ref[h]) * alpha[:, :1] + pv
        return 1 - slot

    slot_ref[0] = jax.lax.fori_loop(kv_lo, kv_hi, body, slot_ref[0])
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
    mine = (row >= meta_ref[LO, w] * group) & (row < meta_ref[HI, w] * group)
    for h in range(num_kv):
        out = acc_ref[h] / l_ref[h][:, :1]
        o_ref[h] = jnp.where(mine, out.astype(o_ref.dtype), o_ref[h])


def paged_attention_pallas(
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
    block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """``paged_attention_ref``'s contract, computed by the Pallas TPU kernel.

    k_pages, v_pages: one layer ``[num_pages, S, KV, D]``, or the whole cache
    ``[L, num_pages, S, KV, D]`` with ``layer`` (int or i32 scalar). Pass the whole cache inside a
    layer scan: slicing one layer out first would copy it, since a custom call needs its operand
    materialised. ``interpret`` (True or ``pltpu.InterpretParams``) runs it in Pallas' interpreter,
    on CPU (tests); the TPU interpreter fills unwritten buffers with NaN.
    """
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    elif layer is None:
        raise ValueError("a [L, num_pages, S, KV, D] cache needs layer=")
    num_tokens, num_heads, head_dim = q.shape
    _, _, page_size, num_kv, _ = k_pages.shape
    num_requests, pages_per_seq = block_tables.shape
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv} KV heads")
    group = num_heads // num_kv
    sizes = block_sizes.resolve(
        group=group,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        kv_row_bytes=num_kv * head_dim * k_pages.dtype.itemsize,
        q_dtype=q.dtype,
    )
    bq, kv_pages = sizes.queries, sizes.kv_pages
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    kv_tokens = kv_pages * page_size
    order, pos, meta, _ = work_items(positions, token_req, num_requests, bq, kv_tokens, window)
    t_pad, rows = pos.shape[0], bq * group
    qs = jnp.pad(q[order], ((0, t_pad - num_tokens), (0, 0), (0, 0)))
    qs = qs.reshape(t_pad, num_kv, group, head_dim).transpose(1, 0, 2, 3)
    qs = qs.reshape(num_kv, t_pad * group, head_dim)
    row_pos = jnp.repeat(pos, group)[:, None]
    layer_arr = jnp.asarray(layer, jnp.int32).reshape(1)

    q_spec = pl.BlockSpec((num_kv, rows, head_dim), lambda w, _l, _t, m: (0, m[BLOCK, w], 0))
    pos_spec = pl.BlockSpec((rows, 1), lambda w, _l, _t, m: (m[BLOCK, w], 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    buf = pltpu.VMEM((2, kv_pages, page_size, num_kv, head_dim), k_pages.dtype)
    stats = pltpu.VMEM((num_kv, rows, LANES), jnp.float32)
    kernel = functools.partial(_kernel, scale=float(scale), window=window, group=group)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(meta.shape[1],),
            in_specs=[q_spec, pos_spec, any_spec, any_spec],
            out_specs=q_spec,
            scratch_shapes=[
                buf,
                buf,
                pltpu.SemaphoreType.DMA((2,)),
                stats,
                stats,
                pltpu.VMEM((num_kv, rows, head_dim), jnp.float32),
                pltpu.SMEM((1,), jnp.int32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(qs.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
        name="aotlm_ragged_paged_attention",
    )(layer_arr, block_tables.astype(jnp.int32), meta, qs, row_pos, k_pages, v_pages)
    out = out.reshape(num_kv, t_pad, group, head_dim).transpose(1, 0, 2, 3)
    out = out.reshape(t_pad, num_heads, head_dim)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(num_tokens, dtype=order.dtype))
    return out[inverse]
