"""Run one engine step through the sealed executables: only Compiled calls, never tracing.

Host inputs are passed to the executables as numpy arrays: the executable transfers them to its
own input shardings (never a compile), ~4x cheaper per array than a separate jax.device_put
(measured ~50 us per small array on CPU, which added up to ~0.5 ms per step). Results come back with
np.asarray on the outputs (a transfer too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from aotlm.buckets import pick_bucket
from aotlm.kernels.sampling import bitmask_words
from aotlm.kernels.step_inputs import DecodeRows, Sampling
from aotlm.models import lm_head
from aotlm.models.lora import lora_config
from aotlm.runtime.generation.batch import ChunkInput, StepArrays, pack_step
from aotlm.runtime.load.loader import LoadedBundle


@dataclass(frozen=True)
class Sampled:
    """The token sampled for one chunk, its logprob, and the best alternatives the chunk asked for
    (``ChunkInput.num_top`` of the device's top 20)."""

    token_id: int
    logprob: float
    top_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


class ModelRunner:
    def __init__(self, loaded: LoadedBundle) -> None:
        self.loaded = loaded
        self.exe = loaded.executables
        self.params = loaded.params
        self.head = lm_head(loaded.model, loaded.params)
        self.k_pages = loaded.k_pages
        self.v_pages = loaded.v_pages
        s = loaded.serving
        self.page_size = s.page_size
        self.pages_per_seq = s.pages_per_seq
        self.max_seq_len = s.max_seq_len
        self.token_buckets = loaded.token_buckets
        self.request_buckets = loaded.request_buckets
        # Padding accounting: real vs padded tokens over the runner's life.
        self.real_tokens = 0
        self.padded_tokens = 0
        self.bucket_calls: Counter[tuple[str, tuple[int, ...]]] = Counter()
        # decode[R] runs up to this many steps per call (1: the bundle has no decode graphs).
        self.decode_steps = s.decode_steps
        self.mask_words = bitmask_words(loaded.model.vocab_size)
        # A bundle with lora: forward and decode take each token's (row's) adapter slot.
        lora = loaded.bundle.manifest.serving.lora
        self.lora = lora_config(lora) if lora is not None else None

    def set_lora_slots(self, stacks: dict) -> None:
        """Replace every adapter slot with host ``stacks`` (aotlm/models/lora.py's layout): a
        transfer between steps, never a compile."""
        self.params = {**self.params, "lora": jax.device_put(stacks)}

    def pack(self, chunks: Sequence[ChunkInput]) -> StepArrays:
        return pack_step(
            chunks,
            self.token_buckets,
            self.request_buckets,
            self.pages_per_seq,
            self.page_size,
            max_seq_len=self.max_seq_len,
            mask_words=self.mask_words,
        )

    def _call(self, name: str, bucket: tuple[int, ...], *args):
        self.bucket_calls[(name, bucket)] += 1
        return self.exe[(name, bucket)](*args)

    def _logits(self, step: StepArrays) -> jax.Array | None:
        """forward over the packed tokens, then the LM head on the rows that sample."""
        self.real_tokens += step.real_tokens
        self.padded_tokens += step.tokens
        adapters = (step.adapters,) if self.lora is not None else ()
        hidden, self.k_pages, self.v_pages = self._call(
            "forward",
            (step.tokens,),
            self.params,
            self.k_pages,
            self.v_pages,
            *step.forward,
            *adapters,
        )
        if not step.sample_chunks:
            return None
        return self._call("logits", (step.tokens, step.requests), self.head, hidden, step.rows)

    def compute_logits(self, chunks: Sequence[ChunkInput]) -> np.ndarray:
        """f32 logits [sampling chunks, V] (for oracle checks and scoring); updates the KV cache."""
        step = self.pack(chunks)
        logits = self._logits(step)
        return (
            np.zeros((0, 0), np.float32)
            if logits is None
            else np.asarray(logits)[: len(step.sample_chunks)]
        )

    def execute(self, chunks: Sequence[ChunkInput]) -> dict[int, Sampled]:
        """Run forward (+ logits + sample when any chunk samples); returns chunk index -> Sampled.

        The sampler is sample[R], sample_penalized[R] when a sampling row has penalties, or
        sample_masked[R] when one is under a grammar.
        """
        step = self.pack(chunks)
        logits = self._logits(step)
        if logits is None:
            return {}
        if step.mask is not None:
            out = self._call(
                "sample_masked", (step.requests,), logits, step.sampling, step.penalties, step.mask
            )
        elif step.penalties is None:
            out = self._call("sample", (step.requests,), logits, step.sampling)
        else:
            out = self._call(
                "sample_penalized", (step.requests,), logits, step.sampling, step.penalties
            )
        outputs = [np.asarray(x) for x in out]
        return {
            index: _sampled(outputs, row, chunks[index].num_top)
            for row, index in enumerate(step.sample_chunks)
        }

    def execute_decode(
        self, chunks: Sequence[ChunkInput], limits: Sequence[int], num_steps: int
    ) -> dict[int, list[Sampled]]:
        """``num_steps`` decode steps of one-token chunks in one decode[R] call.

        limits[i]: the last position chunk i may write (see decode_steps in build/steps.py).
        Returns chunk index -> its ``min(num_steps, limit - start + 1)`` samples, in order.
        """
        if not 1 <= num_steps <= self.decode_steps:
            raise ValueError(f"num_steps={num_steps}: this bundle runs 1..{self.decode_steps}")
        rows = pick_bucket(self.request_buckets, len(chunks), kind="request")
        where = [
            {
                "token": c.token_ids[-1],
                "position": c.start,
                "limit": lim,
                "block_table": c.block_table,
            }
            for c, lim in zip(chunks, limits, strict=True)
        ]
        kept = [min(num_steps, lim - c.start + 1) for c, lim in zip(chunks, limits, strict=True)]
        self.real_tokens += sum(kept)
        self.padded_tokens += rows * num_steps
        out = self._call(
            "decode", (rows,), self.params, self.k_pages, self.v_pages,
            DecodeRows.pack(where, rows, pages_per_seq=self.pages_per_seq),
            Sampling.pack(chunks, rows), np.int32(num_steps), *self._row_adapters(chunks, rows),
        )  # fmt: skip
        *sampled, self.k_pages, self.v_pages = out
        outputs = [np.asarray(x) for x in sampled]  # each [K, R, ...]
        return {
            i: [_sampled([x[j] for x in outputs], i, c.num_top) for j in range(kept[i])]
            for i, c in enumerate(chunks)
        }

    def _row_adapters(self, chunks: Sequence[ChunkInput], rows: int) -> tuple[np.ndarray, ...]:
        if self.lora is None:
            return ()
        slots = np.zeros(rows, np.int32)
        slots[: len(chunks)] = [c.adapter for c in chunks]
        return (slots,)


def _sampled(outputs: Sequence[np.ndarray], row: int, num_top: int) -> Sampled:
    """Row `row` of a sampler's (tokens, logprobs, top ids, top logprobs), with the `num_top`
    alternatives its request asked for (usually none: nothing to convert)."""
    tokens, logprobs, top_ids, top_lps = outputs
    return Sampled(
        int(tokens[row]),
        float(logprobs[row]),
        tuple(top_ids[row, :num_top].tolist()),
        tuple(top_lps[row, :num_top].tolist()),
    )
