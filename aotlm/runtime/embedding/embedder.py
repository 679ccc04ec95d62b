"""The host side of an encoder bundle: tokenize, plan (S, B) buckets, pad, run embed[S,B], unpad.

Like the decoder runner, it calls only the bundle's sealed executables, under
`jax.no_tracing(True)`, with host arrays passed as numpy (the executable transfers them): nothing
compiles after the bundle is loaded. Inputs are sorted longest first and cut into calls by `plan_batches`, which
minimises padded tokens plus a fixed cost per call; results come back in input order.

Padding rows and padding positions carry attention_mask 0: attention and mean pooling ignore
them, so an embedding does not depend on its batch or bucket beyond float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from aotlm.buckets.ladder import pick_bucket
from aotlm.bundle import ENCODER, Bundle, read_manifest
from aotlm.errors import BundleError, RequestError
from aotlm.runtime.load.loader import LoadedBundle, load_bundle
from aotlm.runtime.load.tokenizer import BundleTokenizer, valid_text
from aotlm.runtime.load.trust import TrustPolicy

# What one more call costs, in padded tokens: a call's fixed overhead (dispatch, transfers) on a
# small encoder is about what a few dozen extra tokens cost. Only the batch plan depends on it.
CALL_COST_TOKENS = 64
EMBED = "embed"


class EmbedInputError(RequestError):
    """A bad embedding input; `param` names the request field (the server's 400 says it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class InputTooLongError(EmbedInputError):
    """An input longer than the bundle's max_seq_len, without truncation asked for."""

    def __init__(self, index: int | None, length: int, limit: int) -> None:
        which = "input" if index is None else f"input[{index}]"
        super().__init__(
            "input",
            f"{which} has {length} tokens, but this model's maximum input length is {limit} "
            f"tokens; shorten it, or send truncate_prompt_tokens (-1: cut to {limit})",
        )


@dataclass(frozen=True)
class EmbedCall:
    """One call of embed[seq_len, batch]: `rows` are input indices, longest first."""

    rows: tuple[int, ...]
    seq_len: int
    batch: int


def plan_batches(
    lengths: Sequence[int],
    seq_buckets: Sequence[int],
    batch_buckets: Sequence[int],
    call_cost: int = CALL_COST_TOKENS,
) -> list[EmbedCall]:
    """Cut inputs (sorted longest first) into calls, minimising padded tokens (B·S per call) plus
    `call_cost` per call: one long input does not drag a batch of short ones up to its bucket.

    >>> [c.rows for c in plan_batches([5, 200, 7], (16, 256), (1, 2, 4))]
    [(1,), (2, 0)]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    seq = [pick_bucket(seq_buckets, lengths[i], kind="token") for i in order]
    b_max = batch_buckets[-1]
    batch_of = [0] + [pick_bucket(batch_buckets, k, kind="request") for k in range(1, b_max + 1)]
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):  # best[j]: cheapest plan of the j longest inputs
        for i in range(max(0, j - b_max), j):  # last call takes order[i:j]; S set by order[i]
            cost = best[i] + call_cost + batch_of[j - i] * seq[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    calls, j = [], n
    while j:
        i = cut[j]
        calls.append(EmbedCall(tuple(order[i:j]), seq[i], batch_of[j - i]))
        j = i
    return calls[::-1]


def _require_encoder(kind: str, path: Path | str) -> None:
    if kind != ENCODER:
        raise BundleError(
            f"{path}: a {kind} bundle is not an embedding model (it has no embed graphs); "
            "build one from an encoder checkpoint (e.g. BertModel)"
        )


class EncoderTokenizer(BundleTokenizer):
    """The bundle's tokenizer plus truncation as sentence-transformers does it: the text is cut
    on the tokenizer's `truncation_side` (default right) and the special tokens are kept."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__(bundle)
        self.truncation_side = str(self.config.get("truncation_side") or "right")

    def encode_truncated(self, text: str, max_tokens: int) -> list[int]:
        enc = self._tok.encode(valid_text(text), add_special_tokens=False)  # 400, not 500
        room = max(0, max_tokens - self._tok.num_special_tokens_to_add(False))
        if len(enc.ids) > room:
            enc.truncate(room, direction=self.truncation_side)
        return self._tok.post_process(enc).ids[:max_tokens]


class Embedder:
    """Sentence embeddings from a loaded encoder bundle. Not thread-safe: one thread calls it
    (the server's embedder thread, or the CLI)."""

    def __init__(self, loaded: LoadedBundle, *, strict: bool = False) -> None:
        _require_encoder(loaded.kind, loaded.bundle.path)
        self.loaded = loaded
        self.counter = loaded.counter
        self.strict = strict
        self.tokenizer = EncoderTokenizer(loaded.bundle)
        self.max_seq_len = loaded.serving.max_seq_len
        self.dim = loaded.model.hidden_size
        self.vocab_size = loaded.model.vocab_size
        self.real_tokens = 0  # tokens embedded, and tokens run including padding
        self.padded_tokens = 0

    @classmethod
    def from_bundle(
        cls, path: Path | str, *, strict: bool = False, trust: TrustPolicy | None = None
    ) -> Embedder:
        """Load, get every executable, seal: from here on any compile is counted."""
        _require_encoder(read_manifest(path)[0].kind, path)
        loaded = load_bundle(path, trust=trust)
        loaded.counter.seal()
        return cls(loaded, strict=strict)

    @property
    def compiles_after_ready(self) -> int:
        return self.counter.after_seal

    def truncation(self, truncate_prompt_tokens: int | None) -> int | None:
        """vLLM's `truncate_prompt_tokens` -> tokens to keep (None: do not truncate)."""
        k = truncate_prompt_tokens
        if k is None:
            return None
        if k == -1:
            return self.max_seq_len
        if not 1 <= k <= self.max_seq_len:
            raise EmbedInputError(
                "truncate_prompt_tokens",
                f"truncate_prompt_tokens must be -1 (the model's maximum, {self.max_seq_len}) "
                f"or between 1 and {self.max_seq_len} (got {k})",
            )
        return k

    def token_ids(
        self, item: str | Sequence[int], truncate: int | None = None, index: int | None = None
    ) -> list[int]:
        """One input as checked token ids: text is tokenized with special tokens; ids are taken
        as given. Over max_seq_len raises InputTooLongError unless `truncate` (tokens to keep,
        from `truncation`) is set: text keeps its special tokens and loses tokens on the
        tokenizer's truncation side; ids keep their last `truncate` (as vLLM does)."""
        if isinstance(item, str):
            ids = self.tokenizer.encode(item)
            if truncate is not None and len(ids) > truncate:
                ids = self.tokenizer.encode_truncated(item, truncate)
        else:
            ids = [int(t) for t in item]
            if truncate is not None:
                ids = ids[-truncate:]
            where = "input" if index is None else f"input[{index}]"
            if not ids:
                raise EmbedInputError("input", f"{where} is an empty list of token ids")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise EmbedInputError(
                    "input", f"{where}: token ids must be in [0, {self.vocab_size})"
                )
        if len(ids) > self.max_seq_len:
            raise InputTooLongError(index, len(ids), self.max_seq_len)
        return ids

    def embed(
        self, inputs: Sequence[str | Sequence[int]], truncate_prompt_tokens: int | None = None
    ) -> np.ndarray:
        """Texts (or token-id lists) -> f32 [N, H] embeddings, in input order."""
        truncate = self.truncation(truncate_prompt_tokens)
        one = len(inputs) == 1
        ids = [self.token_ids(x, truncate, None if one else i) for i, x in enumerate(inputs)]
        return self.embed_ids(ids)

    def embed_ids(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """Checked token-id lists (each at most max_seq_len) -> f32 [N, H], in input order."""
        out = np.zeros((len(inputs), self.dim), np.float32)
        calls = plan_batches(
            [len(x) for x in inputs], self.loaded.token_buckets, self.loaded.request_buckets
        )
        for call in calls:
            out[list(call.rows)] = self._run(call, inputs)
        return out

    def _run(self, call: EmbedCall, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        ids = np.zeros((call.batch, call.seq_len), np.int32)
        mask = np.zeros_like(ids)
        for r, i in enumerate(call.rows):
            ids[r, : len(inputs[i])] = inputs[i]
            mask[r, : len(inputs[i])] = 1
        exe = self.loaded.executables[(EMBED, (call.seq_len, call.batch))]
        with jax.no_tracing(True):
            pooled = np.asarray(exe(self.loaded.params, ids, mask, np.zeros_like(ids)))
        if self.strict:
            self.counter.check()
        self.real_tokens += int(mask.sum())
        self.padded_tokens += ids.size
        return pooled[: len(call.rows)]
