"""The step functions that get exported, one graph per bucket.

Splitting the model into forward[T] / logits[T,R] / sample[R] keeps the count of full-model graphs
at |T| instead of |T|·|R|: only the tiny logits gather and the samplers see the request bucket.
sample_penalized[R] is sample[R] with presence / frequency / repetition penalties; it is its own
graph so that the common path never pays for the token-history input and its scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from aotlm.kernels.sampling import sample, sample_penalized
from aotlm.models import ModelConfig, forward
from aotlm.models.sharding import abstract_mesh


def logits_step(head: jax.Array, hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """head [V,H], hidden [T,H], rows i32[R] -> f32 [R,V]: the LM head on the rows that sample."""
    picked = jnp.take(hidden, rows, axis=0)
    return jnp.einsum("rh,vh->rv", picked, head, preferred_element_type=jnp.float32)


def step_functions(cfg: ModelConfig, tp: int = 1) -> dict[str, Callable]:
    """The step functions for one model config, keyed by the names the manifest uses.

    ``tp`` > 1: for a tensor-parallel mesh (aotlm/models/sharding.py). The arguments' shardings
    come with the traced signatures; only forward's attention needs to know the mesh.
    """
    return {
        "forward": functools.partial(forward, cfg, mesh=abstract_mesh(tp) if tp > 1 else None),
        "logits": logits_step,
        "sample": sample,
        "sample_penalized": sample_penalized,
    }


# Arguments updated in place: the KV page pools of forward (params, k_pages, v_pages, ...).
DONATE_ARGNUMS: dict[str, tuple[int, ...]] = {
    "forward": (1, 2),
    "logits": (),
    "sample": (),
    "sample_penalized": (),
    "embed": (),  # encoders (aotlm/trace/embed.py): no KV cache, nothing donated
}
