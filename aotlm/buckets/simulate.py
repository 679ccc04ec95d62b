"""Replay a traffic trace through the scheduler's policy and record every step's shape.

The planner needs the distribution of per-step shapes (T = tokens scheduled, R = sequences that
sample), not of request lengths: with continuous batching and chunked prefill a step mixes many
requests' decodes with slices of prompts, so T and R are what the padded graphs actually see.

The policy is the serving scheduler's own: the replay drives `Scheduler`
(aotlm/runtime/generation/scheduler.py) with a token budget (the largest token bucket) and a
sequence budget (the largest request bucket), so the plan cannot drift from what serving does.
Every sampled token is a placeholder; a sequence finishes after ``output_tokens`` samples (or at
``max_seq_len`` tokens).

What it leaves out, on purpose (none of it changes shapes much in a well-provisioned server):
KV pressure (the block manager gets a page for every token any running sequence can hold, so
nothing is preempted or refused), prefix caching (each prompt starts with its own token, so
nothing is shared), EOS and stop strings, ``n > 1`` (one sequence per trace line), aborts, the
waiting-queue cap, and real step latency (open-loop replay advances a clock by the linear
:class:`StepTime` model). Replaying 2000 requests takes 1-2 s on one core.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aotlm.buckets.traffic import TraceRequest
from aotlm.errors import ConfigError
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import Scheduler
from aotlm.runtime.generation.sequence import Sequence as ServedSequence
from aotlm.runtime.generation.sequence import make_sequences


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


# Pages are plentiful in the replay (none is ever short), so their size only sets how much
# prefix hashing the block manager does: large pages, little hashing.
_PAGE = 256


def _scheduler(
    trace: Sequence[TraceRequest], max_tokens: int, max_seqs: int, max_seq_len: int | None
):
    """The serving scheduler itself, with a page for every token any running sequence can hold."""
    longest = 1 + max((r.prompt_tokens + r.output_tokens for r in trace), default=1)
    max_len = max(2, min(longest, max_seq_len) if max_seq_len else longest)
    pages = max_seqs * -(-max_len // _PAGE) + 1
    return Scheduler(
        BlockManager(pages, _PAGE),
        max_tokens_per_step=max_tokens,
        max_seqs_per_step=max_seqs,
        max_seq_len=max_len,
    )


def _sequence(i: int, request: TraceRequest) -> list[ServedSequence]:
    """Request i as the server would hold it; a unique first token keeps prefix hits away."""
    prompt = [1 << 40 | i] + [1] * (request.prompt_tokens - 1)
    params = SamplingParams(temperature=0.0, max_tokens=request.output_tokens, ignore_eos=True)
    return make_sequences(str(i), prompt, params, first_seq_id=i, arrival_time=0.0)


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
    order = sorted(trace, key=lambda r: r.arrival or 0.0) if open_loop else trace
    pending = deque(enumerate(order))
    sched = _scheduler(trace, max_tokens_per_step, max_seqs_per_step, max_seq_len)
    clock = 0.0
    t_out, r_out, s_out = [], [], []
    while pending or sched.has_unfinished:
        if open_loop:
            if not sched.has_unfinished:
                clock = max(clock, pending[0][1].arrival or 0.0)
            while pending and (pending[0][1].arrival or 0.0) <= clock:
                sched.add(*_sequence(*pending.popleft()))
        else:
            while pending and len(sched.waiting) + len(sched.running) < concurrency:
                sched.add(*_sequence(*pending.popleft()))
        out = sched.schedule()
        sampled = {c.seq.seq_id: 1 for c in out.sampling_chunks}
        t_out.append(out.num_tokens)
        r_out.append(len(sampled))
        s_out.append(out.num_seqs)
        sched.postprocess(out, sampled)
        clock += step_time.base_s + step_time.per_token_s * out.num_tokens
    return StepShapes(
        tokens=np.asarray(t_out, np.int64),
        requests=np.asarray(r_out, np.int64),
        seqs=np.asarray(s_out, np.int64),
        max_tokens_per_step=max_tokens_per_step,
        max_seqs_per_step=max_seqs_per_step,
    )
