"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3 and their MoE kin) as pure functions over a
params pytree.

Params layout (docs/internals.md): layers stacked on a leading L axis, weights stored [in, out].
The per-family differences are switches on ``ModelConfig``: ``attention_bias`` (Qwen2 q/k/v
biases), ``qk_norm`` (Qwen3 per-head RMSNorm on q and k before RoPE), ``rope_scaling`` (Llama 3
or linear frequency scaling) and ``num_experts`` (a mixture-of-experts MLP, aotlm/models/moe.py:
Qwen2-MoE, Qwen3-MoE, Mixtral). Gemma 3 shares this params layout (plus two norms per layer)
and has its own forward (aotlm/models/gemma3.py). The numerics follow transformers' eager
implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from aotlm.kernels import kv_quant
from aotlm.kernels.attention import paged_attention
from aotlm.kernels.attention_reference import write_kv
from aotlm.kernels.grouped_mlp import swiglu
from aotlm.kernels.paged_attention_pallas import BlockSizes
from aotlm.kernels.quant_matmul import linear
from aotlm.models.config import ModelConfig
from aotlm.models.lora import delta as lora_delta
from aotlm.models.lora import keep_mask
from aotlm.models.moe import moe_mlp, split_experts
from aotlm.models.quantize import quantized_avals, quantized_specs
from aotlm.models.sharding import (
    EP,
    REPLICATED,
    TP,
    kv_heads_sharded,
    shard_attention,
    shard_experts,
)

Params = dict[str, Any]


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each stacked per-layer tensor, in params-layout order."""
    n, h, mlp, d = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    shapes = {"attn_norm": (n, h), "wq": (n, h, q), "wk": (n, h, kv), "wv": (n, h, kv)}
    if cfg.attention_bias:
        shapes |= {"bq": (n, q), "bk": (n, kv), "bv": (n, kv)}
    if cfg.qk_norm:
        shapes |= {"q_norm": (n, d), "k_norm": (n, d)}
    shapes |= {"wo": (n, q, h), "mlp_norm": (n, h)}
    if cfg.is_gemma:  # norms after attention and after the MLP too
        shapes |= {"post_attn_norm": (n, h), "post_mlp_norm": (n, h)}
    if not cfg.is_moe:
        return shapes | {"w_gate": (n, h, mlp), "w_up": (n, h, mlp), "w_down": (n, mlp, h)}
    e = cfg.num_experts
    shapes |= {"router": (n, h, e), "we_gate": (n, e, h, mlp), "we_up": (n, e, h, mlp)}
    shapes["we_down"] = (n, e, mlp, h)
    if s := cfg.shared_expert_intermediate_size:
        shapes |= {"ws_router": (n, h, 1), "ws_gate": (n, h, s), "ws_up": (n, h, s)}
        shapes["ws_down"] = (n, s, h)
    return shapes


def param_specs(
    cfg: ModelConfig,
    tp: int,
    ep: int = 1,
    weights: str | None = None,
    kv_cache_dtype: str | None = None,
) -> dict[str, Any]:
    """PartitionSpecs with the structure of ``abstract_params(cfg, dtype, weights,
    kv_cache_dtype)`` (layers stacked on a leading L axis, weights [in, out]; experts [L, E, in,
    out] split over ``ep`` too; a quantized weight's scales as the weight, less its input axis;
    the fp8 cache's scales replicated)."""
    col, row, vec = P(None, None, TP), P(None, TP, None), P(None, TP)
    experts = EP if ep > 1 else None
    kv_col, kv_vec = (col, vec) if kv_heads_sharded(cfg, tp) else (REPLICATED, REPLICATED)
    by_name = {
        "wq": col, "bq": vec, "wk": kv_col, "bk": kv_vec, "wv": kv_col, "bv": kv_vec,
        "wo": row, "w_gate": col, "w_up": col, "w_down": row,
        "ws_gate": col, "ws_up": col, "ws_down": row,
        "we_gate": P(None, experts, None, TP), "we_up": P(None, experts, None, TP),
        "we_down": P(None, experts, TP, None),
    }  # fmt: skip
    specs: dict[str, Any] = {
        "embed": REPLICATED,
        "final_norm": REPLICATED,
        "layers": {k: by_name.get(k, REPLICATED) for k in layer_shapes(cfg)},
    }
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = REPLICATED
    if kv_cache_dtype is not None:
        specs["kv_scale"] = REPLICATED
    return quantized_specs(specs, weights)


def abstract_params(
    cfg: ModelConfig,
    dtype: str | np.dtype,
    weights: str | None = None,
    kv_cache_dtype: str | None = None,
) -> Params:
    """The params pytree as ShapeDtypeStructs: everything tracing needs, no weights.
    ``weights``: a quantization scheme (aotlm/models/quantize.py) or None; ``kv_cache_dtype``
    "fp8": the cache's per-layer scales ``kv_scale`` f32 [L, 2] too (aotlm/kernels/kv_quant.py)."""
    dt = jnp.dtype(dtype)
    vh = (cfg.vocab_size, cfg.hidden_size)
    params: Params = {
        "embed": jax.ShapeDtypeStruct(vh, dt),
        "final_norm": jax.ShapeDtypeStruct((cfg.hidden_size,), dt),
        "layers": {k: jax.ShapeDtypeStruct(s, dt) for k, s in layer_shapes(cfg).items()},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = jax.ShapeDtypeStruct(vh, dt)
    if kv_cache_dtype is not None:
        params["kv_scale"] = jax.ShapeDtypeStruct((cfg.num_layers, 2), jnp.float32)
    return quantized_avals(params, weights)


def lm_head(cfg: ModelConfig, params: Params) -> jax.Array:
    """The [V, H] output projection (the embedding when the model ties them)."""
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF LlamaRMSNorm: normalise in float32, cast back to x's dtype, then scale by the weight."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 [D/2] inverse frequencies, computed on the host like HF's rope init functions."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling_dict
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [T, heads, D]; cos/sin: float32 [T, D]. Non-interleaved halves (HF rotate_half)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def rope(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """float32 cos, sin [T, D] at ``positions`` for the host-computed inverse frequencies."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def layer_attention(
    cfg: ModelConfig,
    window: int | None,
    *,
    attention_impl: str,
    block_sizes: BlockSizes | None,
    cpu_attention: str,
    mesh: AbstractMesh | None,
) -> Callable:
    """``attend(q, k_pages, v_pages, positions, token_req, block_tables, layer, slots,
    kv_scale)``: paged attention over the whole cache at ``layer`` (slicing a layer out first
    would copy it for the TPU custom call), with ``window``, split over ``mesh`` when there is
    one; ``kv_scale``: the layer's fp8-cache scales or None (aotlm/kernels/kv_quant.py)."""

    def attend(
        q, k_pages, v_pages, positions, token_req, block_tables, index, slots, impl=attention_impl
    ):  # fmt: skip
        return paged_attention(
            q, k_pages, v_pages, positions, token_req, block_tables, cfg.attention_scale,
            layer=index, window=window, impl=impl,
            block_sizes=block_sizes or BlockSizes(), slots=slots, cpu=cpu_attention,
        )  # fmt: skip

    split = attend if mesh is None else shard_attention(attend, cfg, mesh)

    def scaled(q, *args, kv_scale=None):
        return kv_quant.scaled(lambda q: split(q, *args), q, kv_scale)

    return scaled


def project(x: jax.Array, lp: Params, name: str, adapted: Params | None, keep) -> jax.Array:
    """x @ the layer's weight ``name``, plus each token's LoRA update where the bundle adapts it
    (``adapted``: the layer's slots, aotlm/models/lora.py; ``keep``: the tokens' slot mask)."""
    y = linear(x, lp[name])
    if adapted is not None and name in adapted:
        y = y + lora_delta(x, adapted[name], keep)
    return y


def mlp(lp: Params, h: jax.Array, adapted: Params | None = None, keep=None) -> jax.Array:
    """The dense gated MLP, with LoRA updates on its projections when there are slots."""
    if adapted is None or not any(n in adapted for n in ("w_gate", "w_up", "w_down")):
        return swiglu(h, lp["w_gate"], lp["w_up"], lp["w_down"])
    gate, up = project(h, lp, "w_gate", adapted, keep), project(h, lp, "w_up", adapted, keep)
    return project(jax.nn.silu(gate) * up, lp, "w_down", adapted, keep)


def _attention_block(
    cfg: ModelConfig, lp: Params, h: jax.Array, cos: jax.Array, sin: jax.Array,
    adapted: Params | None = None, keep=None,
):  # fmt: skip
    """Project h [T,H] to RoPE'd q [T,NH,D] and k, v [T,KV,D]."""
    t, d = h.shape[0], cfg.head_dim
    q, k, v = (project(h, lp, n, adapted, keep) for n in ("wq", "wk", "wv"))
    if cfg.attention_bias:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = q.reshape(t, cfg.num_heads, d)
    k = k.reshape(t, cfg.num_kv_heads, d)
    v = v.reshape(t, cfg.num_kv_heads, d)
    if cfg.qk_norm:
        q, k = (
            rms_norm(q, lp["q_norm"], cfg.rms_norm_eps),
            rms_norm(k, lp["k_norm"], cfg.rms_norm_eps),
        )
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def lora_inputs(params: Params, adapters: jax.Array | None, rank: int | None, dtype):
    """(the scan's per-layer LoRA slots or None, the tokens' slot mask or None)."""
    slots = params.get("lora")
    if (slots is None) != (adapters is None) or (slots is None) != (rank is None):
        raise ValueError("LoRA needs params['lora'], the tokens' adapters and lora_rank together")
    if slots is None:
        return None, None
    width = next(iter(slots.values()))["a"].shape[-1]
    return slots, keep_mask(adapters, width, rank, dtype)


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
    adapters: jax.Array | None = None,
    lora_rank: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step over a flat, padded batch of T tokens from up to R requests (internals.md).

    tokens, positions, slots, token_req: i32[T]; block_tables: i32[R, P];
    k_pages, v_pages: [L, num_pages, S, KV, D] (donate them). Each layer first writes the tokens'
    k/v at ``slots`` and then attends over the token's request pages to positions <= its own.
    Returns (hidden [T, H] after the final norm, k_pages, v_pages). ``cfg`` is static.
    Attention is the Pallas kernel on TPU, aotlm's C++ kernel on CPU (``cpu_attention="jnp"``:
    the blocked jnp path) and the blocked jnp path on GPU, chosen inside the graph
    (``attention_impl="auto"``), so one multi-platform export carries them all. ``mesh``: the
    tensor-parallel mesh the arguments are sharded over (aotlm/models/sharding.py), which
    decides how attention is split; None: one device. ``adapters``: i32[T], each token's LoRA
    slot (0: none) over ``params["lora"]``, slots of ``lora_rank`` columns (static;
    aotlm/models/lora.py); None: no adapters.
    """
    cos, sin = rope(positions, rope_inv_freq(cfg))
    eps = cfg.rms_norm_eps
    attend = layer_attention(
        cfg, cfg.sliding_window, attention_impl=attention_impl, block_sizes=block_sizes,
        cpu_attention=cpu_attention, mesh=mesh,
    )  # fmt: skip
    experts = shard_experts(cfg, mesh) if mesh is not None and cfg.is_moe else None
    valid = slots >= k_pages.shape[2]  # padding writes the trash page 0: routed nowhere

    slots_of, keep = lora_inputs(params, adapters, lora_rank, params["embed"].dtype)

    def layer(carry, xs):
        x, k_pages, v_pages = carry
        lp, index, kv_scale, adapted = xs
        h = rms_norm(x, lp["attn_norm"], eps)
        q, k, v = _attention_block(cfg, lp, h, cos, sin, adapted, keep)
        k_pages, v_pages = write_kv(k_pages, v_pages, index, k, v, slots, kv_scale)
        attn = attend(
            q, k_pages, v_pages, positions, token_req, block_tables, index, slots,
            kv_scale=kv_scale,
        )  # fmt: skip
        x = x + project(attn.reshape(attn.shape[0], -1), lp, "wo", adapted, keep)
        h = rms_norm(x, lp["mlp_norm"], eps)
        if cfg.is_moe:
            x = x + moe_mlp(cfg, lp, stacked, index, h, valid, experts)
        else:
            x = x + mlp(lp, h, adapted, keep)
        return (x, k_pages, v_pages), None

    x = params["embed"][tokens]
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    per_layer, stacked = split_experts(params["layers"])
    xs = (per_layer, layer_ids, params.get("kv_scale"), slots_of)
    (x, k_pages, v_pages), _ = jax.lax.scan(layer, (x, k_pages, v_pages), xs)
    return rms_norm(x, params["final_norm"], eps), k_pages, v_pages
