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

Mixtures of experts: every expert's intermediate size is split over ``tp`` like the dense MLP,
and an optional second axis, ``ep`` (``mesh: {tp: N, ep: M}``, N*M devices), splits the experts
themselves: each device holds E/M experts [L, E/M, H, I/N]. Attention, norms and routers are
replicated over ``ep`` (each ep group attends redundantly; the KV pool is per tp shard), the
expert MLP runs under ``shard_map`` and ends in one all-reduce over the whole mesh
(``shard_experts``).

Exports are traced against an ``AbstractMesh`` (no devices needed: a build machine with one
device exports a tp=8 bundle); compiling and serving use a concrete mesh of ``tp`` devices.
Axis types are Auto: Explicit axes break gathers under ``jax.export`` (DESIGN.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aotlm.errors import ConfigError
from aotlm.kernels.quant_matmul import is_quantized
from aotlm.models.config import ModelConfig
from aotlm.models.quantize import quantized_spec

TP = "tp"
EP = "ep"  # experts (mixture-of-experts models), model.yaml `mesh: {tp: N, ep: M}`
REPLICATED = P()
# [T, heads, D] activations of attention, split over heads.
HEADS = P(None, TP, None)


def kv_heads_sharded(cfg: ModelConfig, tp: int) -> bool:
    """Whether K/V heads (projections and pages) are split over tp, or replicated."""
    return tp > 1 and cfg.num_kv_heads % tp == 0


def check_mesh(cfg: ModelConfig, tp: int, where: str, ep: int = 1) -> None:
    """Refuse a tp (or ep) the model cannot be split by; ``where`` prefixes the message."""
    if ep > 1 and not cfg.is_moe:
        raise ConfigError(f"{where}: ep={ep} needs a mixture-of-experts model; remove mesh.ep")
    if ep > 1 and cfg.num_experts % ep:
        raise ConfigError(
            f"{where}: ep={ep} must divide the checkpoint's num_experts ({cfg.num_experts})"
        )
    if tp == 1:
        return
    sizes = [("num_heads", cfg.num_heads), ("intermediate_size", cfg.intermediate_size)]
    if cfg.shared_expert_intermediate_size:
        sizes.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size))
    for what, n in sizes:
        if n % tp:
            raise ConfigError(
                f"{where}: tp={tp} must divide the checkpoint's {what} ({n}): "
                f"use a tp that divides both num_heads ({cfg.num_heads}) and "
                f"intermediate_size ({cfg.intermediate_size})"
            )


def kv_spec(cfg: ModelConfig, tp: int) -> P:
    """k_pages / v_pages [L, num_pages, page_size, KV, D]: split over KV heads when they divide."""
    return P(None, None, None, TP, None) if kv_heads_sharded(cfg, tp) else REPLICATED


def _axes(tp: int, ep: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    return ((tp, ep), (TP, EP)) if ep > 1 else ((tp,), (TP,))


def abstract_mesh(tp: int, ep: int = 1) -> AbstractMesh:
    """The mesh exports are traced against: its shape and axis names, no devices."""
    shape, names = _axes(tp, ep)
    return AbstractMesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def device_mesh(tp: int, devices: Sequence[Any], ep: int = 1) -> Mesh:
    """The same mesh over the first ``tp * ep`` of ``devices`` (the loader's, or a TPU
    topology's), in their order: an export's device ids index that flat order."""
    shape, names = _axes(tp, ep)
    if ep == 1:
        return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,), devices=list(devices)[:tp])
    grid = np.asarray(list(devices)[: tp * ep], dtype=object).reshape(shape)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * 2)


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


def shard_experts(cfg: ModelConfig, mesh: AbstractMesh | Mesh) -> Callable:
    """The grouped expert MLP (aotlm/kernels/grouped_mlp.py) split over the mesh: every expert's
    intermediate size over ``tp`` and, with an ``ep`` axis, the experts themselves over ``ep``.

    Tokens and routing are replicated, so each device runs the rows routed to its own experts
    (the others' ids are out of its range: routed nowhere, no work) with its slice of their
    intermediate size, and one all-reduce over the whole mesh sums the partial outputs. Under
    ``shard_map`` because the CPU path is a loop over a data-dependent number of blocks, which
    XLA's partitioner could only run by gathering every expert onto every device.
    """
    from aotlm.kernels.grouped_mlp import grouped_mlp

    axes = tuple(mesh.axis_names)
    ep = EP if EP in axes else None
    local = cfg.num_experts // (mesh.shape[EP] if ep else 1)

    def on_device(h, w_gate, w_up, w_down, expert, weight, layer):
        if ep is not None:
            expert = expert - jax.lax.axis_index(EP) * local
        out = grouped_mlp(h, w_gate, w_up, w_down, expert, weight, layer)
        return jax.lax.psum(out, axes)

    up, down = P(None, ep, None, TP), P(None, ep, TP, None)  # every layer's [L, E, ...]

    def spec(w, weight_spec):  # a quantized expert stack: its scales [L, E, out] split alike
        return quantized_spec(weight_spec) if is_quantized(w) else weight_spec

    def experts(h, w_gate, w_up, w_down, expert, weight, layer):
        return jax.shard_map(
            on_device,
            mesh=mesh,
            in_specs=(REPLICATED, spec(w_gate, up), spec(w_up, up), spec(w_down, down))
            + (REPLICATED,) * 3,
            out_specs=REPLICATED,
            check_vma=False,
        )(h, w_gate, w_up, w_down, expert, weight, layer)

    return experts
