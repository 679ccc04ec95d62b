"""Token sampling as pure functions over a padded batch of rows.

Every row depends only on its own logits, parameters, seed and step, so a request's tokens do not
change with whatever else shares the batch (the key is derived from (seed, step), not from a batch
key that would be split by row position).

Three exported variants: `sample` (the common path); `sample_penalized`, which first applies
presence / frequency / repetition penalties computed on device from each row's token history;
and `sample_masked`, which also takes a token bitmask per row (a grammar's allowed next tokens,
computed on the host). The runner calls the second only for a step where some row has
non-neutral penalties and the third only where some row has a grammar; with neutral penalties
and all-allowed masks they return exactly what `sample` returns (x / 1, x * 1 and x - 0 are
exact, and an allowed logit passes unchanged), so a row pays for what it asked and nothing else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels.step_inputs import Penalties, Sampling, TokenMask

# Fixed width of the top-logprobs output: OpenAI allows at most 20.
TOP_LOGPROBS = 20


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (TokenMask.bitmask's width)."""
    return (vocab_size + 31) // 32


def _mask_row(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Set to -inf every logit that top-k, top-p or min-p removes (one row, already tempered)."""
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    vocab = logits.shape[-1]
    sorted_desc = jnp.sort(logits)[::-1]
    # top-k: keep values >= the k-th largest; k <= 0 or k >= vocab means off.
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)
    kth = sorted_desc[k - 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
    sorted_desc = jnp.where(jnp.arange(vocab) < k, sorted_desc, neg_inf)
    # top-p over what top-k left: keep the smallest prefix whose mass reaches p (always >= 1 token).
    probs = jax.nn.softmax(sorted_desc)
    mass_before = jnp.cumsum(probs) - probs
    keep = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf))
    logits = jnp.where(logits < cutoff, neg_inf, logits)
    # min-p: drop tokens whose probability is below min_p times the top probability.
    row_probs = jax.nn.softmax(logits)
    logits = jnp.where(row_probs < min_p * jnp.max(row_probs), neg_inf, logits)
    return logits


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """``jnp.argmax(logits, axis=-1)`` as i32, ties and NaNs included (the first maximum, or the
    first NaN), in two plain reductions: XLA:CPU runs argmax's (value, index) reduction one element
    at a time, 3.8x slower on 16 x 1000 logits, and a decode step pays it for every token."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    vocab = logits.shape[-1]
    hits = (logits == top) | jnp.isnan(logits)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hits, ids, vocab), axis=-1)


def _sample_row(logits, temperature, top_k, top_p, min_p, seed, step):
    greedy = greedy_tokens(logits)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    masked = _mask_row(logits / safe_t, top_k, top_p, min_p)
    key = jax.random.fold_in(jax.random.key(seed), step)
    drawn = jax.random.categorical(key, masked).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _outputs(
    logits: jax.Array, tokens: jax.Array, want: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(tokens, logprob of each, top ids, top logprobs) under the model's own distribution.

    want: i32[R], rows whose request asked for logprobs; when none did, the log-softmax and top-k
    are skipped and zeros come back. With a real vocabulary they are most of the sampler: 16
    greedy rows x 152k logits on CPU, 19.8 ms with them, 3.8 ms without (benchmarks/sampler.py).
    """
    top = min(TOP_LOGPROBS, logits.shape[-1])

    def logprobs() -> tuple[jax.Array, jax.Array, jax.Array]:
        lp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, top)
        return chosen, top_ids.astype(jnp.int32), top_lp

    rows = logits.shape[0]
    zeros = (
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, top), jnp.int32),
        jnp.zeros((rows, top), jnp.float32),
    )
    return tokens, *jax.lax.cond(jnp.any(want > 0), logprobs, lambda: zeros)


def _choose(logits: jax.Array, s: Sampling) -> jax.Array:
    """Tokens for every row. An all-greedy batch (the common serving case) skips the sort, the
    masks and the random draw; the result is the same argmax either way."""
    columns = (s.temperature, s.top_k, s.top_p, s.min_p, s.seed, s.step)
    return jax.lax.cond(
        jnp.any(s.temperature > 0),
        lambda: jax.vmap(_sample_row)(logits, *columns),
        lambda: greedy_tokens(logits),
    )


def sample(
    logits: jax.Array, sampling: Sampling
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Sample one token per row: logits f32[R,V], each row's settings in `sampling`.

    Returns (tokens i32[R], logprob f32[R] of the chosen token under the unmodified model
    distribution, top ids i32[R,20], top logprobs f32[R,20]); the last three are zeros when no
    row wants logprobs.
    """
    logits = logits.astype(jnp.float32)
    return _outputs(logits, _choose(logits, sampling), sampling.want_logprobs)


def apply_penalties(logits: jax.Array, p: Penalties) -> jax.Array:
    """vLLM's penalties (``vllm.model_executor.layers.utils.apply_penalties``), row by row.

    logits f32[R,V]; p.history i32[R,S]: the row's prompt then its output tokens, padded with any
    id outside [0, V) (ignored); positions ``< p.prompt_len`` are prompt, the rest output. In
    this order:

    1. repetition (CTRL / HF / vLLM): for every token seen in the prompt *or* the output, a
       positive logit is divided by ``repetition``, a non-positive one multiplied by it (1 = off);
    2. frequency (OpenAI): ``logit -= frequency * count``, count = occurrences in the *output*;
    3. presence (OpenAI): ``logit -= presence`` for every token that occurs in the *output*.

    Counts are per-row scatter-adds into a [R,V] buffer: no one-hot [R,S,V] is ever formed.
    """
    r, v = logits.shape
    history = p.history
    s = history.shape[1]
    valid = (history >= 0) & (history < v)
    ids = jnp.where(valid, history, v)  # v is out of bounds: dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32)[:, None], (r, s))
    is_output = jnp.arange(s, dtype=jnp.int32)[None, :] >= p.prompt_len[:, None]
    zeros = jnp.zeros((r, v), jnp.float32)
    seen = zeros.at[rows, ids].add(1.0, mode="drop") > 0
    out_counts = zeros.at[rows, ids].add(is_output.astype(jnp.float32), mode="drop")
    penalty = jnp.where(seen, p.repetition_penalty[:, None], 1.0)
    logits = jnp.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - p.frequency_penalty[:, None] * out_counts
    return logits - p.presence_penalty[:, None] * (out_counts > 0).astype(jnp.float32)


def sample_penalized(
    logits: jax.Array, sampling: Sampling, penalties: Penalties
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`sample` after `apply_penalties`.

    As in vLLM, penalties come before temperature, top-k/p and min-p, and greedy rows take the
    argmax of the penalized logits; logprobs stay those of the unpenalized model distribution
    (vLLM's default ``raw_logprobs``), like `sample`'s.
    """
    logits = logits.astype(jnp.float32)
    tokens = _choose(apply_penalties(logits, penalties), sampling)
    return _outputs(logits, tokens, sampling.want_logprobs)


def apply_token_mask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf for every token whose bit is clear: logits f32[R,V], bitmask i32[R, ceil(V/32)].

    The bits are unpacked with a shift per bit position ([R, W, 32] -> [R, W*32]), not a gather
    of word ``t // 32`` per token: one broadcast op XLA fuses into the select.
    """
    r, v = logits.shape
    shifts = jnp.arange(32, dtype=jnp.int32)
    bits = jnp.right_shift(bitmask[:, :, None], shifts) & 1  # arithmetic shift; & 1 keeps the bit
    allowed = bits.reshape(r, -1)[:, :v] != 0
    return jnp.where(allowed, logits, jnp.array(-jnp.inf, logits.dtype))


def sample_masked(
    logits: jax.Array, sampling: Sampling, penalties: Penalties, mask: TokenMask
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`sample_penalized` restricted to the tokens `mask` allows (structured output).

    The mask comes after the penalties and before temperature, top-k/p and min-p, so those act
    on the allowed tokens only, and a greedy row takes the best allowed token (as xgrammar's and
    llguidance's logits processors do in vLLM). Logprobs stay the unmodified model
    distribution's, like the other samplers'. A row must allow at least one token: the host
    never sends an empty mask (a grammar in error allows EOS).
    """
    logits = logits.astype(jnp.float32)
    constrained = apply_token_mask(apply_penalties(logits, penalties), mask.bitmask)
    return _outputs(logits, _choose(constrained, sampling), sampling.want_logprobs)
