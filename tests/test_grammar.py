"""Host-side grammars (aotlm/grammar/) with llguidance on the tiny model's tokenizer: the masks
allow exactly what the grammar does, constrained decoding from random logits gives valid output,
and bad specs are errors that name their field."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from aotlm.grammar.compiler import MAX_CACHED, GrammarCompiler, allowed, bitmask_words
from aotlm.grammar.spec import GrammarError, GrammarSpec

V, EOS = 1000, 1
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))


@pytest.fixture(scope="module")
def compiler(tiny_checkpoint):
    return GrammarCompiler((tiny_checkpoint / "tokenizer.json").read_text(), V, [EOS])


def decode_constrained(compiler, tokenizer, spec, seed, max_tokens=200) -> str:
    """Greedy over random logits, masked by the grammar: the grammar does all the work."""
    rng = np.random.default_rng(seed)
    row = np.zeros(bitmask_words(V), np.int32)
    g = compiler.matcher(spec)
    ids = []
    for _ in range(max_tokens):
        g.fill(row)
        logits = rng.standard_normal(V)
        ok = allowed(row, V)
        token = int(ok[np.argmax(logits[ok])])
        if token == EOS:
            break
        assert g.accept(token), g.error
        ids.append(token)
    assert g.accepting, "stopped before the grammar was complete"
    return tokenizer.decode(ids)


@pytest.mark.parametrize("seed", range(8))
def test_random_logits_under_a_schema_give_objects_that_validate(compiler, tokenizer, seed):
    obj = json.loads(
        decode_constrained(
            compiler, tokenizer, GrammarSpec.of("json_schema", SCHEMA, "response_format"), seed
        )
    )
    assert set(obj) == {"name", "age", "role"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    assert obj["role"] in ("admin", "user")


def test_choice_regex_and_json_object(compiler, tokenizer):
    choices = ["yes", "no", 'say "maybe"']
    for seed in range(4):
        spec = GrammarSpec.of("choice", choices, "structured_outputs.choice")
        assert decode_constrained(compiler, tokenizer, spec, seed) in choices
        regex = GrammarSpec.of("regex", r"\d{3}-[a-z]{2,4}", "structured_outputs.regex")
        assert re.fullmatch(
            r"\d{3}-[a-z]{2,4}", decode_constrained(compiler, tokenizer, regex, seed)
        )


@pytest.mark.parametrize(
    ("kind", "value", "text"),
    [
        ("json_schema", SCHEMA, '{"name":"Al","age":7,"role":"user"}'),
        ("json_object", None, '{"a": [1, {"b": null}], "c": "d"}'),
    ],
)
def test_the_mask_is_the_grammar_walking_a_valid_instance(compiler, tokenizer, kind, value, text):
    g = compiler.matcher(GrammarSpec.of(kind, value, "response_format"))
    row = np.zeros(bitmask_words(V), np.int32)
    g.fill(row)
    assert tokenizer.token_to_id("a") not in set(allowed(row, V).tolist())  # JSON starts with {
    left = text
    while left:  # the longest allowed token that spells the text on (the engine may insist on
        g.fill(row)  # the canonical token where the grammar forces the text)
        ok = allowed(row, V).tolist()
        assert EOS not in ok  # not complete yet
        spelled = [(len(w), t) for t in ok if left.startswith(w := tokenizer.decode([t])) and w]
        assert spelled, f"the mask allows no token that continues {left!r}"
        n, t = max(spelled)
        assert g.accept(t)
        left = left[n:]
    g.fill(row)
    assert g.accepting and EOS in set(allowed(row, V).tolist())


def test_a_forbidden_token_is_refused(compiler, tokenizer):
    g = compiler.matcher(GrammarSpec.of("regex", r"[0-9]+", "structured_outputs.regex"))
    row = np.zeros(bitmask_words(V), np.int32)
    g.fill(row)
    letter = tokenizer.token_to_id("a")
    assert letter not in set(allowed(row, V).tolist())
    assert not g.accept(letter) and g.error


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("json_schema", {"type": "object", "not": {"type": "string"}}, "not"),
        ("json_schema", ["not", "an", "object"], "must be an object"),
        ("regex", "(", "unclosed group"),
        ("choice", [], "non-empty list"),
        ("grammar", "start: (", "start"),
        ("xml", "<a/>", "unknown kind"),
    ],
)
def test_bad_specs_are_errors_naming_the_field(compiler, kind, value, message):
    with pytest.raises(GrammarError, match=re.escape(message)) as e:
        compiler.compile(GrammarSpec.of(kind, value, "structured_outputs." + kind))
    assert e.value.param == "structured_outputs." + kind
    assert str(e.value).startswith("structured_outputs." + kind + ": ")


def test_a_schema_nested_too_deeply_is_an_error_naming_the_field():
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(GrammarError, match="nested too deeply") as e:
        GrammarSpec.of("json_schema", schema, "response_format.json_schema")
    assert e.value.param == "response_format.json_schema"


def test_compiled_grammars_are_cached_per_spec_and_bounded(compiler):
    first = compiler.compile(GrammarSpec.of("regex", "a+", "x"))
    assert compiler.compile(GrammarSpec.of("regex", "a+", "y")) is first  # same content: a hit
    for i in range(MAX_CACHED + 10):
        compiler.compile(GrammarSpec.of("regex", f"b{{{i + 1}}}", "x"))
    assert len(compiler._cache) == MAX_CACHED
