"""Replay a traffic trace through the scheduler's policy and record every step's shape.

The planner needs the distribution of per-step shapes (T = tokens scheduled, R = sequences that
sample), not of request lengths: with continuous batching and chunked prefill a step mixes many
requests' decodes with slices of prompts, so T and R are what the padded graphs actually see.

The policy is `aotlm.runtime.generation.scheduler.Scheduler.schedule`'s, step for step, within a token
budget (the largest token bucket) and a sequence budget (the largest request bucket):
1. decodes (running sequences with one uncomputed token), oldest admission first;
2. prefill chunks for running sequences with more, each as large as the remaining budget;
3. admission of waiting sequences (FCFS) with a first chunk, while budgets last and fewer than
   ``max_seqs_per_step`` sequences run.
A chunk samples when it reaches the sequence's last token; each sample appends one token, and a
sequence finishes after ``output_tokens`` samples (or at ``max_seq_len`` tokens).

What it ignores, on purpose (none of it changes shapes much in a well-provisioned server):
KV pages (so no preemption and no admission refused for lack of pages), prefix caching (every
prompt token is computed), EOS and stop strings (a request generates exactly ``output_tokens``),
``n > 1`` (one sequence per trace line), aborts, the waiting-queue cap, and real step latency
(open-loop replay advances a clock by the linear :class:`StepTime` model).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aotlm.buckets.traffic import TraceRequest
from aotlm.errors import ConfigError


@dataclass(frozen=True)
class StepTime:
    """Seconds a step takes, ``base_s + per_token_s * T``; only used to replay arrival times."""

    base_s: float = 0.010
    per_token_s: float = 2e-5


@dataclass(frozen=True)
class StepShapes:
    """One entry per simulated step, in order."""

    tokens: np.ndarray  # T: tokens scheduled (what forward's token bucket must hold)
    requests: np.ndarray  # R: chunks that sample (logits/sample's request bucket); may be 0
    seqs: np.ndarray  # chunks scheduled (<= max_seqs_per_step: rows of the block tables)
    max_tokens_per_step: int
    max_seqs_per_step: int

    @property
    def num_steps(self) -> int:
        return len(self.tokens)


class _Seq:
    __slots__ = ("computed", "generated", "outputs", "total")

    def __init__(self, request: TraceRequest) -> None:
        self.total = request.prompt_tokens  # prompt + generated so far
        self.computed = 0  # tokens whose KV is written
        self.generated = 0
        self.outputs = request.output_tokens


def _schedule(
    running: list[_Seq], waiting: deque[_Seq], max_tokens: int, max_seqs: int
) -> list[tuple[_Seq, int]]:
    """One step of the scheduler's policy (see the module docstring); mutates the queues."""
    tokens, seqs = max_tokens, max_seqs
    chunks: list[tuple[_Seq, int]] = []
    for decode in (True, False):
        for seq in running:
            if tokens <= 0 or seqs <= 0:
                break
            left = seq.total - seq.computed
            if (left == 1) == decode:
                n = 1 if decode else min(left, tokens)
                chunks.append((seq, n))
                tokens, seqs = tokens - n, seqs - 1
    while waiting and tokens > 0 and seqs > 0 and len(running) < max_seqs:
        seq = waiting.popleft()
        running.append(seq)
        n = min(seq.total, tokens)
        chunks.append((seq, n))
        tokens, seqs = tokens - n, seqs - 1
    return chunks


def _postprocess(chunks: list[tuple[_Seq, int]], max_seq_len: int | None) -> int:
    """Advance the sequences; returns how many sampled. Finished ones get ``outputs = 0``."""
    sampled = 0
    for seq, n in chunks:
        seq.computed += n
        if seq.computed < seq.total:
            continue
        sampled += 1
        seq.generated += 1
        seq.total += 1
        if seq.generated >= seq.outputs or (max_seq_len and seq.total >= max_seq_len):
            seq.outputs = 0
    return sampled


def simulate(
    trace: Sequence[TraceRequest],
    *,
    max_tokens_per_step: int,
    max_seqs_per_step: int,
    concurrency: int | None = None,
    step_time: StepTime = StepTime(),
    max_seq_len: int | None = None,
) -> StepShapes:
    """Per-step (T, R) of serving ``trace``.

    Arrival model: with ``concurrency`` set, a closed loop keeps that many requests in flight
    (waiting + running), admitting trace lines in order as others finish; without it, a trace
    with arrival times is replayed open-loop on a :class:`StepTime` clock, and one without them
    runs at ``concurrency = max_seqs_per_step`` (a saturated server).
    """
    if max_tokens_per_step < 1 or max_seqs_per_step < 1:
        raise ConfigError(
            f"simulate: max_tokens_per_step ({max_tokens_per_step}) and max_seqs_per_step "
            f"({max_seqs_per_step}) must be >= 1"
        )
    if concurrency is not None and concurrency < 1:
        raise ConfigError(f"simulate: concurrency must be >= 1 (got {concurrency})")
    if max_seq_len is not None:
        for i, r in enumerate(trace):
            if r.prompt_tokens >= max_seq_len:
                raise ConfigError(
                    f"trace request {i}: prompt_tokens={r.prompt_tokens} does not fit "
                    f"max_seq_len={max_seq_len}"
                )
    open_loop = concurrency is None and bool(trace) and trace[0].arrival is not None
    if concurrency is None:
        concurrency = max_seqs_per_step
    pending = deque(sorted(trace, key=lambda r: r.arrival or 0.0) if open_loop else trace)
    waiting: deque[_Seq] = deque()
    running: list[_Seq] = []
    clock = 0.0
    t_out, r_out, s_out = [], [], []
    while pending or waiting or running:
        if open_loop:
            if not waiting and not running:
                clock = max(clock, pending[0].arrival or 0.0)
            while pending and (pending[0].arrival or 0.0) <= clock:
                waiting.append(_Seq(pending.popleft()))
        else:
            while pending and len(waiting) + len(running) < concurrency:
                waiting.append(_Seq(pending.popleft()))
        chunks = _schedule(running, waiting, max_tokens_per_step, max_seqs_per_step)
        num_tokens = sum(n for _, n in chunks)
        t_out.append(num_tokens)
        r_out.append(_postprocess(chunks, max_seq_len))
        s_out.append(len(chunks))
        running[:] = [s for s in running if s.outputs]
        clock += step_time.base_s + step_time.per_token_s * num_tokens
    return StepShapes(
        tokens=np.asarray(t_out, np.int64),
        requests=np.asarray(r_out, np.int64),
        seqs=np.asarray(s_out, np.int64),
        max_tokens_per_step=max_tokens_per_step,
        max_seqs_per_step=max_seqs_per_step,
    )
