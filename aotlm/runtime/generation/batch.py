"""Pack one engine step into the padded host arrays the step functions take (numpy arrays, some
in the named step inputs of aotlm/kernels/step_inputs.py).

Token layout: the chunks' tokens back to back, then padding. Padding tokens write their KV into
page 0 (the trash page, never handed out) and read request row 0; their outputs are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aotlm.buckets import pick_bucket
from aotlm.kernels.step_inputs import Penalties, Sampling, TokenMask


@dataclass(frozen=True)
class ChunkInput:
    """What the device needs to know about one scheduled chunk of one sequence."""

    token_ids: Sequence[int]
    start: int  # position of token_ids[0]
    block_table: Sequence[int]
    samples: bool  # the chunk ends at the sequence's last token: sample the next one
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    step: int = 0  # tokens generated so far (keys the per-request random stream)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # With penalties: the sequence's tokens so far (prompt then output) and the prompt's length.
    history: Sequence[int] = ()
    prompt_len: int = 0
    num_top: int = 0  # top alternatives (with logprobs) to return for the sampled token
    want_logprobs: bool = False  # return the sampled token's logprob (and num_top alternatives)
    # Under a grammar: the tokens it allows next, a packed int32 row (see TokenMask); () is free.
    bitmask: Sequence[int] | np.ndarray = ()
    adapter: int = 0  # the LoRA slot the sequence's adapter is in (0: the base model)

    @property
    def penalized(self) -> bool:
        """True when the penalized sampler must run for this chunk's row."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


@dataclass(frozen=True)
class StepArrays:
    tokens: int
    requests: int
    forward: tuple[np.ndarray, ...]  # tokens, positions, slots, token_req, block_tables
    rows: np.ndarray  # i32[R]: hidden row of each sampling chunk's last token
    sampling: Sampling
    sample_chunks: tuple[int, ...]  # chunk index of each real row
    real_tokens: int
    # Only when some sampling row has non-neutral penalties (then sample_penalized runs), or
    # with `mask`.
    penalties: Penalties | None = None
    # Only when some sampling row is under a grammar (then sample_masked runs).
    mask: TokenMask | None = None
    # i32[T]: each token's LoRA slot (0 for padding and the base model); forward takes it in a
    # bundle with lora.
    adapters: np.ndarray | None = None


def pack_step(
    chunks: Sequence[ChunkInput],
    token_ladder: Sequence[int],
    request_ladder: Sequence[int],
    pages_per_seq: int,
    page_size: int,
    max_seq_len: int = 0,
    mask_words: int = 0,
) -> StepArrays:
    """Pad ``chunks`` to buckets; ``max_seq_len`` (the history width) is needed with penalties,
    ``mask_words`` (bitmask_words(V)) with grammars."""
    n = sum(len(c.token_ids) for c in chunks)
    t_bucket = pick_bucket(token_ladder, n)
    r_max = max(request_ladder)
    if len(chunks) > r_max:
        raise ValueError(f"{len(chunks)} chunks in one step; the largest request bucket is {r_max}")
    tokens = np.zeros(t_bucket, np.int32)
    positions = np.zeros(t_bucket, np.int32)
    slots = np.zeros(t_bucket, np.int32)
    token_req = np.zeros(t_bucket, np.int32)
    adapters = np.zeros(t_bucket, np.int32)
    tables = np.zeros((r_max, pages_per_seq), np.int32)
    rows, sample_chunks = [], []
    at = 0
    for i, c in enumerate(chunks):
        k = len(c.token_ids)
        pos = np.arange(c.start, c.start + k, dtype=np.int32)
        table = np.asarray(c.block_table, np.int32)
        tokens[at : at + k] = c.token_ids
        positions[at : at + k] = pos
        slots[at : at + k] = table[pos // page_size] * page_size + pos % page_size
        token_req[at : at + k] = i
        adapters[at : at + k] = c.adapter
        tables[i, : len(table)] = table
        at += k
        if c.samples:
            rows.append(at - 1)
            sample_chunks.append(i)
    r_bucket = pick_bucket(request_ladder, max(1, len(rows)), kind="request")
    pad = r_bucket - len(rows)
    picked = [chunks[i] for i in sample_chunks]
    masked = any(len(c.bitmask) for c in picked)
    return StepArrays(
        tokens=t_bucket,
        requests=r_bucket,
        forward=(tokens, positions, slots, token_req, tables),
        rows=np.asarray(rows + [0] * pad, np.int32),
        sampling=Sampling.pack(picked, r_bucket),
        sample_chunks=tuple(sample_chunks),
        real_tokens=n,
        penalties=(
            Penalties.pack(picked, r_bucket, max_seq_len=max_seq_len)
            if masked or any(c.penalized for c in picked)
            else None
        ),
        mask=TokenMask.pack(picked, r_bucket, mask_words=mask_words) if masked else None,
        adapters=adapters,
    )
