"""The experts of a mixture-of-experts layer: each token through the k experts routed to it.

``grouped_mlp(x, w_gate, w_up, w_down, expert, weight)`` returns, for every token t,
``sum_j weight[t, j] * mlp_e(x[t])`` with ``e = expert[t, j]`` and
``mlp_e(h) = (silu(h @ w_gate[e]) * (h @ w_up[e])) @ w_down[e]``. An expert id outside
``[0, E)`` routes nowhere: padding tokens (and, under expert parallelism, the experts another
device holds) cost no matmul.

All paths first sort the T*k (token, expert) assignments by expert, so each expert's rows are
contiguous, then:

- ``ragged``: three ``jax.lax.ragged_dot`` over the sorted rows. On TPU (and GPU) that lowers
  to XLA's native ragged dot; on CPU jax lowers it by expanding every row against every expert,
  slower than even the dense reference.
- ``blocked`` (CPU): each expert's rows padded to blocks of B rows, then a loop over only the
  blocks that hold rows, one expert's three matmuls per block. Measured on CPU (H=1024, I=512,
  E=16, k=4, f32; docs/performance.md): 1.5 / 6.3 / 69 ms at 1 / 16 / 480 tokens, against
  27 / 34 / 159 for the dense reference and 42 / 66 / 578 for ``ragged``. B grows with the
  expected rows per expert (T*k/E), 8..128, static per T bucket.
- ``reference``: the jnp twin and oracle, every expert over every token, masked combine. Never on
  the hot path; the benchmark's "dense over all experts" baseline.

``auto`` picks ``blocked`` on CPU and ``ragged`` elsewhere inside the graph, by a per-platform
lowering rule like paged attention's (aotlm/kernels/attention.py), so a multi-platform export
carries both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

from aotlm.kernels.quant_matmul import is_quantized, linear, take, values

IMPLS = ("auto", "blocked", "ragged", "reference")


def block_rows(tokens: int, k: int, experts: int) -> int:
    """Rows per block of the blocked path: the expected rows per expert, a power of two in
    [8, 128] (small blocks waste little padding in decode; large ones amortise the loop)."""
    expected = max(1, -(-tokens * k // experts))
    return min(128, max(8, 1 << (expected - 1).bit_length()))


def _sorted(expert: jax.Array, num_experts: int):
    """Assignments sorted by expert: (order, expert id per sorted row with E for nowhere,
    rows per expert i32[E])."""
    flat = expert.reshape(-1)
    flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros(num_experts + 1, jnp.int32).at[flat].add(1)[:num_experts]
    return order, flat[order], sizes


def _combine(x, rows_out, order, weight, k):
    """Scatter-add each sorted row's output, times its routing weight, back to its token."""
    w = weight.reshape(-1)[order].astype(jnp.float32)
    out = (
        jnp.zeros(x.shape, jnp.float32)
        .at[order // k]
        .add(rows_out.astype(jnp.float32) * w[:, None])
    )
    return out.astype(x.dtype)


def swiglu(h, gate, up, down):
    """The gated MLP of one expert (and of a dense Llama-family layer): (silu(h@g) * h@u) @ d.
    The weights may be quantized (aotlm/kernels/quant_matmul.py)."""
    return linear(jax.nn.silu(linear(h, gate)) * linear(h, up), down)


def _layer(layer, *ws):
    return ws if layer is None else tuple(take(w, layer) for w in ws)


def grouped_mlp_reference(x, w_gate, w_up, w_down, expert, weight, layer=None):
    """Every expert over every token, each token keeping its routed experts' outputs."""
    w_gate, w_up, w_down = _layer(layer, w_gate, w_up, w_down)
    num_experts = _leading(w_gate)
    y = jax.vmap(lambda wg, wu, wd: swiglu(x, wg, wu, wd))(w_gate, w_up, w_down)  # [E, T, H]
    routed = jax.nn.one_hot(expert, num_experts, dtype=jnp.float32)  # nowhere: all zeros
    per_expert = jnp.einsum("tje,tj->te", routed, weight.astype(jnp.float32))
    return jnp.einsum("eth,te->th", y.astype(jnp.float32), per_expert).astype(x.dtype)


def grouped_mlp_ragged(x, w_gate, w_up, w_down, expert, weight, layer=None):
    w_gate, w_up, w_down = _layer(layer, w_gate, w_up, w_down)
    k, num_experts = expert.shape[1], _leading(w_gate)
    order, sorted_expert, sizes = _sorted(expert, num_experts)
    rows = jnp.take(x, order // k, axis=0)
    e = jnp.minimum(sorted_expert, num_experts - 1)

    def dot(a, w):  # a quantized expert's per-channel scale applies per row, after the dot
        if not is_quantized(w):
            return jax.lax.ragged_dot(a, w, sizes)
        y = jax.lax.ragged_dot(
            a, values(w["weight"], a.dtype), sizes, preferred_element_type=jnp.float32
        )
        return (y * w["scale"][e]).astype(a.dtype)

    h = jax.nn.silu(dot(rows, w_gate)) * dot(rows, w_up)
    y = dot(h, w_down)
    y = jnp.where((sorted_expert < num_experts)[:, None], y, 0)  # rows past the groups
    return _combine(x, y, order, weight, k)


def grouped_mlp_blocked(x, w_gate, w_up, w_down, expert, weight, layer=None):
    t, k = expert.shape
    num_experts, hidden = _leading(w_gate, -3), x.shape[1]
    m = t * k
    b = block_rows(t, k, num_experts)
    order, sorted_expert, sizes = _sorted(expert, num_experts)
    blocks = (sizes + b - 1) // b
    block_end = jnp.cumsum(blocks)
    group_start = jnp.cumsum(sizes) - sizes
    e = jnp.minimum(sorted_expert, num_experts - 1)
    padded_row = (block_end[e] - blocks[e]) * b + jnp.arange(m) - group_start[e]
    max_blocks = -(-m // b) + min(num_experts, m)
    padded_row = jnp.where(sorted_expert < num_experts, padded_row, max_blocks * b)  # dropped
    xp = jnp.zeros((max_blocks * b, hidden), x.dtype)
    xp = xp.at[padded_row].set(jnp.take(x, order // k, axis=0), mode="drop")
    block_expert = jnp.searchsorted(block_end, jnp.arange(max_blocks), side="right")
    block_expert = jnp.minimum(block_expert, num_experts - 1)

    def body(i, yp):
        xb = jax.lax.dynamic_slice_in_dim(xp, i * b, b)
        at = block_expert[i] if layer is None else (layer, block_expert[i])
        return jax.lax.dynamic_update_slice_in_dim(
            yp, swiglu(xb, take(w_gate, at), take(w_up, at), take(w_down, at)), i * b, 0
        )

    # Only the blocks that hold rows run: a while loop with a data-dependent trip count.
    yp = jax.lax.fori_loop(0, block_end[-1], body, jnp.zeros_like(xp))
    y = jnp.take(yp, padded_row, axis=0, mode="fill", fill_value=0)
    return _combine(x, y, order, weight, k)


def _leading(w, axis: int = 0) -> int:
    return (w["weight"] if is_quantized(w) else w).shape[axis]


def _lowering(fn):
    # The primitive takes the weights' leaves (a quantized weight is two arrays): rebuild them.
    def lower(ctx, *flat, tree):
        def unflattened(x, *rest):
            *leaves, expert, weight, layer = rest
            w_gate, w_up, w_down = jax.tree.unflatten(tree, leaves)
            return fn(x, w_gate, w_up, w_down, expert, weight, layer)

        return mlir.lower_fun(unflattened, multiple_results=False)(ctx, *flat)

    return lower


def _bind_impl(*args, tree):
    return jax.jit(functools.partial(_auto_p.bind, tree=tree))(*args)


_auto_p = Primitive("aotlm_grouped_mlp")
_auto_p.def_impl(_bind_impl)
_auto_p.def_abstract_eval(lambda x, *_, tree: jax.core.ShapedArray(x.shape, x.dtype))
# The primitive always takes a layer index (stacked [L, E, ...] weights).
mlir.register_lowering(_auto_p, _lowering(grouped_mlp_ragged))
mlir.register_lowering(_auto_p, _lowering(grouped_mlp_blocked), platform="cpu")

_BY_NAME = {
    "blocked": grouped_mlp_blocked,
    "ragged": grouped_mlp_ragged,
    "reference": grouped_mlp_reference,
}


def grouped_mlp(
    x, w_gate, w_up, w_down, expert, weight, layer=None, *, impl: str = "auto"
) -> jax.Array:
    """x [T, H]; w_gate, w_up [E, H, I]; w_down [E, I, H]; expert i32[T, k] (ids outside
    [0, E) route nowhere); weight f32[T, k]. Returns [T, H] in x's dtype.

    ``layer``: the weights are every layer's, [L, E, ...], and this is the layer (an i32
    scalar). Pass the whole stack from inside a scan over layers rather than the scan's slice:
    XLA copies a sliced layer (all its experts) before the loop reads a few of them, which
    doubled the time of a decode step on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "auto":
        if layer is None:
            w_gate, w_up, w_down = (
                jax.tree.map(lambda a: a[None], w) for w in (w_gate, w_up, w_down)
            )
            layer = 0
        leaves, tree = jax.tree.flatten((w_gate, w_up, w_down))
        layer = jnp.asarray(layer, jnp.int32)
        return _auto_p.bind(x, *leaves, expert, weight, layer, tree=tree)
    return _BY_NAME[impl](x, w_gate, w_up, w_down, expert, weight, layer)


__all__ = ["IMPLS", "block_rows", "grouped_mlp", "grouped_mlp_reference", "swiglu"]
