"""The engine with sampling penalties: the penalized sampler runs only when a row needs it."""

from __future__ import annotations

import dataclasses

import pytest

from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    return Engine.from_bundle(tiny_bundle[0], strict=True)


def greedy(engine: Engine, prompt, max_tokens: int = 40, **penalties) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **penalties)
    return list(engine.generate([prompt], params)[0][0].token_ids)


def penalized_calls(engine: Engine) -> int:
    calls = engine.runner.bucket_calls
    return sum(n for (name, _), n in calls.items() if name == "sample_penalized")


def test_penalties_change_greedy_output_and_stop_repeats(engine):
    plain = greedy(engine, PROMPT)
    assert len(set(plain)) < len(plain), "the tiny model repeats itself when greedy"
    for penalty in ({"frequency_penalty": 2.0}, {"repetition_penalty": 100.0}):
        out = greedy(engine, PROMPT, **penalty)
        assert out != plain and len(set(out)) == len(out), penalty
    assert engine.compiles_after_ready == 0


def test_repetition_covers_the_prompt_presence_and_frequency_only_the_output(engine):
    plain = greedy(engine, PROMPT)
    # Make the next greedy token one that is already in the prompt.
    j = next(j for j, t in enumerate(plain) if t in plain[:j])
    prompt = engine.tokenizer.encode(PROMPT) + plain[:j]
    assert greedy(engine, prompt, max_tokens=1) == [plain[j]]
    assert greedy(engine, prompt, max_tokens=1, presence_penalty=2.0, frequency_penalty=2.0) == [
        plain[j]
    ]
    assert greedy(engine, prompt, max_tokens=1, repetition_penalty=100.0) != [plain[j]]


def test_neutral_penalties_take_the_plain_sampler(engine):
    before = penalized_calls(engine)
    neutral = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
    assert greedy(engine, PROMPT, max_tokens=8, **neutral) == greedy(engine, PROMPT, max_tokens=8)
    assert penalized_calls(engine) == before
    greedy(engine, PROMPT, max_tokens=8, presence_penalty=0.5)
    assert penalized_calls(engine) == before + 8
    assert engine.compiles_after_ready == 0


def test_an_unpenalized_row_is_unchanged_beside_a_penalized_one(engine):
    alone = greedy(engine, "Rain on the roof", max_tokens=16)
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    penalized = dataclasses.replace(plain, repetition_penalty=1.3, frequency_penalty=1.0)
    [beside] = engine.add_request("Rain on the roof", plain)
    engine.add_request(PROMPT, penalized)
    while engine.scheduler.has_unfinished:
        engine.step()
    assert beside.output_token_ids == alone
    assert engine.compiles_after_ready == 0
