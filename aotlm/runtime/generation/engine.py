"""The engine: schedule -> execute -> postprocess, one step at a time.

Everything device-side goes through the sealed executables of a loaded bundle, under
`jax.no_tracing(True)`: a shape that was not built raises instead of compiling.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from aotlm.bundle import DECODER, read_manifest
from aotlm.bundle.manifest import Serving
from aotlm.errors import AotlmError, BundleError, RequestError
from aotlm.grammar.compiler import GrammarCompiler
from aotlm.grammar.spec import GrammarError, GrammarSpec
from aotlm.models.llama import layer_shapes
from aotlm.runtime.generation.adapters import AdapterSlots
from aotlm.runtime.generation.batch import ChunkInput
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.runner import ModelRunner
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from aotlm.runtime.generation.sequence import Sequence, make_sequences
from aotlm.runtime.load.loader import LoadedBundle, load_bundle
from aotlm.runtime.load.tokenizer import BundleTokenizer, Detokenizer
from aotlm.runtime.load.trust import TrustPolicy
from aotlm.runtime.worker import EngineStats

log = logging.getLogger(__name__)


class StepFailedError(AotlmError):
    """The device step raised `cause`; only `request_ids` had chunks in that step."""

    def __init__(self, cause: Exception, request_ids: frozenset[str]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.request_ids = cause, request_ids


@dataclass(frozen=True)
class Completion:
    """One finished choice of a request."""

    request_id: str
    index: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    logprobs: tuple[float, ...]


def decode_steps_for(path: Path | str, serving: Serving, asked: int | None) -> int:
    """The decode steps per call to run: `asked`, at most what the bundle was built for
    (serving.decode_steps, also the default)."""
    built = serving.decode_steps
    if asked is not None and not 1 <= asked <= built:
        raise BundleError(
            f"{path}: decode_steps={asked}, but this bundle runs 1..{built} decode steps per "
            "call (model.yaml decode_steps); rebuild it for more"
        )
    return built if asked is None else asked


def _require_decoder(kind: str, path: Path | str) -> None:
    if kind != DECODER:
        raise BundleError(
            f"{path}: an {kind} (embedding model) bundle cannot generate text; serve it with "
            "`aotlm serve` (POST /v1/embeddings) or run `aotlm embed`"
        )


class Engine:
    def __init__(
        self,
        loaded: LoadedBundle,
        *,
        max_waiting: int | None = None,
        strict: bool = False,
        decode_steps: int | None = None,
    ):
        """decode_steps: the most decode steps per device call (at most the bundle's
        serving.decode_steps, its default; 1 runs one step per call)."""
        _require_decoder(loaded.kind, loaded.bundle.path)
        self.loaded = loaded
        self.counter = loaded.counter
        self.strict = strict
        self.tokenizer = BundleTokenizer(loaded.bundle, tuple(loaded.model.eos_token_ids))
        self.runner = ModelRunner(loaded)
        # The device is the host's own cores (XLA:CPU): steps compete with the server for them.
        self.runs_on_host = {d.platform for d in loaded.k_pages.sharding.device_set} == {"cpu"}
        self.decode_steps = decode_steps_for(loaded.bundle.path, loaded.serving, decode_steps)
        s = loaded.serving
        self.max_seq_len = s.max_seq_len
        self.block_manager = BlockManager(s.kv_pages, s.page_size)
        # A bundle with lora: adapters by name in its slots; None: the base model only.
        self.adapters = (
            AdapterSlots(
                self.runner.lora, layer_shapes(loaded.model), loaded.params["embed"].dtype,
                self.runner.set_lora_slots,
            )
            if self.runner.lora is not None
            else None
        )  # fmt: skip
        self.scheduler = Scheduler(
            self.block_manager,
            max_tokens_per_step=max(loaded.token_buckets),
            max_seqs_per_step=max(loaded.request_buckets),
            max_seq_len=self.max_seq_len,
            max_waiting=max_waiting,
            eos_token_ids=self.tokenizer.eos_token_ids,
            slots=self.adapters,
        )
        self._ids = itertools.count()
        self._texts: dict[int, Detokenizer] = {}
        # Format-7 bundles have no masked sampler: they serve everything but grammars.
        self.can_constrain = any(name == "sample_masked" for name, _ in loaded.executables)
        self.grammar_masks, self.grammar_mask_seconds = 0, 0.0  # host work for grammar rows
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path: Path | str, *, trust: TrustPolicy | None = None, **kwargs) -> Engine:
        """Load, compile once, seal: from here on any compile is counted (and fatal if strict)."""
        _require_decoder(read_manifest(path)[0].kind, path)
        loaded = load_bundle(path, trust=trust)
        loaded.counter.seal()
        return cls(loaded, **kwargs)

    @property
    def compiles_after_ready(self) -> int:
        return self.counter.after_seal

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler of this bundle's tokenizer, built on first use (~0.1 s for a
        32k vocabulary), so a server that never sees a grammar never pays for it."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(
                    self.loaded.bundle.read("tokenizer/tokenizer.json").decode(),
                    self.loaded.model.vocab_size,
                    self.tokenizer.eos_token_ids,
                )
            return self._grammars

    def check_grammar(self, spec: GrammarSpec) -> None:
        """Compile `spec` (cached), or raise GrammarError naming its request field. Thread-safe:
        a server calls it off the engine thread, so a slow schema delays only its own request."""
        if not self.can_constrain:
            raise GrammarError(
                spec.param,
                "this bundle (format 7) has no masked sampler, so it cannot constrain output; "
                "rebuild it with `aotlm build` to serve structured output",
            )
        self.grammars.compile(spec)

    def add_request(
        self, prompt: str | Seq[int], params: SamplingParams, adapter: str | None = None
    ) -> list[Sequence]:
        """Queue a request; ``adapter``: the name of a loaded LoRA adapter to run it under."""
        if params.grammar is not None:
            self.check_grammar(params.grammar)
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.paths):
            have = "no LoRA slots" if self.adapters is None else "no adapter by that name loaded"
            raise RequestError(f"adapter {adapter!r}: this bundle has {have}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"prompt is {len(ids)} tokens; this bundle's max_seq_len is {self.max_seq_len} "
                "(prompt plus at least one generated token)"
            )
        if any(not 0 <= t < self.loaded.model.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {self.loaded.model.vocab_size})")
        request_id = f"req-{next(self._ids)}"
        seqs = make_sequences(request_id, ids, params, first_seq_id=next(self._ids))
        for _ in seqs[1:]:
            next(self._ids)  # keep seq ids unique across requests
        if params.grammar is not None:
            for seq in seqs:
                seq.grammar = self.grammars.matcher(params.grammar)
        if adapter is not None:
            for seq in seqs:
                seq.adapter, seq.cache_salt = adapter, self.adapters.salt(adapter)
        self.scheduler.add(*seqs)
        return seqs

    def _chunk_input(self, c: ScheduledChunk) -> ChunkInput:
        p = c.seq.params
        return ChunkInput(
            token_ids=c.token_ids,
            start=c.start,
            block_table=c.seq.block_table,
            samples=c.samples,
            temperature=0.0 if p.is_greedy else p.temperature,
            top_k=p.effective_top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            seed=c.seq.seed,
            step=c.seq.num_output_tokens,
            num_top=p.logprobs or 0,
            want_logprobs=p.logprobs is not None,
            bitmask=self._bitmask(c),
            adapter=c.seq.lora_slot,
            **self._penalties(c),
        )

    def _bitmask(self, c: ScheduledChunk) -> np.ndarray | tuple[()]:
        """The tokens the sequence's grammar allows next, for a sampling chunk under one."""
        grammar = c.seq.grammar
        if not (c.samples and grammar is not None):
            return ()
        row = np.empty(grammar.words, np.int32)
        start = time.perf_counter()
        grammar.fill(row)
        self.grammar_mask_seconds += time.perf_counter() - start
        self.grammar_masks += 1
        return row

    @staticmethod
    def _penalties(c: ScheduledChunk) -> dict:
        """Penalty fields of a sampling chunk; the token history is passed only when needed."""
        p = c.seq.params
        if not (c.samples and p.has_penalties):
            return {}
        return {
            "presence_penalty": p.presence_penalty,
            "frequency_penalty": p.frequency_penalty,
            "repetition_penalty": p.repetition_penalty,
            "history": c.seq.all_token_ids,  # prompt + output so far: the chunk ends at its end
            "prompt_len": c.seq.num_prompt_tokens,
        }

    def step(self) -> list[Sequence]:
        """One engine step; returns the sequences that got a token (finished ones included)."""
        out = self.scheduler.schedule_decode(self.decode_steps)
        if out is not None:
            return self._multi_step(out)
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        sampled = self._run(out, lambda chunks: self.runner.execute(chunks))
        by_seq = {out.chunks[i].seq.seq_id: s for i, s in sampled.items()}
        return self.scheduler.postprocess(out, by_seq, self._on_token)

    def _multi_step(self, out: SchedulerOutput) -> list[Sequence]:
        """Up to decode_steps decode steps of every running sequence in one device call."""
        limits = [c.start + n - 1 for c, n in zip(out.chunks, out.steps, strict=True)]
        sampled = self._run(
            out, lambda chunks: self.runner.execute_decode(chunks, limits, max(out.steps))
        )
        by_seq = {out.chunks[i].seq.seq_id: s for i, s in sampled.items()}
        return self.scheduler.postprocess_decode(out, by_seq, self._on_token)

    def _run(self, out: SchedulerOutput, call):
        """The device call for `out`'s chunks, sealed: no tracing, compiles checked if strict."""
        try:
            if self.adapters is not None:
                self.adapters.flush()  # slots swapped in by this step's admissions
            with jax.no_tracing(True):
                result = call([self._chunk_input(c) for c in out.chunks])
        except Exception as e:  # only these requests ran: the caller fails them, not all
            raise StepFailedError(e, frozenset(c.seq.request_id for c in out.chunks)) from e
        if self.strict:
            self.counter.check()
        return result

    def _on_token(self, seq: Sequence) -> None:
        """After each sampled token: advance the sequence's grammar, then its stop strings."""
        grammar = seq.grammar
        if grammar is not None and not seq.is_finished:
            token = seq.last_token_id
            if not grammar.accept(token):  # the mask allowed it: a grammar engine disagreement
                log.warning("grammar refused token %d of %s: %s", token, seq.request_id,
                            grammar.error)  # fmt: skip
                self.scheduler.finish(seq, "stop")
            elif grammar.done:  # nothing but EOS may follow: stop without sampling it
                self.scheduler.finish(seq, "stop")
        self._apply_stop_strings(seq)

    def _apply_stop_strings(self, seq: Sequence) -> None:
        detok = self._texts.get(seq.seq_id)
        if detok is None:
            detok = self._texts[seq.seq_id] = self.tokenizer.detokenizer()
        ids, stops = seq.output_token_ids, seq.params.stop
        # Only text the last token added can complete a stop string (an earlier one would have
        # stopped the sequence then): search from there, not the whole output every token.
        new = 0 if seq.is_finished else len(detok.text)
        text = detok.finish(ids) if seq.is_finished else detok.update(ids)
        if not any(text.find(s, max(0, new - len(s) + 1)) >= 0 for s in stops):
            return
        text = detok.finish(ids)  # cut the exact text at the earliest stop string
        at, stop = min((text.find(s), s) for s in stops if s in text)
        if not seq.is_finished:
            self.scheduler.finish(seq, "stop", stop_reason=stop)
        detok.text = text[:at]

    @property
    def has_unfinished(self) -> bool:
        """Some request is waiting or running: `step` has work."""
        return self.scheduler.has_unfinished

    def abort(self, request_id: str) -> list[Sequence]:
        """Stop a request; returns its choices that were not finished yet (now aborted)."""
        return self.scheduler.abort(request_id)

    def stats(self) -> EngineStats:
        """Counters for /metrics: queues, KV pages, prefix cache, padding, compiles."""
        sched, bm = self.scheduler, self.block_manager
        return EngineStats(
            running=len({s.request_id for s in sched.running}),
            waiting=len({s.request_id for s in sched.waiting}),
            kv_pages_used=bm.num_used_pages,
            kv_pages_total=bm.num_usable_pages,
            prefix_queries=bm.prefix_queries,
            prefix_hits=bm.prefix_hits,
            real_tokens=self.runner.real_tokens,
            padded_tokens=self.runner.padded_tokens,
            compiles_after_ready=self.compiles_after_ready,
            preemptions=sched.num_preemptions,
            grammar_masks=self.grammar_masks,
            grammar_mask_seconds=self.grammar_mask_seconds,
        )

    def text(self, seq: Sequence) -> str:
        detok = self._texts.get(seq.seq_id)
        return "" if detok is None else detok.text

    def release(self, seq: Sequence) -> None:
        """Forget a finished or aborted sequence's text (a server calls this once it sent it)."""
        self._texts.pop(seq.seq_id, None)

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams,
        adapters: Seq[str | None] | None = None,
    ) -> list[list[Completion]]:
        """Offline generation of many prompts at once (continuous batching); one list per prompt.
        ``adapters``: the LoRA adapter of each prompt (None: the base model)."""
        names = [None] * len(prompts) if adapters is None else list(adapters)
        requests = [self.add_request(p, params, a) for p, a in zip(prompts, names, strict=True)]
        while self.has_unfinished:
            self.step()
        return [[self._completion(s) for s in seqs] for seqs in requests]

    def _completion(self, seq: Sequence) -> Completion:
        text = self.text(seq)
        self.release(seq)
        return Completion(
            request_id=seq.request_id,
            index=seq.index,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=tuple(seq.output_token_ids),
            text=text,
            finish_reason=seq.finish_reason,
            logprobs=tuple(seq.output_logprobs),
        )
