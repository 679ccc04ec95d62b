"""Compile grammar specs against a bundle's tokenizer, once per spec, within fixed limits.

One `GrammarCompiler` per served bundle: building llguidance's view of the vocabulary is the
expensive part (~140 ms for 32k tokens), a grammar is 1-2 ms. Compiled grammars are kept in a
bounded LRU keyed by the spec, so a client that sends the same schema every request pays once
and a client that sends a new one every request cannot grow memory. Parser limits bound the time
and memory one hostile schema may take, at compile time and at every mask step; hitting them is
a GrammarError for that request, never a stall for the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import numpy as np

from aotlm.grammar.spec import GrammarError, GrammarSpec
from aotlm.kernels.sampling import bitmask_words

MAX_CACHED = 256
# llguidance's defaults, stated so they are ours: lexer fuel ~50k/ms at compile, ~14k/ms a step.
LIMITS = dict(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, max_grammar_size=500_000)


class GrammarCompiler:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        eos = sorted(eos_token_ids)
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer_json, n_vocab=vocab_size, eos_token=eos[0] if len(eos) == 1 else eos
        )
        self.limits = llguidance.LLParserLimits(**LIMITS)
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on the event loop's threads

    def compile(self, spec: GrammarSpec) -> str:
        """The validated grammar of `spec` (cached); GrammarError naming `spec.param` if bad."""
        with self._lock:
            if (hit := self._cache.get(spec.key)) is not None:
                self._cache.move_to_end(spec.key)
                return hit
        try:
            grammar = spec.to_llguidance()
        except (ValueError, TypeError) as e:
            raise GrammarError(spec.param, _one_line(str(e))) from None
        problem = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer, limits=self.limits)
        if problem and not problem.startswith("WARNING"):
            raise GrammarError(spec.param, _one_line(problem))
        with self._lock:
            self._cache[spec.key] = grammar
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return grammar

    def matcher(self, spec: GrammarSpec) -> RowGrammar:
        matcher = llguidance.LLMatcher(self.tokenizer, self.compile(spec), limits=self.limits)
        return RowGrammar(matcher, self.vocab_size)


class RowGrammar:
    """One sequence's place in its grammar: which tokens may come next, and the ones taken."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._m = matcher
        self.words = bitmask_words(vocab_size)

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row` (int32 [bitmask_words(V)], C-contiguous)."""
        if row.shape != (self.words,) or row.dtype != np.int32 or not row.flags["C_CONTIGUOUS"]:
            raise ValueError(f"a bitmask row must be a contiguous int32[{self.words}]")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token_id: int) -> bool:
        """Take the sampled token; False if the grammar forbids it (the matcher is then in error)."""
        return self._m.consume_token(token_id)

    @property
    def done(self) -> bool:
        """Nothing but EOS may follow (the grammar is complete, or in error)."""
        return self._m.is_stopped()

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (it may still continue)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()


def _one_line(message: str, limit: int = 400) -> str:
    """The engine's multi-line message as one line (API errors and logs are one line)."""
    return " ".join(message.split())[:limit]


def allowed(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a bitmask row allows (for tests and debugging; samplers read the bits)."""
    bits = (row.view(np.uint32)[:, None] >> np.arange(32, dtype=np.uint32)) & 1
    return np.flatnonzero(bits.reshape(-1)[:vocab_size])
