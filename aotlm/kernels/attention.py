"""One entry point for paged attention; the platform picks the implementation inside the graph.

Why inside the graph: a bundle exported for ``("cpu", "tpu")`` is one StableHLO module per bucket,
and the loading platform must find its own implementation in it. ``impl="auto"`` binds one small
primitive whose lowering is registered per platform (the Pallas kernel for ``tpu``, the blocked
jnp path for every other platform); a multi-platform lowering emits both under a switch on the
platform index that jax resolves when the module is compiled.

Why not ``jax.lax.platform_dependent``: in jax 0.10.2 it lowers every branch for *all* platforms of
the module, so the TPU branch's ``pallas_call`` is also lowered for CPU and fails ("Only interpret
mode is supported on CPU backend", jax-ml/jax#28594). A per-platform lowering rule is lowered with
only its own platform, which is exactly what is needed. Public extension API only:
``jax.extend.core.Primitive`` and ``jax.interpreters.mlir.register_lowering`` / ``lower_fun``.
The primitive has no batching or differentiation rules (inference only).

GPU: no kernel; CUDA runs the blocked jnp path (aotlm/kernels/attention_blocked.py). A Pallas Mosaic GPU kernel is the right kind
(``mosaic_gpu_v2`` is on jax.export's list of custom calls with a compatibility guarantee;
Pallas' Triton lowering, ``__gpu$xla.gpu.triton``, is explicitly not, so a bundle carrying it
could break with any jaxlib), but Mosaic GPU targets Hopper (sm_90a) only, needs its own
page-gather pipeline (TMA/cp.async per page, warpgroup MMA) rather than a port of the TPU kernel,
and no GPU was available to validate one. It was not feasible in the time of this change.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.extend.core import Primitive
from jax.interpreters import mlir

from aotlm.kernels import kv_quant
from aotlm.kernels.attention_blocked import paged_attention_blocked
from aotlm.kernels.attention_reference import paged_attention_ref
from aotlm.kernels.cpu_attention import paged_attention_cpu
from aotlm.kernels.paged_attention_pallas import (
    DEFAULT_BLOCK_SIZES,
    BlockSizes,
    paged_attention_pallas,
)

Impl = Literal["auto", "reference", "blocked", "pallas", "interpret", "cpu"]
IMPLS: tuple[str, ...] = ("auto", "reference", "blocked", "pallas", "interpret", "cpu")
CpuImpl = Literal["kernel", "jnp"]
CPU_IMPLS: tuple[str, ...] = ("kernel", "jnp")


def _reference(
    q, k_pages, v_pages, positions, token_req, block_tables, layer, slots, *, scale, window, split
):  # fmt: skip
    if k_pages.ndim == 5:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    return paged_attention_ref(
        q, k_pages, v_pages, positions, token_req, block_tables, scale, window
    )


def _blocked(
    q, k_pages, v_pages, positions, token_req, block_tables, layer, slots, *, scale, window, split
):  # fmt: skip
    return paged_attention_blocked(
        q, k_pages, v_pages, positions, token_req, block_tables, scale,
        window=window, layer=layer if k_pages.ndim == 5 else None, slots=slots if split else None,
    )  # fmt: skip


def _cpu_kernel(
    q, k_pages, v_pages, positions, token_req, block_tables, layer, slots, *, scale, window, split
):  # fmt: skip
    # The cache already holds this step's keys, so slots are not needed.
    return paged_attention_cpu(
        q, k_pages, v_pages, positions, token_req, block_tables, layer, scale, window
    )


def _cpu(ctx, *args, cpu, block_sizes, **params):
    impl = _cpu_kernel if cpu == "kernel" else _blocked
    return mlir.lower_fun(functools.partial(impl, **params), multiple_results=False)(ctx, *args)


def _kernel(
    q, k_pages, v_pages, positions, token_req, block_tables, layer, slots=None, *,
    scale, window, block_sizes, split=False, interpret=False,
):  # fmt: skip
    return paged_attention_pallas(
        q, k_pages, v_pages, positions, token_req, block_tables, scale,
        window=window, layer=layer if k_pages.ndim == 5 else None,
        block_sizes=block_sizes, interpret=interpret,
    )  # fmt: skip


def _by_platform_impl(*args, **params):
    # Outside a trace: stage it; under jit the primitive lowers per platform.
    return jax.jit(functools.partial(_by_platform_p.bind, **params))(*args)


_by_platform_p = Primitive("aotlm_paged_attention")
_by_platform_p.def_impl(_by_platform_impl)
_by_platform_p.def_abstract_eval(lambda q, *_, **__: jax.core.ShapedArray(q.shape, q.dtype))
mlir.register_lowering(
    _by_platform_p,
    lambda ctx, *a, block_sizes, cpu, **p: mlir.lower_fun(
        functools.partial(_blocked, **p), multiple_results=False
    )(ctx, *a),
)
mlir.register_lowering(_by_platform_p, _cpu, platform="cpu")
mlir.register_lowering(
    _by_platform_p,
    lambda ctx, *a, cpu, **p: mlir.lower_fun(
        functools.partial(_kernel, **p), multiple_results=False
    )(ctx, *a),
    platform="tpu",
)


def paged_attention(
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
    impl: Impl = "auto",
    block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
    slots: jax.Array | None = None,
    cpu: CpuImpl = "kernel",
    kv_scale: jax.Array | None = None,
) -> jax.Array:
    """Causal (optionally sliding-window) attention over the paged KV cache; see the reference.

    k_pages, v_pages: one layer ``[num_pages, S, KV, D]`` or the whole cache
    ``[L, num_pages, S, KV, D]`` with ``layer`` (pass the whole cache inside a layer scan: the
    kernel DMAs pages of that layer directly, instead of XLA copying the layer out first).

    impl: "auto" (the Pallas kernel on TPU, on CPU the C++ kernel or with ``cpu="jnp"`` the
    blocked jnp path, the blocked path on GPU; chosen per platform inside the graph),
    "reference", "blocked", "pallas" (TPU only), "interpret" (the Pallas kernel in its TPU
    interpreter; tests on CPU) or "cpu" (the C++ kernel). ``block_sizes`` only affects the
    Pallas kernel. ``slots``: where this step wrote each token's k/v (0 for padding); the blocked
    path then attends to the step's own keys without walking the pages for them. The result is
    the same with or without it. ``kv_scale``: the layer's f32 [2] (key, value) scales of an
    fp8 cache (uint8 e4m3 pages, aotlm/kernels/kv_quant.py), folded into q and the output here
    so that every implementation only decodes the bits.
    """
    if kv_scale is not None:
        return kv_quant.scaled(
            lambda q: paged_attention(
                q, k_pages, v_pages, positions, token_req, block_tables, scale, window=window,
                layer=layer, impl=impl, block_sizes=block_sizes, slots=slots, cpu=cpu,
            ),
            q, kv_scale,
        )  # fmt: skip
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} (got {impl!r})")
    if cpu not in CPU_IMPLS:
        raise ValueError(f"cpu must be one of {CPU_IMPLS} (got {cpu!r})")
    if k_pages.ndim == 5 and layer is None:
        raise ValueError("a [L, num_pages, S, KV, D] cache needs layer=")
    args = (q, k_pages, v_pages, positions, token_req, block_tables)
    args += (jnp.asarray(0 if layer is None else layer, jnp.int32),)
    args += (positions if slots is None else slots,)  # a placeholder when there are none
    params = {"scale": float(scale), "window": window, "split": slots is not None}
    if impl == "reference":
        return _reference(*args, **params)
    if impl == "blocked":
        return _blocked(*args, **params)
    if impl == "cpu":
        return _cpu_kernel(*args, **params)
    if impl == "pallas":
        return _kernel(*args, **params, block_sizes=block_sizes)
    if impl == "interpret":
        return _kernel(*args, **params, block_sizes=block_sizes, interpret=pltpu.InterpretParams())
    return _by_platform_p.bind(*args, **params, block_sizes=block_sizes, cpu=cpu)
