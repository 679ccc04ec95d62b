"""The step functions that get exported, one graph per bucket.

Splitting the model into forward[T] / logits[T,R] / sample[R] keeps the count of full-model graphs
at |T| instead of |T|·|R|: only the tiny logits gather and the samplers see the request bucket.
sample_penalized[R] is sample[R] with presence / frequency / repetition penalties; it is its own
graph so that the common path never pays for the token-history input and its scatter;
sample_masked[R] adds a token bitmask per row (structured output), its own graph for the same
reason (unpacking and applying a 152k-token mask costs the sampler 20-30% on CPU).
decode[R] (only with ``decode_steps: K`` in model.yaml) runs up to K whole decode steps of R
sequences in one call (forward, LM head, sample, feed the token back): the host's per-step work
is paid once per K tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from aotlm.kernels.sampling import TOP_LOGPROBS, sample, sample_masked, sample_penalized
from aotlm.kernels.step_inputs import DecodeRows, Sampling
from aotlm.models import ModelConfig, final_logits, forward, lm_head
from aotlm.models.sharding import abstract_mesh


def logits_step(cfg: ModelConfig, head: jax.Array, hidden: jax.Array, rows: jax.Array) -> jax.Array:
    """head [V,H], hidden [T,H], rows i32[R] -> f32 [R,V]: the LM head on the rows that sample."""
    return final_logits(cfg, jnp.take(hidden, rows, axis=0), head)


def decode_steps(
    cfg: ModelConfig,
    forward_fn: Callable,
    params,
    k_pages: jax.Array,
    v_pages: jax.Array,
    rows: DecodeRows,
    sampling: Sampling,
    num_steps: jax.Array,
    adapters: jax.Array | None = None,
    *,
    max_steps: int,
    **forward_kwargs,
):
    """Up to ``max_steps`` decode steps of R sequences, each feeding its sampled token back.

    rows: each row's last token (not yet in the cache), its position, its block table, and the
    last position it may write (its pages end there, or its max_tokens / max_seq_len does): past
    it the row writes the trash page and its tokens are junk the host drops. sampling: as
    sample[R] takes it; its ``step`` is the row's generated-token count, so a seeded row draws
    exactly what single steps would. num_steps: i32 scalar <= max_steps. adapters: i32[R], each
    row's LoRA slot, in a bundle with ``lora`` (aotlm/models/lora.py).
    Returns (tokens i32[K, R], logprobs f32[K, R], top ids i32[K, R, 20], top logprobs
    f32[K, R, 20], k_pages, v_pages); rows past ``num_steps`` are zeros.
    """
    n = rows.token.shape[0]
    page_size = k_pages.shape[2]
    block_tables = rows.block_table
    last_page = block_tables.shape[1] - 1
    req = jnp.arange(n, dtype=jnp.int32)
    head = lm_head(cfg, params)
    top = min(TOP_LOGPROBS, cfg.vocab_size)
    if adapters is not None:  # one token per row: the rows' slots are the tokens'
        forward_kwargs = forward_kwargs | {"adapters": adapters}
    outs = (
        jnp.zeros((max_steps, n), jnp.int32),
        jnp.zeros((max_steps, n), jnp.float32),
        jnp.zeros((max_steps, n, top), jnp.int32),
        jnp.zeros((max_steps, n, top), jnp.float32),
    )

    def body(k, carry):
        tok, pos, k_pages, v_pages, outs = carry
        live = pos <= rows.limit
        fed = jnp.where(live, pos, 0)  # a finished row computes position 0 into the trash page
        page = block_tables[req, jnp.minimum(fed // page_size, last_page)]
        slots = jnp.where(live, page * page_size + fed % page_size, 0)
        hidden, k_pages, v_pages = forward_fn(
            params, k_pages, v_pages, tok, fed, slots, req, block_tables, **forward_kwargs
        )
        logits = final_logits(cfg, hidden, head)
        sampled = sample(logits, dataclasses.replace(sampling, step=sampling.step + k))
        outs = tuple(o.at[k].set(x) for o, x in zip(outs, sampled, strict=True))
        return sampled[0], pos + 1, k_pages, v_pages, outs

    carry = (rows.token, rows.position, k_pages, v_pages, outs)
    _, _, k_pages, v_pages, outs = jax.lax.fori_loop(0, num_steps, body, carry)
    return (*outs, k_pages, v_pages)


def forward_with_adapters(
    fwd: Callable, params, k_pages, v_pages, tokens, positions, slots, token_req, block_tables,
    adapters, **kwargs,
):  # fmt: skip
    """forward with each token's LoRA slot, i32[T], as its last positional argument (the
    exported calling convention of a bundle with ``lora``)."""
    return fwd(
        params, k_pages, v_pages, tokens, positions, slots, token_req, block_tables,
        adapters=adapters, **kwargs,
    )  # fmt: skip


def step_functions(
    cfg: ModelConfig, tp: int = 1, ep: int = 1, lora: bool = False
) -> dict[str, Callable]:
    """The step functions for one model config, keyed by the names the manifest uses.

    ``tp`` * ``ep`` > 1: for a tensor- (and expert-) parallel mesh (aotlm/models/sharding.py). The arguments' shardings
    come with the traced signatures; only forward's attention needs to know the mesh. decode
    needs ``max_steps=`` bound by the builder (model.yaml's decode_steps). ``lora``: forward and
    decode take each token's (row's) adapter slot as a last argument, and both need
    ``lora_rank=`` bound by the builder.
    """
    mesh = abstract_mesh(tp, ep) if tp * ep > 1 else None
    fwd = functools.partial(forward, cfg, mesh=mesh)
    return {
        "forward": functools.partial(forward_with_adapters, fwd) if lora else fwd,
        "logits": functools.partial(logits_step, cfg),
        "sample": sample,
        "sample_penalized": sample_penalized,
        "sample_masked": sample_masked,
        "decode": functools.partial(decode_steps, cfg, fwd),
    }


# Arguments updated in place: the KV page pools of forward (params, k_pages, v_pages, ...).
DONATE_ARGNUMS: dict[str, tuple[int, ...]] = {
    "forward": (1, 2),
    "logits": (),
    "sample": (),
    "sample_penalized": (),
    "sample_masked": (),
    "decode": (1, 2),  # params, k_pages, v_pages, ...
    "embed": (),  # encoders (aotlm/build/embed_steps.py): no KV cache, nothing donated
}
