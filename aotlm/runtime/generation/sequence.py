"""One generated stream: its tokens, its place in the KV cache, and its lifecycle.

A request with `n` choices becomes `n` sequences that share `request_id` and `params`
(build them with `make_sequences`). The scheduler and the block manager mutate sequences;
nothing else should.

Invariants (between steps):
- `num_computed_tokens <= num_tokens`; the KV of tokens `[0, num_computed_tokens)` is in the
  pages `block_table[: ceil(num_computed_tokens / page_size)]`.
- A RUNNING sequence has `num_computed_tokens < num_tokens` (its last token is not yet computed).
- A WAITING, PREEMPTED or finished sequence holds no pages and has `num_computed_tokens == 0`.
"""

from __future__ import annotations

import enum
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from aotlm.runtime.generation.sampling_params import SamplingParams

if TYPE_CHECKING:  # the scheduler imports no jax; the grammar's mask width comes from a kernel
    from aotlm.grammar.compiler import RowGrammar

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue; recomputes prompt + output when admitted
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")

    @property
    def is_waiting(self) -> bool:
        return self in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)

    @classmethod
    def finished(cls, reason: str) -> SequenceStatus:
        """The finished status for an OpenAI-style reason: "stop", "length" or "abort"."""
        status = cls(reason)
        if not status.is_finished:
            raise ValueError(f"finish reason must be 'stop', 'length' or 'abort', got {reason!r}")
        return status


class Sample(NamedTuple):
    """What the device returns for one sequence that sampled this step."""

    token_id: int
    logprob: float = 0.0
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first

    @classmethod
    def of(cls, value: object) -> Sample:
        """Accept a `Sample`, a tuple, a bare token id, or any object with `token_id` /
        `logprob` and either `top_logprobs` pairs or parallel `top_ids` / `top_logprobs`."""
        if isinstance(value, Sample):
            return value
        if isinstance(value, tuple):
            return cls(*value)
        if isinstance(value, int):
            return cls(value)
        top_ids = getattr(value, "top_ids", None)
        top = getattr(value, "top_logprobs", ())
        pairs = tuple(zip(top_ids, top, strict=True)) if top_ids is not None else tuple(top)
        return cls(int(value.token_id), float(getattr(value, "logprob", 0.0)), pairs)


def derive_seed(request_seed: int | None, index: int) -> int:
    """The uint32 seed of choice `index` of a request.

    With a request seed this is a pure function (splitmix64 of seed and index), so a request
    replays exactly and its `n` choices differ. Without one, a fresh random seed.
    """
    if request_seed is None:
        return secrets.randbits(32)
    x = (request_seed * 0x9E3779B97F4A7C15 + index + 1) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return (x ^ (x >> 31)) & _U32


# eq=False: sequences are identities (lists of them use `remove` / `in`), never compared by value.
@dataclass(eq=False)
class Sequence:
    """One stream of tokens being generated.

    `seed` (uint32) and `num_output_tokens` are what the device sampler takes as (seed, step).
    `page_hashes` caches the content hash chain of the full pages of `all_token_ids`; it is
    derived from the tokens (which only grow), so it stays valid across preemption.
    `num_cached_prompt_tokens` is set at first admission (None before) and is what usage reports
    as cached prompt tokens.
    """

    seq_id: int
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    index: int = 0  # which of the request's n choices this is
    seed: int | None = None  # None: derived from params.seed and index
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list, repr=False)
    output_top_logprobs: list[tuple[tuple[int, float], ...]] = field(
        default_factory=list, repr=False
    )
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_prompt_tokens: int | None = None
    page_hashes: list[bytes] = field(default_factory=list, repr=False)
    num_preemptions: int = 0
    # Where the output stands in `params.grammar` (set by the engine; kept across preemption,
    # like the output tokens it has accepted).
    grammar: RowGrammar | None = field(default=None, repr=False)
    # The LoRA adapter it runs under (None: the base model), the bundle slot that holds it
    # while it runs (0: none), and the prefix cache's salt for it: KV computed under one
    # adapter is never shared with another or with the base (adapters.py).
    adapter: str | None = None
    lora_slot: int = 0
    cache_salt: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        if self.seed is None:
            self.seed = derive_seed(self.params.seed, self.index)
        # One flat list so that chunk slicing and page hashing never concatenate.
        self._all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only: mutate only through `append_token`."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Also the sampler's `step`: the position of the next token in this stream's output."""
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._all_token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the device still has to run before this sequence can sample again."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length", "abort", or None while unfinished."""
        return self.status.value if self.status.is_finished else None

    def append_token(self, sample: Sample) -> None:
        self.output_token_ids.append(sample.token_id)
        self.output_logprobs.append(sample.logprob)
        self.output_top_logprobs.append(sample.top_logprobs)
        self._all_token_ids.append(sample.token_id)


def make_sequences(
    request_id: str,
    prompt_token_ids: list[int] | tuple[int, ...],
    params: SamplingParams,
    first_seq_id: int,
    arrival_time: float | None = None,
) -> list[Sequence]:
    """The `params.n` sequences of one request, with seq ids `first_seq_id, first_seq_id + 1, ...`.

    Each gets its own seed (`derive_seed(params.seed, index)`), so the n choices differ and the
    same (prompt, params) replays exactly.
    """
    arrival = time.monotonic() if arrival_time is None else arrival_time
    return [
        Sequence(
            seq_id=first_seq_id + i,
            request_id=request_id,
            prompt_token_ids=tuple(prompt_token_ids),
            params=params,
            index=i,
            arrival_time=arrival,
        )
        for i in range(params.n)
    ]
