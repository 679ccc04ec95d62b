"""Paged attention: the pure-jnp reference (the twin every platform kernel is tested against).

The KV cache is a pool of pages ``[num_pages, page_size, KV, D]`` per layer. A request owns a row
of ``block_tables``: its key at sequence position ``j`` lives in page ``block_tables[r, j // S]``
at offset ``j % S``. Page 0 is the trash page that padding tokens write to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels import kv_quant


def write_kv(
    k_pages: jax.Array,
    v_pages: jax.Array,
    layer: jax.Array | int,
    k: jax.Array,
    v: jax.Array,
    slots: jax.Array,
    kv_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Scatter one layer's new keys/values into the cache.

    k_pages, v_pages: [L, num_pages, S, KV, D]; k, v: [T, KV, D]; slots: i32[T] with
    ``slot = page * S + offset``. Padding tokens all point into page 0 (duplicate slots there are
    allowed; which write wins is unspecified, and nothing reads page 0 unmasked). An fp8 cache
    (uint8 pages, aotlm/kernels/kv_quant.py) needs the layer's ``kv_scale``, f32 [2].
    """
    page_size = k_pages.shape[2]
    page, offset = slots // page_size, slots % page_size
    if kv_quant.is_e4m3(k_pages):
        if kv_scale is None:
            raise ValueError("an fp8 (uint8 e4m3) KV cache needs the layer's kv_scale")
        k, v = kv_quant.encode(k, kv_scale[0]), kv_quant.encode(v, kv_scale[1])
    k_pages = k_pages.at[layer, page, offset].set(kv_quant.store(k, k_pages))
    v_pages = v_pages.at[layer, page, offset].set(kv_quant.store(v, v_pages))
    return k_pages, v_pages


def paged_attention_ref(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    token_req: jax.Array,
    block_tables: jax.Array,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """Causal attention of a flat, ragged batch of query tokens over a paged KV cache.

    Args:
      q: [T, NH, D] queries (RoPE already applied), any float dtype.
      k_pages, v_pages: [num_pages, S, KV, D], one layer of the cache; must already hold the keys
        and values of every position each token attends to, including the tokens of this call.
        uint8 pages hold e4m3 bits (the fp8 cache), read as their values: the scales are
        applied by ``paged_attention``; uint16 pages hold bf16 bits (aotlm/kernels/kv_quant.py).
      positions: i32[T], the sequence position of each query token (>= 0).
      token_req: i32[T], the row of ``block_tables`` each token belongs to.
      block_tables: i32[R, P], page ids of each request; entries past a request's length may hold
        anything (usually 0) since those key positions are masked.
      scale: softmax scale, usually ``D ** -0.5``.
      window: sliding window (Mistral, Gemma local layers): when set, token t sees only the last
        ``window`` positions, ``positions[t] - window < j <= positions[t]``. None: full causal.

    Returns:
      [T, NH, D] in q's dtype. Token t attends to key positions ``0..positions[t]`` of request
      ``token_req[t]``. Query head h uses KV head ``h // (NH // KV)`` (GQA, as HF's
      repeat_kv). Scores and softmax are float32; probabilities are cast to v's dtype before the
      value product, as HF's eager attention does. Masked scores are float32 min rather than -inf
      so a (padding) row can never become NaN.

    Cost: gathers ``T * P * S`` keys, which is fine for a reference and for small buckets.
    """
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k_pages.shape[2]
    group = num_heads // kv_heads
    pages = block_tables[token_req]  # [T, P]
    keys = k_pages[pages].reshape(num_tokens, -1, kv_heads, head_dim)  # [T, P*S, KV, D]
    values = v_pages[pages].reshape(num_tokens, -1, kv_heads, head_dim)
    if kv_quant.is_bits(values):
        keys, values = kv_quant.decode(keys, q.dtype), kv_quant.decode(values, q.dtype)
    qg = q.reshape(num_tokens, kv_heads, group, head_dim)
    scores = jnp.einsum(
        "tkgd,tskd->tkgs", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32
    )
    scores = scores * jnp.float32(scale)
    key_pos = jnp.arange(keys.shape[1], dtype=jnp.int32)
    visible = key_pos[None, :] <= positions[:, None]  # [T, P*S]
    if window is not None:
        visible &= key_pos[None, :] > positions[:, None] - window
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("tkgs,tskd->tkgd", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)
