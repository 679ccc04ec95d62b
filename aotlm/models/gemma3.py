"""Gemma 3 text decoder (``Gemma3ForCausalLM``, the language model of
``Gemma3ForConditionalGeneration``) as a pure function over the decoder params pytree.

What differs from Llama (aotlm/models/llama.py, whose params layout this shares, plus two norms
per layer): embeddings scaled by sqrt(hidden) in the params dtype; RMSNorm scaling by (1 + w)
computed in float32 before the cast; norms before *and* after attention and the MLP; QK-norm;
attention scaled by ``query_pre_attn_scalar ** -0.5``; a GELU-tanh MLP; and local layers
(``layer_types``: sliding_attention, window ``sliding_window``, rope base ``rope_local_theta``)
between global ones (full attention, ``rope_theta`` with its scaling). The final logit
soft-capping, when the config sets it, is applied where logits are made (aotlm/build/steps.py).

The window is static in the attention kernels, so each layer picks one of two attention calls
with ``lax.cond`` on its type (both traced once, inside the one scan over layers).

KV pages: local and global layers share one page pool and one block table per request, so a
page that local layers no longer reach is still read by the global ones and cannot be freed;
the local layers' saving is compute (the kernels skip pages outside the window), not memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from aotlm.kernels.attention_reference import write_kv
from aotlm.kernels.paged_attention_pallas import BlockSizes
from aotlm.kernels.quant_matmul import linear
from aotlm.models.config import ModelConfig
from aotlm.models.llama import Params, apply_rope, layer_attention, rope, rope_inv_freq


def gemma_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma3RMSNorm: normalise and scale by (1 + w) in float32, then cast to x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def forward(
    cfg: ModelConfig,
    params: Params,
    k_pages: jax.Array,
    v_pages: jax.Array,
    tokens: jax.Array,
    positions: jax.Array,
    slots: jax.Array,
    token_req: jax.Array,
    block_tables: jax.Array,
    *,
    attention_impl: str = "auto",
    block_sizes: BlockSizes | None = None,
    cpu_attention: str = "kernel",
    mesh: AbstractMesh | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Same contract as ``aotlm.models.llama.forward``: returns (hidden [T, H] after the final
    norm, k_pages, v_pages)."""
    eps, d, t = cfg.rms_norm_eps, cfg.head_dim, tokens.shape[0]
    global_rope = rope(positions, rope_inv_freq(cfg))
    local_freq = 1.0 / (cfg.rope_local_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    local_rope = rope(positions, local_freq.astype(np.float32))
    kinds = dict(attention_impl=attention_impl, block_sizes=block_sizes,
                 cpu_attention=cpu_attention, mesh=mesh)  # fmt: skip
    attend_local = layer_attention(cfg, cfg.sliding_window, **kinds)
    attend_global = layer_attention(cfg, None, **kinds)

    def layer(carry, xs):
        x, k_pages, v_pages = carry
        lp, index, local, kv_scale = xs
        cos, sin = (jnp.where(local, a, b) for a, b in zip(local_rope, global_rope, strict=True))
        h = gemma_norm(x, lp["attn_norm"], eps)
        q = linear(h, lp["wq"]).reshape(t, cfg.num_heads, d)
        k = linear(h, lp["wk"]).reshape(t, cfg.num_kv_heads, d)
        v = linear(h, lp["wv"]).reshape(t, cfg.num_kv_heads, d)
        q = apply_rope(gemma_norm(q, lp["q_norm"], eps), cos, sin)
        k = apply_rope(gemma_norm(k, lp["k_norm"], eps), cos, sin)
        k_pages, v_pages = write_kv(k_pages, v_pages, index, k, v, slots, kv_scale)
        args = (q, k_pages, v_pages, positions, token_req, block_tables, index, slots)
        attn = jax.lax.cond(
            local,
            lambda *a: attend_local(*a, kv_scale=kv_scale),
            lambda *a: attend_global(*a, kv_scale=kv_scale),
            *args,
        )
        x = x + gemma_norm(linear(attn.reshape(t, -1), lp["wo"]), lp["post_attn_norm"], eps)
        h = gemma_norm(x, lp["mlp_norm"], eps)
        gate = jax.nn.gelu(linear(h, lp["w_gate"]), approximate=True)
        mlp = linear(gate * linear(h, lp["w_up"]), lp["w_down"])
        x = x + gemma_norm(mlp, lp["post_mlp_norm"], eps)
        return (x, k_pages, v_pages), None

    embed = params["embed"]
    x = embed[tokens] * jnp.asarray(cfg.hidden_size**0.5, embed.dtype)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    local = jnp.asarray([cfg.sliding_layer(i) for i in range(cfg.num_layers)])
    (x, k_pages, v_pages), _ = jax.lax.scan(
        layer, (x, k_pages, v_pages), (params["layers"], layer_ids, local, params.get("kv_scale"))
    )
    return gemma_norm(x, params["final_norm"], eps), k_pages, v_pages
