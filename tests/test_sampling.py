"""The device sampler (aotlm/kernels/sampling.py): greedy picks against jnp.argmax, penalties against
a numpy reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aotlm.grammar.compiler import allowed
from aotlm.kernels.sampling import (
    apply_penalties,
    apply_token_mask,
    bitmask_words,
    greedy_tokens,
    sample,
    sample_masked,
    sample_penalized,
)
from aotlm.kernels.step_inputs import Penalties, Sampling, TokenMask

V, S = 50, 24


def penalties_reference(logits, history, prompt_len, presence, frequency, repetition):
    """vLLM's apply_penalties written out row by row, token by token."""
    out = logits.astype(np.float64).copy()
    for r in range(out.shape[0]):
        ids = [(pos, int(t)) for pos, t in enumerate(history[r]) if 0 <= t < V]
        seen = {t for _, t in ids}
        counts: dict[int, int] = {}
        for pos, t in ids:
            if pos >= prompt_len[r]:
                counts[t] = counts.get(t, 0) + 1
        for t in seen:
            x = out[r, t]
            out[r, t] = x / repetition[r] if x > 0 else x * repetition[r]
        for t, n in counts.items():
            out[r, t] -= frequency[r] * n + presence[r]
    return out


def random_inputs(rng: np.random.Generator, rows: int):
    logits = rng.normal(0, 3, (rows, V)).astype(np.float32)
    history = rng.integers(0, V, (rows, S)).astype(np.int32)
    lengths = rng.integers(0, S + 1, rows)
    prompt_len = np.minimum(rng.integers(0, S + 1, rows), lengths).astype(np.int32)
    for r, n in enumerate(lengths):
        history[r, n:] = rng.choice([-1, V, V + 7])  # padding: any id outside [0, V)
    presence = rng.uniform(-2, 2, rows).astype(np.float32)
    frequency = rng.uniform(-2, 2, rows).astype(np.float32)
    repetition = rng.uniform(0.5, 2.5, rows).astype(np.float32)
    return logits, history, prompt_len, presence, frequency, repetition


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_greedy_tokens_equal_argmax_with_ties_nans_and_infinities(dtype):
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 4, (12, V)).astype(np.float32)  # small integers: many ties
    logits[1] = -np.inf  # nothing allowed: index 0, as argmax
    logits[2, [5, 9]] = np.nan  # the first NaN wins, as in argmax
    logits[3] = np.nan
    logits[4, 7] = np.inf
    logits[5, [3, 30]] = np.inf
    x = jnp.asarray(logits, dtype)
    got = np.asarray(jax.jit(greedy_tokens)(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert got[2] == 5 and got[5] == 3


@pytest.mark.parametrize("seed", range(6))
def test_penalties_match_the_numpy_reference(seed):
    args = random_inputs(np.random.default_rng(seed), rows=4)
    ours = np.asarray(jax.jit(apply_penalties)(args[0], Penalties(*args[1:])))
    np.testing.assert_allclose(ours, penalties_reference(*args), rtol=1e-5, atol=1e-5)


def test_greedy_takes_the_argmax_of_penalized_logits_and_logprobs_stay_raw():
    rng = np.random.default_rng(7)
    logits, history, prompt_len, presence, frequency, repetition = random_inputs(rng, rows=4)
    rows = logits.shape[0]
    greedy = Sampling(
        temperature=np.zeros(rows, np.float32),
        top_k=np.zeros(rows, np.int32),
        top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32),
        seed=np.arange(rows, dtype=np.uint32),
        step=np.zeros(rows, np.int32),
        want_logprobs=np.ones(rows, np.int32),
    )
    penalties = (history, prompt_len, presence, frequency, repetition)
    tokens, logprob, _, _ = jax.jit(sample_penalized)(logits, greedy, Penalties(*penalties))
    expected = penalties_reference(logits, *penalties).argmax(-1)
    assert np.asarray(tokens).tolist() == expected.tolist()
    raw = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(
        np.asarray(logprob), np.asarray(raw)[np.arange(rows), expected], rtol=1e-6
    )


def mixed_sampling(rng: np.random.Generator) -> Sampling:
    """Eight rows: greedy, tempered, top-k, top-p and min-p mixed."""
    return Sampling(
        temperature=np.array([0, 0.7, 1.0, 1.3, 0, 0.5, 2.0, 0.9], np.float32),
        top_k=np.array([0, 5, 0, 10, 0, 0, 3, 0], np.int32),
        top_p=np.array([1, 0.9, 0.8, 1, 1, 0.5, 1, 0.95], np.float32),
        min_p=np.array([0, 0, 0.05, 0, 0, 0.1, 0, 0], np.float32),
        seed=rng.integers(0, 2**32, 8).astype(np.uint32),
        step=rng.integers(0, 100, 8).astype(np.int32),
        want_logprobs=np.ones(8, np.int32),
    )


def pack(allowed_rows: list[np.ndarray], vocab: int) -> np.ndarray:
    """Token ids per row -> the packed int32 bitmask a grammar engine writes."""
    bits = np.zeros((len(allowed_rows), bitmask_words(vocab) * 32), np.uint8)
    for r, ids in enumerate(allowed_rows):
        bits[r, ids] = 1
    return np.packbits(bits, axis=-1, bitorder="little").view(np.int32)


def test_the_token_mask_forbids_exactly_the_clear_bits():
    """apply_token_mask against the host's reading of the same bits (grammar.compiler.allowed),
    for a vocabulary that does not fill its last word, bit 31 (the sign bit) included."""
    rng = np.random.default_rng(11)
    vocab = 70
    rows = [rng.choice(vocab, n, replace=False) for n in (1, 5, 35, 69, 70)] + [np.array([31, 63])]
    bitmask = pack(rows, vocab)
    logits = rng.standard_normal((len(rows), vocab)).astype(np.float32)
    out = np.asarray(jax.jit(apply_token_mask)(logits, bitmask))
    for r, ids in enumerate(rows):
        assert allowed(bitmask[r], vocab).tolist() == sorted(ids.tolist())
        assert np.isfinite(out[r]).nonzero()[0].tolist() == sorted(ids.tolist())
        np.testing.assert_array_equal(out[r, ids], logits[r, ids])


def test_masked_sampling_takes_only_allowed_tokens_and_all_ones_changes_nothing():
    rng = np.random.default_rng(4)
    logits, history, prompt_len, *_ = random_inputs(rng, rows=8)
    sampling = mixed_sampling(rng)
    neutral = Penalties(history, prompt_len, *np.zeros((2, 8), np.float32), np.ones(8, np.float32))
    words = bitmask_words(V)
    everything = TokenMask(np.full((8, words), -1, np.int32))
    a = jax.jit(sample)(logits, sampling)
    b = jax.jit(sample_masked)(logits, sampling, neutral, everything)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [rng.choice(V, n, replace=False) for n in (1, 2, 3, 4, 6, 8, 10, 12)]
    mask = TokenMask(pack(rows, V))
    run = jax.jit(sample_masked)
    for step in range(20):  # many draws: a forbidden token would show up
        tokens, logprob, _, _ = run(
            logits, dataclasses.replace(sampling, step=sampling.step + step), neutral, mask
        )
        for r, t in enumerate(np.asarray(tokens)):
            assert t in rows[r]
    greedy = [0, 4]
    for r in greedy:  # the best allowed token, and its logprob under the unmasked model
        best = rows[r][np.argmax(logits[r, rows[r]])]
        assert int(tokens[r]) == best
        raw = np.asarray(jax.nn.log_softmax(logits[r]))
        np.testing.assert_allclose(float(logprob[r]), raw[best], rtol=1e-6)


def test_neutral_penalties_give_exactly_what_sample_gives():
    rng = np.random.default_rng(3)
    logits, history, prompt_len, *_ = random_inputs(rng, rows=8)
    sampling = mixed_sampling(rng)
    neutral = Penalties(history, prompt_len, *np.zeros((2, 8), np.float32), np.ones(8, np.float32))
    a = jax.jit(sample)(logits, sampling)
    b = jax.jit(sample_penalized)(logits, sampling, neutral)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_logprobs_are_skipped_only_when_no_row_wants_them():
    """want_logprobs all 0: the same tokens, zeros for logprobs and alternatives; any row 1: the
    full outputs for every row, exactly what every row asking gives."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 300)).astype(np.float32)
    cols = Sampling(
        temperature=np.array([0, 0.8, 0, 1.2], np.float32),
        top_k=np.zeros(4, np.int32),
        top_p=np.ones(4, np.float32),
        min_p=np.zeros(4, np.float32),
        seed=np.arange(4, dtype=np.uint32),
        step=np.zeros(4, np.int32),
        want_logprobs=np.ones(4, np.int32),
    )
    run = jax.jit(sample)
    full = run(logits, cols)
    none = run(logits, dataclasses.replace(cols, want_logprobs=np.zeros(4, np.int32)))
    some = run(logits, dataclasses.replace(cols, want_logprobs=np.array([0, 0, 1, 0], np.int32)))
    np.testing.assert_array_equal(np.asarray(none[0]), np.asarray(full[0]))
    assert not np.asarray(none[1]).any() and not np.asarray(none[3]).any()
    assert not np.asarray(none[2]).any()
    for x, y in zip(some, full, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (np.asarray(full[1]) < 0).all()  # real logprobs when asked
