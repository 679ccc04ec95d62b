"""The mixture-of-experts MLP (Qwen2-MoE, Qwen3-MoE, Mixtral) that replaces the dense one.

Routing follows transformers: softmax over all experts in float32, the top k kept, renormalised
to sum to 1 when ``norm_topk_prob`` (always for Mixtral, where that equals a softmax over the
chosen logits). Padding tokens (slot 0, the trash page) route nowhere, so the grouped matmul
spends nothing on them. Qwen2-MoE adds a shared expert gated by sigmoid(h @ w).

Expert weights are stacked [L, E, ...] in the params pytree (aotlm/models/llama.py's layout) and
reach the experts (aotlm/kernels/grouped_mlp.py) whole, with the layer index: the scan over
layers does not slice them (``split_experts``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from aotlm.kernels.grouped_mlp import grouped_mlp, swiglu
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


def split_experts(layers: dict[str, jax.Array]) -> tuple[dict, dict]:
    """(the per-layer tensors a scan slices, the stacked expert tensors it must not)."""
    rest = {k: v for k, v in layers.items() if k not in EXPERT_KEYS}
    return rest, {k: layers[k] for k in EXPERT_KEYS if k in layers}


def moe_mlp(
    cfg: ModelConfig,
    lp: dict[str, jax.Array],
    stacked: dict[str, jax.Array],
    layer: jax.Array,
    h: jax.Array,
    valid: jax.Array,
    experts: Callable | None = None,
) -> jax.Array:
    """The MoE block on h [T, H]; ``stacked``: every layer's experts, ``layer`` this one.
    ``experts(h, we_gate, we_up, we_down, expert, weight, layer)`` defaults to the grouped MLP
    on one device (aotlm/models/sharding.py passes the expert-parallel one)."""
    expert, weight = route(cfg, lp["router"], h, valid)
    ws = (stacked[k] for k in EXPERT_KEYS)
    out = (experts or grouped_mlp)(h, *ws, expert, weight, layer)
    if cfg.shared_expert_intermediate_size:
        gate = jax.nn.sigmoid(h @ lp["ws_router"])
        out = out + gate * swiglu(h, lp["ws_gate"], lp["ws_up"], lp["ws_down"])
    return out
