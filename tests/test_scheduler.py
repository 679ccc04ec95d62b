"""Scheduler: continuous batching, chunked prefill, prefix reuse, preemption, stops, aborts.

A fake device stands in for the step functions: it writes each scheduled token into its KV slot,
checks that every position a chunk attends to holds the right token (so a wrong page, a page
reused while shared or a bad prefix hit fails loudly), and "samples" a token that depends only
on the sequence's content, so outputs must not depend on batching or preemption.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from aotlm.errors import AotlmError, ConfigError, RequestError
from aotlm.runtime.generation.block_manager import BlockManager
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.scheduler import QueueFullError, Scheduler, SchedulerOutput
from aotlm.runtime.generation.sequence import (
    Sample,
    Sequence,
    SequenceStatus,
    derive_seed,
    make_sequences,
)

PAGE = 4
VOCAB = 50
EOS = 0


def next_token(tokens: list[int]) -> int:
    """Deterministic in the content only; never EOS."""
    return 1 + (sum(tokens[-3:]) * 31 + len(tokens)) % (VOCAB - 1)


class FakeDevice:
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.kv: dict[int, int] = {}  # slot -> token whose KV it holds

    def step(self, out: SchedulerOutput) -> dict[int, Sample]:
        for chunk in out.chunks:  # forward writes every token's KV first, then attends
            assert 0 not in chunk.seq.block_table
            for slot, token in zip(chunk.slots(self.page_size), chunk.token_ids, strict=True):
                self.kv[slot] = token
        sampled = {}
        for chunk in out.chunks:
            seq = chunk.seq
            end = chunk.start + len(chunk.token_ids)
            assert chunk.token_ids == seq.all_token_ids[chunk.start : end]
            for pos in range(end):
                page = seq.block_table[pos // self.page_size]
                slot = page * self.page_size + pos % self.page_size
                assert self.kv.get(slot) == seq.all_token_ids[pos], f"seq {seq.seq_id} pos {pos}"
            if chunk.samples:
                sampled[seq.seq_id] = Sample(next_token(seq.all_token_ids[:end]), -0.5)
        return sampled

    def decode(self, out: SchedulerOutput) -> dict[int, list[Sample]]:
        """A multi-step decode: each sequence runs `steps` decode steps, feeding its tokens back."""
        sampled = {}
        for chunk, steps in zip(out.chunks, out.steps, strict=True):
            seq, tokens, samples = chunk.seq, list(chunk.seq.all_token_ids), []
            for k in range(steps):
                pos = chunk.start + k
                assert pos == len(tokens) - 1 and pos // self.page_size < len(seq.block_table)
                self.kv[self._slot(seq, pos)] = tokens[pos]
                for p in range(pos + 1):
                    assert self.kv.get(self._slot(seq, p)) == tokens[p], f"seq {seq.seq_id} pos {p}"
                samples.append(Sample(next_token(tokens), -0.5))
                tokens.append(samples[-1].token_id)
            sampled[seq.seq_id] = samples
        return sampled

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.page_size] * self.page_size + pos % self.page_size


def make_scheduler(num_pages=64, tokens=16, seqs=4, max_seq_len=64, **kwargs) -> Scheduler:
    bm = BlockManager(num_pages=num_pages, page_size=PAGE)
    return Scheduler(
        bm, max_tokens_per_step=tokens, max_seqs_per_step=seqs, max_seq_len=max_seq_len, **kwargs
    )


def seq_of(seq_id: int, prompt: list[int], **params) -> Sequence:
    return Sequence(seq_id, f"req-{seq_id}", tuple(prompt), SamplingParams(**params))


def run_to_completion(
    sched: Scheduler,
    device: FakeDevice | None = None,
    max_steps: int = 10_000,
    decode_steps: int = 1,
) -> list[SchedulerOutput]:
    device = device or FakeDevice(sched.bm.page_size)
    outputs = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return outputs
        outputs.append(one_step(sched, device, decode_steps))
        sched.bm.check_invariants()
    raise AssertionError("requests did not finish")


def one_step(sched: Scheduler, device: FakeDevice, decode_steps: int = 1) -> SchedulerOutput:
    """A multi-step decode when the scheduler offers one, else a normal step."""
    out = sched.schedule_decode(decode_steps)
    if out is not None:
        assert all(c.samples and len(c.token_ids) == 1 for c in out.chunks)
        assert min(out.steps) >= 1 and max(out.steps) <= decode_steps
        check_step(sched, out)
        sched.postprocess_decode(out, device.decode(out))
        return out
    out = sched.schedule()
    check_step(sched, out)
    sched.postprocess(out, device.step(out))
    return out


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_tokens <= sched.max_tokens_per_step
    assert out.num_seqs <= sched.max_seqs_per_step
    assert len({c.seq.seq_id for c in out.chunks}) == out.num_seqs
    assert all(c.token_ids for c in out.chunks)
    assert len(sched.running) <= sched.max_seqs_per_step
    sched.bm.check_invariants()


def expected_output(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def test_host_side_modules_import_no_jax_and_no_numpy():
    code = (
        "import sys, aotlm.runtime.generation.scheduler; "
        "bad = {'jax', 'numpy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---- sequences --------------------------------------------------------------------------


def test_derived_seeds_are_reproducible_distinct_and_u32():
    seeds = [derive_seed(1234, i) for i in range(16)]
    assert seeds == [derive_seed(1234, i) for i in range(16)]
    assert len(set(seeds)) == 16 and all(0 <= s < 2**32 for s in seeds)
    assert derive_seed(1235, 0) != seeds[0]
    assert 0 <= derive_seed(-7, 3) < 2**32
    assert 0 <= derive_seed(None, 0) < 2**32


def test_make_sequences_gives_each_choice_an_id_and_seed():
    seqs = make_sequences("r", [1, 2, 3], SamplingParams(n=3, seed=9), first_seq_id=10)
    assert [s.seq_id for s in seqs] == [10, 11, 12] and [s.index for s in seqs] == [0, 1, 2]
    assert [s.seed for s in seqs] == [derive_seed(9, i) for i in range(3)]
    assert all(s.request_id == "r" and s.status is SequenceStatus.WAITING for s in seqs)
    seq = seqs[0]
    seq.append_token(Sample(7, -1.0))
    assert seq.all_token_ids == [1, 2, 3, 7] and seq.num_output_tokens == 1
    assert seq.finish_reason is None and not seq.is_finished


# ---- admission --------------------------------------------------------------------------


def test_add_rejects_empty_and_too_long_prompts():
    sched = make_scheduler(max_seq_len=16)
    with pytest.raises(RequestError, match="empty"):
        sched.add(seq_of(1, []))
    with pytest.raises(RequestError, match="max_seq_len=16"):
        sched.add(seq_of(2, list(range(16))))
    with pytest.raises(RequestError, match="temperature"):
        sched.add(seq_of(3, [1], temperature=-1.0))
    sched.add(seq_of(4, list(range(15))))


def test_queue_full_is_an_error_and_add_is_all_or_nothing():
    sched = make_scheduler(max_waiting=3)
    sched.add(seq_of(1, [1]), seq_of(2, [1]))
    with pytest.raises(QueueFullError, match="2 of 3") as info:
        sched.add(seq_of(3, [1]), seq_of(4, [1]))
    assert isinstance(info.value, AotlmError)
    assert len(sched.waiting) == 2
    sched.add(seq_of(5, [1]))


def test_pool_smaller_than_one_sequence_is_a_config_error():
    with pytest.raises(ConfigError, match="kv_pages"):
        make_scheduler(num_pages=4, max_seq_len=64)  # 3 usable pages, 16 needed


# ---- one request ------------------------------------------------------------------------


def test_single_request_prefills_then_decodes_until_max_tokens():
    sched = make_scheduler()
    seq = seq_of(1, [5, 6, 7, 8, 9], max_tokens=4)
    sched.add(seq)
    outputs = run_to_completion(sched)
    first = outputs[0].chunks[0]
    assert (first.start, first.token_ids, first.samples) == (0, [5, 6, 7, 8, 9], True)
    assert [(c.start, len(c.token_ids)) for o in outputs[1:] for c in o.chunks] == [
        (5, 1),
        (6, 1),
        (7, 1),
    ]
    assert seq.output_token_ids == expected_output([5, 6, 7, 8, 9], 4)
    assert seq.output_logprobs == [-0.5] * 4
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.finish_reason == "length"
    assert sched.bm.num_used_pages == 0 and not sched.running


def test_chunked_prefill_splits_a_long_prompt_and_interleaves_decodes():
    sched = make_scheduler(tokens=16, seqs=4, max_seq_len=128)
    short = seq_of(1, [1, 2, 3], max_tokens=20)
    sched.add(short)
    device = FakeDevice(PAGE)
    out = sched.schedule()
    sched.postprocess(out, device.step(out))

    long = seq_of(2, list(range(10, 60)), max_tokens=2)  # 50 tokens at 16 a step
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = sched.schedule()
        check_step(sched, out)
        assert out.chunks[0].seq is short and len(out.chunks[0].token_ids) == 1  # decode first
        chunks.append([(c.start, len(c.token_ids), c.samples) for c in out.chunks[1:]])
        sched.postprocess(out, device.step(out))
    assert chunks == [[(0, 15, False)], [(15, 15, False)], [(30, 15, False)], [(45, 5, True)]]


def test_prefix_cache_serves_a_second_request_sharing_a_long_prefix():
    sched = make_scheduler(tokens=64, max_seq_len=128)
    system = list(range(1, 41))  # 40 tokens = 10 pages
    first = seq_of(1, [*system, 1, 2], max_tokens=3)
    sched.add(first)
    device = FakeDevice(PAGE)  # one KV cache across both requests
    run_to_completion(sched, device)
    hits_before = sched.bm.prefix_hits

    second = seq_of(2, [*system, 9, 9, 9], max_tokens=3)
    sched.add(second)
    outputs = run_to_completion(sched, device)
    assert second.num_cached_prompt_tokens == 40
    assert outputs[0].chunks[0].start == 40 and outputs[0].chunks[0].token_ids == [9, 9, 9]
    assert sched.bm.prefix_hits - hits_before == 40
    assert second.output_token_ids == expected_output([*system, 9, 9, 9], 3)


# ---- stopping ---------------------------------------------------------------------------


def test_eos_stops_unless_ignored_and_stop_token_ids_record_the_reason():
    sched = make_scheduler(eos_token_ids=[EOS])
    a = seq_of(1, [1, 2], max_tokens=10)
    b = seq_of(2, [1, 2], max_tokens=3, ignore_eos=True)
    c = seq_of(3, [1, 2], max_tokens=10, stop_token_ids=(42,))
    sched.add(a, b, c)
    out = sched.schedule()
    updated = sched.postprocess(out, {1: (EOS, -0.1), 2: EOS, 3: Sample(42)})
    assert updated == [a, b, c]
    assert a.finish_reason == "stop" and a.stop_reason is None and a.output_token_ids == [EOS]
    assert c.finish_reason == "stop" and c.stop_reason == 42
    assert not b.is_finished and b.output_token_ids == [EOS]
    assert sched.running == [b]


def test_reaching_max_seq_len_finishes_with_length():
    sched = make_scheduler(max_seq_len=12)
    seq = seq_of(1, list(range(1, 10)), max_tokens=100)
    sched.add(seq)
    run_to_completion(sched)
    assert seq.num_tokens == 12 and seq.finish_reason == "length"


def test_finish_by_stop_string_frees_pages():
    sched = make_scheduler()
    seq = seq_of(1, [1, 2, 3], max_tokens=50)
    sched.add(seq)
    device = FakeDevice(PAGE)
    out = sched.schedule()
    sched.postprocess(out, device.step(out))
    sched.finish(seq, "stop", stop_reason="###")
    assert seq.finish_reason == "stop" and seq.stop_reason == "###"
    assert sched.bm.num_used_pages == 0 and not sched.has_unfinished
    sched.finish(seq, "abort")  # already finished: no-op
    assert seq.finish_reason == "stop"


def test_top_logprobs_are_trimmed_to_what_was_asked():
    sched = make_scheduler()
    seq, plain = seq_of(1, [1, 2], logprobs=2), seq_of(2, [1, 2])
    sched.add(seq, plain)
    out = sched.schedule()
    top = ((3, -0.1), (4, -2.0), (5, -3.0))
    # The runner's result type: parallel top ids / logprobs.
    runner_sampled = SimpleNamespace(
        token_id=3, logprob=-0.1, top_ids=(3, 4, 5), top_logprobs=(-0.1, -2.0, -3.0)
    )
    sched.postprocess(out, {1: runner_sampled, 2: Sample(3, -0.1, top)})
    assert seq.output_token_ids == [3] and seq.output_logprobs == [-0.1]
    assert seq.output_top_logprobs == [top[:2]]
    assert plain.output_top_logprobs == [()]


# ---- aborts -----------------------------------------------------------------------------


def test_abort_frees_pages_for_waiting_and_running_sequences():
    sched = make_scheduler(seqs=2)
    seqs = make_sequences("a", [1, 2, 3, 4, 5], SamplingParams(n=2, max_tokens=9), 1)
    other = seq_of(7, [9, 9], max_tokens=9)
    sched.add(*seqs, other)
    out = sched.schedule()
    assert {c.seq.request_id for c in out.chunks} == {"a"} and len(sched.waiting) == 1
    assert sched.bm.num_used_pages > 0
    sampled = FakeDevice(PAGE).step(out)
    aborted = sched.abort("a")  # after the device step, before postprocess
    assert aborted == seqs and all(s.finish_reason == "abort" for s in seqs)
    assert sched.postprocess(out, sampled) == []
    assert sched.bm.num_used_pages == 0
    assert sched.abort("req-7") == [other] and not sched.has_unfinished
    assert sched.abort("unknown") == []
    sched.bm.check_invariants()


# ---- pressure ---------------------------------------------------------------------------


def test_preemption_under_page_pressure_loses_no_request():
    # 16 usable pages; 6 requests that each grow to 60 tokens (15 pages).
    sched = make_scheduler(num_pages=17, tokens=32, seqs=6, max_seq_len=64)
    prompts = [[i + 1] * (10 + 3 * i) for i in range(6)]
    seqs = [seq_of(i, p, max_tokens=60 - len(p)) for i, p in enumerate(prompts)]
    sched.add(*seqs)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    for seq, prompt in zip(seqs, prompts, strict=True):
        assert seq.finish_reason == "length"
        assert seq.output_token_ids == expected_output(prompt, 60 - len(prompt))
    assert sched.bm.num_used_pages == 0


def test_preemption_evicts_the_newest_sequence_and_keeps_its_tokens():
    # 4 usable pages = 16 token slots; two sequences of 6 prompt tokens each grow past that.
    sched = make_scheduler(num_pages=5, tokens=16, seqs=2, max_seq_len=16)
    old, new = seq_of(1, [1] * 6, max_tokens=10), seq_of(2, [2] * 6, max_tokens=10)
    sched.add(old, new)
    device = FakeDevice(PAGE)
    while True:
        out = sched.schedule()
        if out.preempted:
            break
        sched.postprocess(out, device.step(out))
    assert out.preempted == [new] and [c.seq for c in out.chunks] == [old]  # no admission
    assert new.status is SequenceStatus.PREEMPTED and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and new.block_table == []
    assert new.num_output_tokens > 0 and sched.waiting[0] is new
    sched.postprocess(out, device.step(out))
    run_to_completion(sched, device)
    assert old.output_token_ids == expected_output([1] * 6, 10)
    assert new.output_token_ids == expected_output([2] * 6, 10)


def test_a_sequence_scheduled_this_step_is_never_preempted():
    # White-box: put an older prefill behind a newer decode in `running`, pages tight, so the
    # prefill's only possible victim is the decode already scheduled this step.
    sched = make_scheduler(num_pages=5, tokens=8, seqs=2, max_seq_len=16)
    decode, prefill = seq_of(1, [1] * 4, max_tokens=5), seq_of(2, [2] * 15, max_tokens=1)
    sched.add(decode, prefill)
    device = FakeDevice(PAGE)
    out = sched.schedule()
    sched.postprocess(out, device.step(out))
    sched.running.reverse()
    out = sched.schedule()
    assert out.preempted == [] and decode.status is SequenceStatus.RUNNING
    assert [(c.seq, len(c.token_ids)) for c in out.chunks] == [(decode, 1), (prefill, 4)]
    sched.postprocess(out, device.step(out))
    run_to_completion(sched, device)
    assert decode.output_token_ids == expected_output([1] * 4, 5)


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_respect_budgets_and_all_finish(seed):
    rng = random.Random(seed)
    decode_steps = rng.choice([1, 1, 3, 8])  # multi-step decodes must give the same tokens
    max_seq_len = rng.choice([24, 48, 64])
    sched = make_scheduler(
        num_pages=max_seq_len // PAGE + 1 + rng.randint(0, 20),
        tokens=rng.choice([4, 8, 16, 32]),
        seqs=rng.choice([1, 2, 3, 8]),
        max_seq_len=max_seq_len,
        eos_token_ids=[EOS],
    )
    device = FakeDevice(PAGE)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randint(0, 20))] for _ in range(3)]
    ids = itertools.count()
    expected: dict[int, list[int]] = {}
    every: list[Sequence] = []
    for _ in range(300):
        if rng.random() < 0.3:
            prompt = rng.choice(prefixes) + [rng.randrange(1, VOCAB) for _ in range(3)]
            prompt = prompt[: max_seq_len - 1]
            params = SamplingParams(n=rng.randint(1, 3), max_tokens=rng.randint(1, 30))
            new = make_sequences(f"r{len(every)}", prompt, params, next(ids) * 10)
            sched.add(*new)
            every += new
            for s in new:
                n = min(params.max_tokens, max_seq_len - len(prompt))
                expected[s.seq_id] = expected_output(prompt, n)
        if every and rng.random() < 0.03:
            sched.abort(rng.choice(every).request_id)
        one_step(sched, device, decode_steps)
    run_to_completion(sched, device, decode_steps=decode_steps)
    for s in every:
        assert s.is_finished
        if s.finish_reason != "abort":
            assert s.output_token_ids == expected[s.seq_id]
    assert sched.bm.num_used_pages == 0


# ---- multi-step decode ------------------------------------------------------------------------


def decoding(sched: Scheduler, *seqs: Sequence) -> FakeDevice:
    """Add `seqs` and run normal steps until every one has finished its prefill."""
    sched.add(*seqs)
    device = FakeDevice(PAGE)
    while sched.waiting or any(s.num_uncomputed_tokens != 1 for s in sched.running):
        out = sched.schedule()
        sched.postprocess(out, device.step(out))
    return device


def test_multi_step_decode_runs_only_when_everyone_decodes_and_nobody_waits():
    sched = make_scheduler(seqs=2)
    a, b = seq_of(1, [1, 2, 3], max_tokens=20), seq_of(2, [4, 5], max_tokens=20)
    assert sched.schedule_decode(8) is None  # nothing running
    device = decoding(sched, a, b)
    assert sched.schedule_decode(1) is None  # one step per call asked
    waiting = seq_of(3, [1, 2], max_tokens=5)
    sched.add(waiting)
    assert sched.schedule_decode(8) is None  # it must be admitted first: normal steps
    sched.abort(waiting.request_id)
    out = sched.schedule_decode(8)
    assert out is not None and out.steps == [8, 8]
    assert [c.start for c in out.chunks] == [a.num_tokens - 1, b.num_tokens - 1]
    assert len(a.block_table) == sched.bm.pages_for(a.num_tokens - 1 + 8)  # pages for 8 steps
    sched.postprocess_decode(out, device.decode(out))
    assert a.output_token_ids == expected_output([1, 2, 3], 9)
    assert b.output_token_ids == expected_output([4, 5], 9)
    sched.bm.check_invariants()

    penalized = make_scheduler()
    decoding(penalized, seq_of(4, [1, 2], max_tokens=9, presence_penalty=0.5))
    assert penalized.schedule_decode(8) is None  # its token history changes every step


def test_multi_step_decode_stops_at_max_tokens_max_seq_len_and_stop_tokens():
    sched = make_scheduler(max_seq_len=16, eos_token_ids=[EOS])
    short = seq_of(1, [1, 2], max_tokens=4)  # 1 token from its prefill, 3 left
    edge = seq_of(2, list(range(1, 13)), max_tokens=50)  # 13 tokens after prefill: 3 to go
    stop_at = expected_output([7, 8], 4)[2]
    stopped = seq_of(3, [7, 8], max_tokens=50, stop_token_ids=(stop_at,))
    device = decoding(sched, short, edge, stopped)
    out = sched.schedule_decode(8)
    assert out.steps == [3, 3, 8]
    seen = []
    sched.postprocess_decode(out, device.decode(out), on_token=lambda s: seen.append(s.seq_id))
    assert short.finish_reason == "length" and short.num_output_tokens == 4
    assert edge.finish_reason == "length" and edge.num_tokens == 16
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_at
    assert stopped.output_token_ids == expected_output([7, 8], 3)  # the rest was dropped
    assert seen.count(3) == 2  # on_token ran for each token of the burst kept, then it ended
    assert not sched.has_unfinished and sched.bm.num_used_pages == 0


def test_multi_step_decode_leaves_single_steps_when_pages_run_short():
    """Both bursts need 3 more pages each and 3 are free: normal steps (which preempt as they
    must) run instead, and everything still finishes with the right tokens."""
    sched = make_scheduler(num_pages=1 + 16 // PAGE + 1, max_seq_len=16, seqs=2)
    a, b = seq_of(1, [1, 2, 3], max_tokens=12), seq_of(2, [9, 9, 9], max_tokens=12)
    device = decoding(sched, a, b)
    assert sched.bm.num_free_pages == 3
    assert sched.schedule_decode(12) is None
    run_to_completion(sched, device, decode_steps=12)
    assert a.output_token_ids == expected_output([1, 2, 3], 12)
    assert b.output_token_ids == expected_output([9, 9, 9], 12)
    assert sched.bm.num_used_pages == 0
