"""Tensor parallelism for the Llama-family decoder: the mesh, and where every tensor lives on it.

One mesh axis, ``tp``, over the first ``tp`` devices (``mesh: {tp: N}`` in model.yaml). Megatron
layout, so each layer needs two all-reduces (after ``wo`` and after ``w_down``) and nothing else:

    wq, wk, wv, w_gate, w_up (and bq, bk, bv)   column-sharded: heads / intermediate split over tp
    wo, w_down                                  row-sharded: their partial products are summed
    embed, lm_head, norms, q_norm, k_norm       replicated
    k_pages, v_pages [L, N, S, KV, D]           sharded over the KV-heads axis
    activations and every host input            replicated

KV heads: when ``num_kv_heads`` is not a multiple of ``tp`` (e.g. 4 KV heads on 8 devices) the
K/V projections and the KV pages are replicated instead, and attention runs as the jnp
reference (on TPU too) partitioned by XLA over the query heads. Simple and exact, but every
device holds the whole KV cache (vLLM keeps on each device only the KV heads its query heads
use). Otherwise attention runs under ``shard_map`` over the KV heads, so each device attends
with its own heads and pages: on TPU that is the Pallas kernel, a custom call XLA could not
partition by itself.

Exports are traced against an ``AbstractMesh`` (no devices needed: a build machine with one
device exports a tp=8 bundle); compiling and serving use a concrete mesh of ``tp`` devices.
Axis types are Auto: Explicit axes break gathers under ``jax.export`` (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aotlm.errors import ConfigError
from aotlm.models.config import ModelConfig

TP = "tp"
REPLICATED = P()
# [T, heads, D] activations of attention, split over heads.
HEADS = P(None, TP, None)


def kv_heads_sharded(cfg: ModelConfig, tp: int) -> bool:
    """Whether K/V heads (projections and pages) are split over tp, or replicated."""
    return tp > 1 and cfg.num_kv_heads % tp == 0


def check_mesh(cfg: ModelConfig, tp: int, where: str) -> None:
    """Refuse a tp the model cannot be split by; ``where`` prefixes the message (file: key)."""
    if tp == 1:
        return
    for what, n in (("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ConfigError(
                f"{where}: tp={tp} must divide the checkpoint's {what} ({n}): "
                f"use a tp that divides both num_heads ({cfg.num_heads}) and "
                f"intermediate_size ({cfg.intermediate_size})"
            )


def kv_spec(cfg: ModelConfig, tp: int) -> P:
    """k_pages / v_pages [L, num_pages, page_size, KV, D]: split over KV heads when they divide."""
    return P(None, None, None, TP, None) if kv_heads_sharded(cfg, tp) else REPLICATED


def abstract_mesh(tp: int) -> AbstractMesh:
    """The mesh exports are traced against: its shape and axis names, no devices."""
    return AbstractMesh((tp,), (TP,), axis_types=(AxisType.Auto,))


def device_mesh(tp: int, devices: Sequence[Any]) -> Mesh:
    """The same mesh over the first ``tp`` of ``devices`` (the loader's, or a TPU topology's)."""
    return jax.make_mesh((tp,), (TP,), axis_types=(AxisType.Auto,), devices=list(devices)[:tp])


def with_shardings(structs: Any, specs: Any, mesh: AbstractMesh | Mesh) -> Any:
    """ShapeDtypeStructs (a pytree) carrying ``NamedSharding(mesh, spec)`` leaf by leaf."""
    return jax.tree.map(
        lambda s, spec: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, spec)),
        structs,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def shard_attention(fn: Callable, cfg: ModelConfig, mesh: AbstractMesh | Mesh) -> Callable:
    """``fn(q, k_pages, v_pages, positions, token_req, block_tables, layer, slots, impl=...)`` split
    over the mesh's heads (q [T, NH, D] sharded over heads, pages laid out by ``kv_spec``).

    KV heads split: ``shard_map``, each device attending with its own q heads [T, NH/tp, D] over
    its own pages [L, N, S, KV/tp, D] with ``fn`` as given (on TPU the Pallas kernel, a custom
    call XLA could not partition). ``check_vma=False``: the attention primitive
    (aotlm/kernels/attention.py) has no replication rule; the output is split, never replicated.

    KV heads replicated: the jnp reference, partitioned by XLA over the q heads, with the
    updated pages pinned replicated (left free, XLA splits the KV write over KV heads and then
    all-gathers the whole cache in every layer).
    """
    if kv_heads_sharded(cfg, mesh.shape[TP]):
        pages = P(None, None, None, TP, None)
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(HEADS, pages, pages) + (REPLICATED,) * 5,
            out_specs=HEADS,
            check_vma=False,
        )
    replicated = NamedSharding(mesh, REPLICATED)

    def on_replicated_pages(q, k_pages, v_pages, *rest):
        k_pages, v_pages = jax.lax.with_sharding_constraint((k_pages, v_pages), replicated)
        return fn(q, k_pages, v_pages, *rest, impl="reference")

    return on_replicated_pages
