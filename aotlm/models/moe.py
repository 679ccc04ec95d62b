"""The mixture-of-experts MLP (Qwen2-MoE, Qwen3-MoE, Mixtral) that replaces the dense one.

Routing follows transformers: softmax over all experts in float32, the top k kept, renormalised
to sum to 1 when ``norm_topk_prob`` (always for Mixtral, where that equals a softmax over the
chosen logits). Padding tokens (slot 0, the trash page) route nowhere, so the grouped matmul
spends nothing on them. Qwen2-MoE adds a shared expert gated by sigmoid(h @ w).

Expert weights are stacked [L, E, ...] in the params pytree (aotlm/models/llama.py's layout);
the experts themselves run in aotlm/kernels/grouped_mlp.py.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aotlm.kernels.grouped_mlp import grouped_mlp
from aotlm.models.config import ModelConfig

EXPERT_KEYS = ("we_gate", "we_up", "we_down")


def route(cfg: ModelConfig, router: jax.Array, h: jax.Array, valid: jax.Array):
    """h [T, H], router [H, E], valid bool[T] -> (expert i32[T, k], weight f32[T, k]); padding
    rows get expert id E (nowhere)."""
    probs = jax.nn.softmax((h @ router).astype(jnp.float32), axis=-1)
    weight, expert = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.norm_topk_prob:
        weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    expert = jnp.where(valid[:, None], expert, cfg.num_experts).astype(jnp.int32)
    return expert, weight


def dense_mlp(h: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    return (jax.nn.silu(h @ gate) * (h @ up)) @ down


def moe_mlp(
    cfg: ModelConfig,
    lp: dict[str, jax.Array],
    h: jax.Array,
    valid: jax.Array,
    experts: Callable | None = None,
) -> jax.Array:
    """The MoE block on h [T, H]. ``experts(h, we_gate, we_up, we_down, expert, weight)``
    defaults to the grouped MLP on one device (aotlm/models/sharding.py passes the
    expert-parallel one)."""
    expert, weight = route(cfg, lp["router"], h, valid)
    out = (experts or grouped_mlp)(h, *(lp[k] for k in EXPERT_KEYS), expert, weight)
    if cfg.shared_expert_intermediate_size:
        gate = jax.nn.sigmoid(h @ lp["ws_router"])
        out = out + gate * dense_mlp(h, lp["ws_gate"], lp["ws_up"], lp["ws_down"])
    return out
