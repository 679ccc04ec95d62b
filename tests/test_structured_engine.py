"""Structured output in the engine: grammar rows sample through sample_masked[R] with the mask
their grammar computes each step, rows without one are untouched by their neighbours, and a
bundle without the masked sampler refuses grammars while serving everything else."""

from __future__ import annotations

import dataclasses
import json
import re

import pydantic
import pytest

from aotlm.grammar.spec import GrammarError, GrammarSpec
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams

PROMPTS = ["The cat sat on the mat", "Compilers turn", "Once upon a time", "x"]


class Person(pydantic.BaseModel):
    # Compact JSON: the random tiny model loves whitespace, and the bundle holds 128 tokens.
    model_config = pydantic.ConfigDict(
        extra="forbid", json_schema_extra={"x-guidance": {"whitespace_flexible": False}}
    )
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=150)
    role: str = pydantic.Field(pattern="^(admin|user)$")


SCHEMA = GrammarSpec.of("json_schema", Person.model_json_schema(), "response_format")


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    return Engine.from_bundle(tiny_bundle[0], strict=True)


def calls(engine: Engine, name: str) -> int:
    return sum(n for (graph, _), n in engine.runner.bucket_calls.items() if graph == name)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_schema_outputs_validate(engine, temperature):
    params = SamplingParams(temperature=temperature, max_tokens=120, seed=7, n=4, grammar=SCHEMA)
    masked = calls(engine, "sample_masked")
    for choices in engine.generate(PROMPTS, params):
        for c in choices:
            assert c.finish_reason == "stop", c.text
            Person.model_validate_json(c.text)  # raises if the grammar let anything else out
    assert calls(engine, "sample_masked") > masked
    assert engine.compiles_after_ready == 0


def test_default_json_whitespace_is_bounded(engine):
    """Without the schema's own options, each gap between JSON tokens holds at most 16
    whitespace characters, so a model that prefers whitespace still closes the object."""
    flag = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    spec = GrammarSpec.of("json_schema", flag, "response_format")
    params = SamplingParams(temperature=1.0, max_tokens=100, seed=2, n=4, grammar=spec)
    for c in engine.generate(PROMPTS[3:], params)[0]:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.text)["ok"], bool), c.text
        assert max(map(len, re.findall(r"\s+", c.text)), default=0) <= 16


def test_choice_and_regex_give_exactly_what_they_allow(engine):
    choice = GrammarSpec.of("choice", ["yes", "no", "not sure"], "structured_outputs.choice")
    regex = GrammarSpec.of("regex", r"[0-9]{3}-[a-z]{2}", "structured_outputs.regex")
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=1, n=8, grammar=choice)
    texts = {c.text for c in engine.generate(PROMPTS[:1], params)[0]}
    assert texts <= {"yes", "no", "not sure"} and texts
    params = dataclasses.replace(params, grammar=regex)
    for c in engine.generate(PROMPTS[:1], params)[0]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text) and c.finish_reason == "stop"


def test_free_rows_get_what_they_get_alone(engine):
    """A grammar row switches the step to the masked sampler; the free rows' masks allow every
    token, so their greedy and seeded tokens are the same as in a batch without grammars."""
    free = [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.9, max_tokens=24, seed=5, ignore_eos=True),
    ]
    alone = [engine.generate(PROMPTS, p) for p in free]
    constrained = SamplingParams(temperature=1.0, max_tokens=200, seed=3, grammar=SCHEMA)
    masked = calls(engine, "sample_masked")
    requests = [engine.add_request(p, params) for params in free for p in PROMPTS]
    grammar_rows = [engine.add_request(p, constrained)[0] for p in PROMPTS]
    while engine.has_unfinished:
        engine.step()
    assert calls(engine, "sample_masked") > masked
    for i, p in enumerate(free):
        got = [engine._completion(s[0]).token_ids for s in requests[i * 4 : (i + 1) * 4]]
        assert got == [c[0].token_ids for c in alone[i]], p
    for seq in grammar_rows:
        Person.model_validate_json(engine.text(seq))
    assert engine.compiles_after_ready == 0


def test_grammar_rows_skip_multi_step_decode(engine):
    """decode[R] samples k tokens on the device without the host's mask in between: a batch
    with a grammar row runs one step per call; without one it goes back to decode[R]."""
    decode = calls(engine, "decode")
    params = SamplingParams(temperature=0.0, max_tokens=200, grammar=SCHEMA)
    engine.generate(PROMPTS[:2], params)
    assert calls(engine, "decode") == decode
    engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert calls(engine, "decode") > decode


def test_a_complete_grammar_stops_without_sampling_eos(engine):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                            grammar=GrammarSpec.of("choice", ["done"], "x"))  # fmt: skip
    (c,) = engine.generate(PROMPTS[:1], params)[0]
    assert c.text == "done" and c.finish_reason == "stop"
    assert engine.tokenizer.eos_token_ids[0] not in c.token_ids


def test_bad_grammar_is_refused_before_anything_runs(engine):
    bad = GrammarSpec.of("regex", "(unclosed", "structured_outputs.regex")
    waiting = engine.has_unfinished
    with pytest.raises(GrammarError) as e:
        engine.add_request(PROMPTS[0], SamplingParams(grammar=bad))
    assert e.value.param == "structured_outputs.regex"
    assert engine.has_unfinished == waiting


def test_a_bundle_without_the_masked_sampler_refuses_grammars_only(engine):
    """What a format-7 bundle loads: every graph but sample_masked (on the same KV pool, which
    the step graphs donate: the engine's current pages, handed back after)."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = engine.generate(PROMPTS[:1], params)[0][0].token_ids
    runner = engine.runner
    loaded = dataclasses.replace(
        engine.loaded,
        executables={k: v for k, v in engine.loaded.executables.items() if k[0] != "sample_masked"},
        k_pages=runner.k_pages,
        v_pages=runner.v_pages,
    )
    old = Engine(loaded, strict=True)
    try:
        assert not old.can_constrain
        with pytest.raises(GrammarError, match="rebuild it with `aotlm build`") as e:
            old.add_request(PROMPTS[0], SamplingParams(grammar=SCHEMA))
        assert e.value.param == "response_format"
        assert old.generate(PROMPTS[:1], params)[0][0].token_ids == expected
    finally:
        runner.k_pages, runner.v_pages = old.runner.k_pages, old.runner.v_pages
