"""Continuous batching with chunked prefill (vLLM v1-like), over a `BlockManager`.

One engine step is: `out = scheduler.schedule()`, the device runs `out.chunks`, then
`scheduler.postprocess(out, sampled)`. Call them strictly alternately: a sequence's
`num_computed_tokens` advances in `postprocess`, not in `schedule`. `add`, `abort` and `finish`
may run between steps, or after the device step has read the chunks' block tables and before
`postprocess` (which then skips the finished sequences); never between `schedule` and that read.

Policy of `schedule()`, within a token budget (the largest token bucket) and a sequence budget
(the largest request bucket):
1. Decodes: running sequences with one uncomputed token get it, oldest admission first.
2. Prefills: running sequences with more uncomputed tokens get chunks from what is left
   (a long prompt is split across steps, interleaved with the others' decodes).
3. Admission: waiting sequences (FCFS, preempted ones at the front) take their cached prefix
   and a first chunk, while budgets, pages and the running cap allow. Skipped in a step that
   preempted, so a victim is not readmitted into the pressure that evicted it.
`schedule_decode(k)` / `postprocess_decode` are the multi-step variant (decode[R] graphs): when
every running sequence is decoding, none has penalties (their token history changes each step)
or a grammar (its next mask depends on the token just sampled, computed on the host), and nobody
waits, one device call runs up to k decode steps of all of them; each sequence gets pages for
the steps it can use (its max_tokens and max_seq_len cap them) and is stopped at its first stop
condition, the rest of its tokens dropped. Anything else is a normal step.
When a running sequence needs a page and none is free, the most recently admitted running
sequence that is not already scheduled this step is preempted (pages freed, tokens kept, put
at the front of the waiting queue). A decode may preempt itself; a prefill instead shrinks its
chunk or waits. Because the pool holds at least one full-length sequence, the oldest running
sequence always progresses: no deadlock, and no request is lost.

Why one file of ~400 lines: `schedule` and `postprocess` share the queues, the budgets and the
preemption rules; split, each half would reach into the other's state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from aotlm.errors import AotlmError, ConfigError, RequestError
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.sequence import Sample, Sequence, SequenceStatus


class QueueFullError(AotlmError):
    """The waiting queue is at `max_waiting`; the server answers 503."""


@dataclass
class ScheduledChunk:
    """Tokens `token_ids` of `seq` at positions `start, start + 1, ...` to run this step.

    The KV of positions `< start` is already in `seq.block_table`'s pages, which also cover
    this chunk. `samples` is true when the chunk ends at the sequence's last token: the device
    then samples the next token from the last position's logits.
    """

    seq: Sequence
    start: int
    token_ids: list[int]
    samples: bool

    @property
    def positions(self) -> range:
        return range(self.start, self.start + len(self.token_ids))

    def slots(self, page_size: int) -> list[int]:
        """KV slot (`page * page_size + offset`) that each token of the chunk writes."""
        table = self.seq.block_table
        return [table[p // page_size] * page_size + p % page_size for p in self.positions]


@dataclass
class SchedulerOutput:
    """One step's work. `chunks` is in the order the runner lays tokens out."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # A multi-step decode (`schedule_decode`): the steps each chunk's sequence may run; its
    # last writable position is `chunk.start + steps - 1`. Empty for a normal step.
    steps: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def num_seqs(self) -> int:
        return len(self.chunks)

    @property
    def sampling_chunks(self) -> list[ScheduledChunk]:
        """The chunks whose last position's logits are sampled, in layout order."""
        return [c for c in self.chunks if c.samples]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class _Budget:
    tokens: int
    seqs: int
    scheduled: set[Sequence] = field(default_factory=set)  # given a chunk this step

    @property
    def exhausted(self) -> bool:
        return self.tokens <= 0 or self.seqs <= 0


class SlotPolicy(Protocol):
    """Where a running sequence's LoRA adapter lives (aotlm/runtime/generation/adapters.py)."""

    def acquire(self, seq: Sequence) -> bool:
        """Give ``seq`` its adapter's slot for as long as it runs; False: none free now."""

    def release(self, seq: Sequence) -> None:
        """``seq`` stopped running (finished or preempted)."""


class Scheduler:
    """Owns the waiting queue and the running set; drives the block manager."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_tokens_per_step: int,
        max_seqs_per_step: int,
        max_seq_len: int,
        max_waiting: int | None = None,
        eos_token_ids: Iterable[int] = (),
        slots: SlotPolicy | None = None,
    ) -> None:
        if max_tokens_per_step < 1 or max_seqs_per_step < 1 or max_seq_len < 2:
            raise ConfigError(
                f"scheduler: max_tokens_per_step={max_tokens_per_step} and "
                f"max_seqs_per_step={max_seqs_per_step} must be >= 1, max_seq_len={max_seq_len} >= 2"
            )
        if block_manager.pages_for(max_seq_len) > block_manager.num_usable_pages:
            raise ConfigError(
                f"kv_pages: {block_manager.num_usable_pages} usable pages cannot hold one "
                f"sequence of max_seq_len={max_seq_len} ({block_manager.pages_for(max_seq_len)} "
                "pages); raise kv_pages or lower max_seq_len"
            )
        self.bm = block_manager
        self.max_tokens_per_step = max_tokens_per_step
        self.max_seqs_per_step = max_seqs_per_step
        self.max_seq_len = max_seq_len
        self.max_waiting = max_waiting
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.num_preemptions = 0
        self.slots = slots

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- requests in and out ----------------------------------------------------------------

    def add(self, *seqs: Sequence) -> None:
        """Queue sequences (all of a request's n at once: all are queued or none).

        Seq ids must be unique among unfinished sequences: `sampled` in `postprocess` is keyed
        by them. Raises `RequestError` for bad params or an empty or too-long prompt, and
        `QueueFullError` when the waiting queue cannot take them all.
        """
        for seq in seqs:
            seq.params.validate()
            if seq.status is not SequenceStatus.WAITING or seq.block_table:
                raise ValueError(f"sequence {seq.seq_id} was already scheduled")
            if not seq.prompt_token_ids:
                raise RequestError("the prompt is empty: give at least one token")
            if seq.num_tokens >= self.max_seq_len:
                raise RequestError(
                    f"the prompt has {seq.num_tokens} tokens; this model serves at most "
                    f"max_seq_len={self.max_seq_len} tokens in all, so at most "
                    f"{self.max_seq_len - 1} prompt tokens"
                )
        if self.max_waiting is not None and len(self.waiting) + len(seqs) > self.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({len(self.waiting)} of {self.max_waiting}); retry later"
            )
        self.waiting.extend(seqs)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of `request_id` with reason "abort"; returns them."""
        victims = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in victims:
            self.finish(seq, "abort")
        return victims

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End `seq` ("stop", "length" or "abort") and free its pages; no-op if finished.

        The engine calls this with "stop" when the detokenizer matches a stop string.
        """
        if seq.is_finished:
            return
        status = SequenceStatus.finished(reason)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = status
        seq.stop_reason = stop_reason

    # ---- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's chunks; allocates their pages (may preempt, never raises)."""
        out = SchedulerOutput()
        budget = _Budget(tokens=self.max_tokens_per_step, seqs=self.max_seqs_per_step)
        self._schedule_decodes(budget, out)
        self._schedule_prefills(budget, out)
        if not out.preempted:
            self._admit_waiting(budget, out)
        return out

    def schedule_decode(self, max_steps: int) -> SchedulerOutput | None:
        """Up to `max_steps` decode steps of every running sequence in one device call, or None
        when a normal `schedule()` must run (see the module doc). Allocates the pages."""
        running = self.running
        if max_steps < 2 or self.waiting or not running or len(running) > self.max_seqs_per_step:
            return None
        if any(
            s.num_uncomputed_tokens != 1 or s.params.has_penalties or s.grammar is not None
            for s in running
        ):
            return None
        steps = [
            min(
                max_steps,
                s.params.max_tokens - s.num_output_tokens,
                self.max_seq_len - s.num_tokens,
            )
            for s in running
        ]
        if max(steps) < 2:
            return None
        needed = sum(self.bm.pages_needed(s, n) for s, n in zip(running, steps, strict=True))
        if needed > self.bm.num_free_pages:
            return None  # a normal step, which preempts if it must
        out = SchedulerOutput(steps=steps)
        for seq, n in zip(running, steps, strict=True):
            self.bm.allocate_for(seq, n)
            start = seq.num_computed_tokens
            out.chunks.append(ScheduledChunk(seq, start, [seq.last_token_id], samples=True))
        return out

    def postprocess_decode(
        self,
        output: SchedulerOutput,
        sampled: Mapping[int, Iterable[object]],
        on_token: Callable[[Sequence], None] = lambda seq: None,
    ) -> list[Sequence]:
        """Apply a multi-step decode's tokens (seq_id -> its samples, in order), one at a time:
        each is followed by the stop checks and `on_token(seq)` (the engine's stop strings,
        which may finish it); a finished sequence's remaining samples are dropped."""
        updated = []
        for chunk, steps in zip(output.chunks, output.steps, strict=True):
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if chunk.start != seq.num_computed_tokens:
                raise ValueError(f"postprocess_decode: stale chunk for sequence {seq.seq_id}")
            for value in list(sampled[seq.seq_id])[:steps]:
                self.bm.mark_computed(seq, 1)
                self._append(seq, value, on_token)
                if seq.is_finished:
                    break
            updated.append(seq)
        return updated

    def _schedule_decodes(self, budget: _Budget, out: SchedulerOutput) -> None:
        for seq in list(self.running):
            if budget.exhausted:
                return
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens != 1:
                continue  # preempted earlier in this loop, or still prefilling
            if self._make_room(seq, 1, budget, out, may_preempt_self=True):
                self.bm.allocate_for(seq, 1)
                self._emit(seq, 1, budget, out)

    def _schedule_prefills(self, budget: _Budget, out: SchedulerOutput) -> None:
        for seq in list(self.running):
            if budget.exhausted:
                return
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens <= 1:
                continue
            wanted = min(seq.num_uncomputed_tokens, budget.tokens)
            self._make_room(seq, wanted, budget, out, may_preempt_self=False)
            # Out of victims: take the part that fits (possibly nothing, then it waits a step).
            num_tokens = min(wanted, self.bm.max_new_tokens(seq))
            if num_tokens > 0:
                self.bm.allocate_for(seq, num_tokens)
                self._emit(seq, num_tokens, budget, out)

    def _admit_waiting(self, budget: _Budget, out: SchedulerOutput) -> None:
        while self.waiting and not budget.exhausted and len(self.running) < self.max_seqs_per_step:
            seq = self.waiting[0]
            prefix = self.bm.lookup_prefix(seq)
            num_tokens = min(seq.num_tokens - len(prefix) * self.bm.page_size, budget.tokens)
            if not self.bm.can_allocate(seq, num_tokens, prefix):
                return  # FCFS: nobody overtakes the head of the queue
            if self.slots is not None and not self.slots.acquire(seq):
                return  # its adapter waits for a slot, and everyone behind it too (FCFS)
            self.waiting.popleft()
            self.bm.match_prefix(seq)
            self.bm.allocate_for(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._emit(seq, num_tokens, budget, out)

    def _make_room(
        self,
        seq: Sequence,
        num_tokens: int,
        budget: _Budget,
        out: SchedulerOutput,
        *,
        may_preempt_self: bool,
    ) -> bool:
        """Preempt from the tail until `seq`'s next `num_tokens` fit; returns whether they do.

        Sequences already scheduled this step are never victims (their chunks are out).
        On False, `seq` itself may have been preempted (only if `may_preempt_self`).
        """
        while not self.bm.can_allocate(seq, num_tokens):
            victim = self._pick_victim(seq, budget, may_preempt_self)
            if victim is None:
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, seq: Sequence, budget: _Budget, may_pick_seq: bool) -> Sequence | None:
        for candidate in reversed(self.running):
            if candidate is seq:
                return seq if may_pick_seq else None
            if candidate not in budget.scheduled:
                return candidate
        return None

    def _release(self, seq: Sequence) -> None:
        if self.slots is not None:
            self.slots.release(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.bm.free(seq)  # also resets num_computed_tokens: prompt + output are recomputed
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _emit(self, seq: Sequence, num_tokens: int, budget: _Budget, out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        end = start + num_tokens
        tokens = seq.all_token_ids[start:end]
        out.chunks.append(ScheduledChunk(seq, start, tokens, samples=end == seq.num_tokens))
        budget.tokens -= num_tokens
        budget.seqs -= 1
        budget.scheduled.add(seq)

    # ---- after the device step -------------------------------------------------------------

    def postprocess(
        self,
        output: SchedulerOutput,
        sampled: Mapping[int, object],
        on_token: Callable[[Sequence], None] = lambda seq: None,
    ) -> list[Sequence]:
        """Apply a step's results; returns the sequences that got a token, in chunk order.

        `sampled` maps seq_id to the sampled token for every chunk with `samples` true
        (a `Sample`, a `(token_id, logprob[, top_logprobs])` tuple, a bare token id, or an object
        with `token_id`, `logprob` and top alternatives; see `Sample.of`). Each new token is
        followed by the stop checks and `on_token(seq)` (the engine's stop strings).
        Sequences finished in between (aborted, stopped by `finish`) are skipped.
        Finished sequences are among those returned, with their finish reason set.
        """
        updated = []
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if chunk.start != seq.num_computed_tokens:
                raise ValueError(f"postprocess: stale chunk for sequence {seq.seq_id}")
            self.bm.mark_computed(seq, len(chunk.token_ids))
            if not chunk.samples:
                continue
            if seq.seq_id not in sampled:
                raise ValueError(f"postprocess: no sampled token for sequence {seq.seq_id}")
            self._append(seq, sampled[seq.seq_id], on_token)
            updated.append(seq)
        return updated

    def _append(self, seq: Sequence, value: object, on_token: Callable[[Sequence], None]) -> None:
        """One sampled token: append it, then the stop checks, then `on_token`."""
        sample = Sample.of(value)
        # Keep only the alternatives the request asked for (the device returns a fixed k).
        seq.append_token(
            sample._replace(top_logprobs=sample.top_logprobs[: seq.params.logprobs or 0])
        )
        self._check_stop(seq)
        on_token(seq)

    def _check_stop(self, seq: Sequence) -> None:
        token, params = seq.last_token_id, seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            self.finish(seq, "stop")
        elif token in params.stop_token_ids:
            self.finish(seq, "stop", stop_reason=token)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            self.finish(seq, "length")
