"""Per-request sampling parameters (OpenAI-style) and their validation.

`SamplingParams` is frozen: the server builds one per request, calls `validate()`, and every
sequence of that request shares it. Ranges follow the OpenAI API where it defines them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aotlm.errors import RequestError

if TYPE_CHECKING:  # the grammar engine loads only where grammars are compiled (the engine)
    from aotlm.grammar.spec import GrammarSpec

# Below this temperature the sampler is greedy; dividing logits by ~0 would overflow instead.
GREEDY_EPS = 1e-5
MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP = 16  # OpenAI takes 4
MAX_STOP_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
_INT32_MAX = 2**31 - 1  # the sampler's top_k input is int32


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    `top_k` 0 or -1 means off. `seed` None means "not reproducible": each sequence then draws
    its own random seed. `logprobs` is the number of top alternatives to return per token
    (None: none; the sampled token's own logprob is always available). `stop` strings are
    matched by the engine's detokenizer; `stop_token_ids` and EOS by the scheduler.
    `grammar` constrains the output (structured output): every sampled token is one it allows.
    A bare string for `stop` and lists for `stop`/`stop_token_ids` are normalised to tuples.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16
    logprobs: int | None = None
    n: int = 1
    ignore_eos: bool = False
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        # OpenAI accepts `stop` as one string or a list; keep the dataclass hashable either way.
        stop = (self.stop,) if isinstance(self.stop, str) else _as_tuple("stop", self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        """True when the device should take the argmax (pass temperature 0 to the sampler)."""
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """True when a presence, frequency or repetition penalty is not neutral (0, 0, 1)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def effective_top_k(self) -> int:
        """top_k as the device sampler wants it: 0 means off (so -1 becomes 0); a top_k past
        int32 (any top_k >= the vocabulary keeps every token) is clamped to fit its column."""
        return 0 if self.top_k < 0 else min(self.top_k, _INT32_MAX)

    def validate(self) -> SamplingParams:
        """Raise `RequestError` naming the first bad parameter and its allowed range.

        Returns self so that `SamplingParams(...).validate()` can be used inline.
        """
        _check_real("temperature", self.temperature, lambda v: 0.0 <= v <= 100.0, "[0, 100]")
        _check_real("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "(0, 1]")
        _check_real("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "[0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_real(name, getattr(self, name), lambda v: -2.0 <= v <= 2.0, "[-2, 2]")
        _check_real(
            "repetition_penalty",
            self.repetition_penalty,
            lambda v: 0.0 < v < math.inf,
            "(0, inf) (1 means off)",
        )
        _check_int("top_k", self.top_k, lambda v: v >= -1, ">= 0, or -1 / 0 for off")
        _check_int("max_tokens", self.max_tokens, lambda v: v >= 1, ">= 1")
        _check_int("n", self.n, lambda v: 1 <= v <= MAX_N, f"1..{MAX_N}")
        if self.logprobs is not None:
            _check_int(
                "logprobs", self.logprobs, lambda v: 0 <= v <= MAX_LOGPROBS, f"0..{MAX_LOGPROBS}"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, lambda v: True, "of any size")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        # Stop strings are matched on the engine thread after every token, at a cost that grows
        # with their number and length: unbounded, one request could slow every other one.
        if len(self.stop) > MAX_STOP:
            raise RequestError(f"stop takes at most {MAX_STOP} strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                shown = repr(s[:40]) + "..." if isinstance(s, str) and len(s) > 40 else repr(s)
                raise RequestError(
                    f"stop must hold non-empty strings of at most {MAX_STOP_CHARS} characters, "
                    f"got {shown}"
                )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(
                f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids, "
                f"got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lambda v: v >= 0, ">= 0")
        return self


def _as_tuple(name: str, value: object) -> tuple:
    if value is None:
        return ()
    try:
        return tuple(value)  # type: ignore[call-overload]
    except TypeError:
        raise RequestError(f"{name} must be a list, got {value!r}") from None


def _is_int(value: object) -> bool:
    # bool is an int subclass, but `true` for a count is a client bug worth reporting.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_real(name: str, value: object, in_range: Callable[[float], bool], allowed: str) -> None:
    """NaN fails every comparison, so `in_range` rejects it too."""
    if not (_is_int(value) or isinstance(value, float)) or not in_range(value):
        raise RequestError(f"{name} must be a number in {allowed}, got {value!r}")


def _check_int(name: str, value: object, in_range: Callable[[int], bool], allowed: str) -> None:
    if not _is_int(value) or not in_range(value):
        raise RequestError(f"{name} must be an integer {allowed}, got {value!r}")
