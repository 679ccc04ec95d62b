"""Run one engine step through the sealed executables: only Compiled calls, never tracing.

Host arrays go to the device with jax.device_put (a transfer, never a compile); results come back
with np.asarray on the outputs (a transfer too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from aotlm.models import lm_head
from aotlm.runtime.batch import ChunkInput, StepArrays, pack_step
from aotlm.runtime.loader import LoadedBundle


@dataclass(frozen=True)
class Sampled:
    """The token sampled for one chunk, with its logprob and the top-20 alternatives."""

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
        # Host inputs: the default device, or replicated on a sharded bundle's mesh.
        self.inputs = loaded.input_sharding
        s = loaded.serving
        self.page_size = s["page_size"]
        self.pages_per_seq = s["pages_per_seq"]
        self.max_seq_len = s["max_seq_len"]
        self.token_buckets = loaded.token_buckets
        self.request_buckets = loaded.request_buckets
        # Padding accounting: real vs padded tokens over the runner's life.
        self.real_tokens = 0
        self.padded_tokens = 0
        self.bucket_calls: Counter[tuple[str, tuple[int, ...]]] = Counter()
        # Bundles built before sample_penalized existed (format < 3) cannot apply penalties.
        self.supports_penalties = all(
            ("sample_penalized", (r,)) in self.exe for r in self.request_buckets
        )

    def pack(self, chunks: Sequence[ChunkInput]) -> StepArrays:
        return pack_step(
            chunks,
            self.token_buckets,
            self.request_buckets,
            self.pages_per_seq,
            self.page_size,
            max_seq_len=self.max_seq_len,
        )

    def _call(self, name: str, bucket: tuple[int, ...], *args):
        self.bucket_calls[(name, bucket)] += 1
        return self.exe[(name, bucket)](*args)

    def _logits(self, step: StepArrays) -> jax.Array | None:
        """forward over the packed tokens, then the LM head on the rows that sample."""
        self.real_tokens += step.real_tokens
        self.padded_tokens += step.tokens
        hidden, self.k_pages, self.v_pages = self._call(
            "forward",
            (step.tokens,),
            self.params,
            self.k_pages,
            self.v_pages,
            *jax.device_put(step.forward, self.inputs),
        )
        if not step.sample_chunks:
            return None
        rows = jax.device_put(step.rows, self.inputs)
        return self._call("logits", (step.tokens, step.requests), self.head, hidden, rows)

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

        The sampler is sample[R], or sample_penalized[R] when a sampling row has penalties.
        """
        step = self.pack(chunks)
        logits = self._logits(step)
        if logits is None:
            return {}
        if step.penalties is None:
            args = jax.device_put(step.sampling, self.inputs)
            out = self._call("sample", (step.requests,), logits, *args)
        else:
            args = jax.device_put(step.sampling + step.penalties, self.inputs)
            out = self._call("sample_penalized", (step.requests,), logits, *args)
        tokens, logprobs, top_ids, top_lps = (np.asarray(x) for x in out)
        return {
            chunk: Sampled(
                int(tokens[row]),
                float(logprobs[row]),
                tuple(int(t) for t in top_ids[row]),
                tuple(float(v) for v in top_lps[row]),
            )
            for row, chunk in enumerate(step.sample_chunks)
        }
