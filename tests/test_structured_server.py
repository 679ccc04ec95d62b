"""Structured output and tool calls over HTTP, with the official `openai` client against a real
uvicorn server on the tiny bundle: response_format (pydantic parse, json_object, json_schema),
vLLM's structured_outputs, tools with every tool_choice, streamed and whole; bad grammars are 400s
naming their field; a bundle without the masked sampler refuses grammars and serves the rest."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pydantic
import pytest
import test_server
from bundle_factory import build_from_yaml, write_model_yaml
from test_server import AUTH, KEY, MODEL, serving
from test_structured_engine import Person

from aotlm.runtime.generation.async_engine import AsyncEngine
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.http.server import create_app

ASK = [{"role": "user", "content": "Who is the admin?"}]


CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},
}


class City(pydantic.BaseModel):  # CITY as a model, to validate the arguments of calls
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    city: str = pydantic.Field(max_length=10)
    days: int = pydantic.Field(ge=1, le=14)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {
        "type": "function",
        "function": {
            "name": "now",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    },
]


@pytest.fixture(scope="module")
def long_bundle(tiny_checkpoint, tmp_path_factory):
    """The tiny model with room for tool signatures (the tiny tokenizer spends ~400 tokens on
    two), buckets up to 128 tokens and 8 requests."""
    buckets = {"tokens": [16, 64, 128], "requests": [1, 8], "page_size": 16}
    spec = write_model_yaml(
        tmp_path_factory.mktemp("long-spec"), tiny_checkpoint, max_seq_len=640, buckets=buckets
    )
    out = tmp_path_factory.mktemp("bundles") / "tiny-long"
    build_from_yaml(spec, out)
    return out


@pytest.fixture(scope="module")
def engine(long_bundle) -> Iterator[AsyncEngine]:
    ae = AsyncEngine.from_bundle(long_bundle)
    assert ae.wait_loaded(120), ae.unavailable_reason()
    yield ae
    ae.shutdown()


# test_server's app and client fixtures, over this module's engine
base_url, client = test_server.base_url, test_server.client


def test_pydantic_parse_fifty_times(client, engine):
    def one(seed: int) -> Person:
        r = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Person, temperature=1.0, seed=seed
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.parsed

    with ThreadPoolExecutor(8) as pool:
        people = list(pool.map(one, range(50)))
    assert all(isinstance(p, Person) for p in people)
    assert len({p.model_dump_json() for p in people}) > 1  # sampled, not one fixed answer
    assert engine.engine.compiles_after_ready == 0


def test_json_object_and_schema_on_completions_too(client):
    r = client.completions.create(
        model=MODEL,
        prompt="A person:",
        max_tokens=100,
        temperature=1.0,
        seed=11,
        extra_body={"response_format": {"type": "json_object"}},
    )
    c = r.choices[0]
    assert c.finish_reason == "stop", c.text
    assert isinstance(json.loads(c.text), dict)
    schema = {"name": "person", "schema": Person.model_json_schema(), "strict": True}
    r = client.completions.create(
        model=MODEL,
        prompt="A person:",
        max_tokens=100,
        n=3,
        seed=1,
        extra_body={"response_format": {"type": "json_schema", "json_schema": schema}},
    )
    for c in r.choices:
        Person.model_validate_json(c.text)


def test_vllm_structured_outputs(client):
    so = {"choice": ["red", "green", "blue"]}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, n=6, seed=3, extra_body={"structured_outputs": so}
    )
    assert {c.message.content for c in r.choices} <= {"red", "green", "blue"}
    so = {"regex": r"[A-Z][a-z]{2,5} [0-9]{2}"}
    r = client.completions.create(
        model=MODEL, prompt="x", max_tokens=30, seed=5, extra_body={"structured_outputs": so}
    )
    assert re.fullmatch(so["regex"], r.choices[0].text)
    so = {"grammar": 'start: "ab" NUM\nNUM: /[0-9]+/', "regex": None}
    stream = client.completions.create(
        model=MODEL, prompt="x", max_tokens=6, stream=True, extra_body={"structured_outputs": so}
    )
    assert re.fullmatch(r"ab[0-9]*", "".join(c.choices[0].text for c in stream))
    so = {"json": json.dumps(CITY)}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, seed=6, extra_body={"structured_outputs": so}
    )
    assert set(json.loads(r.choices[0].message.content)) == {"city", "days"}


def test_vllm_guided_fields_of_older_clients(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, n=4, seed=8, extra_body={"guided_choice": ["up", "down"]}
    )
    assert {c.message.content for c in r.choices} <= {"up", "down"}
    r = client.completions.create(
        model=MODEL, prompt="x", extra_body={"guided_json": json.dumps(CITY)}, seed=9, max_tokens=60
    )
    assert City.model_validate(json.loads(r.choices[0].text))


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


def test_required_and_named_force_valid_calls(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=4, temperature=1.0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = calls_of(choice.message)
    assert calls and all(name in {"get_weather", "now"} for name, _ in calls)
    for name, args in calls:
        assert City.model_validate(args) if name == "get_weather" else args == {}
    for call in choice.message.tool_calls:
        assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, seed=7
    )
    ((name, args),) = calls_of(r.choices[0].message)
    assert name == "get_weather" and City.model_validate(args)
    assert r.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_call_streams_as_tool_call_deltas(client, choice):
    with client.chat.completions.stream(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        seed=2,
        temperature=1.0,
    ) as stream:
        final = stream.get_final_completion()
    calls = calls_of(final.choices[0].message)
    assert len(calls) == 1 and final.choices[0].finish_reason == "tool_calls"
    for name, args in calls:
        assert City.model_validate(args) if name == "get_weather" else args == {}


HERMES = (
    r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)", '
    r'"days": [1-7]\}\}</tool_call>'
)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_reads_hermes_calls_from_the_text(client, base_url, stream):
    """The tiny model does not know to call tools; a regex makes it write a Hermes call, which
    `auto` must read into tool_calls (and the leading words into content)."""
    body = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "structured_outputs": {"regex": HERMES},
        "seed": 5,
        "stream": stream,
    }
    if not stream:
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        message, finish = r.json()["choices"][0]["message"], r.json()["choices"][0]["finish_reason"]
    else:
        message, finish = {"content": "", "tool_calls": []}, None
        with httpx.stream(
            "POST", f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
        ) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0]
                message["content"] += delta["delta"].get("content") or ""
                message["tool_calls"] += delta["delta"].get("tool_calls", [])
                finish = delta["finish_reason"] or finish
        assert [c["index"] for c in message["tool_calls"]] == [0]
    assert message["content"] == "Sure. " and finish == "tool_calls"
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in {"Paris", "Rome"}


def test_tokenize_counts_what_chat_renders_with_tools(base_url):
    """/tokenize with tools gives the prompt chat sends the model (usage.prompt_tokens)."""
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS}
    r = httpx.post(f"{base_url}/tokenize", json=body, headers=AUTH, timeout=60)
    plain = httpx.post(f"{base_url}/tokenize", json={"messages": ASK}, headers=AUTH).json()
    body |= {"max_tokens": 1, "tool_choice": "none"}
    chat = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.json()["count"] == chat.json()["usage"]["prompt_tokens"] > plain["count"]


def test_none_and_no_tools_leave_text_alone(client):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


def test_grammar_rows_leave_free_rows_alone(client):
    """Greedy answers of free requests are the same with grammar requests in the batch."""
    free = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.0}
    alone = client.completions.create(**free).choices[0].text
    constrained = {"model": MODEL, "messages": ASK, "response_format": Person, "seed": 1}

    def work(k: int):
        if k % 2:
            return client.chat.completions.parse(**constrained).choices[0].message.parsed
        return client.completions.create(**free).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(16)))
    assert results[0::2] == [alone] * 8
    assert all(isinstance(p, Person) for p in results[1::2])


def test_nothing_compiled_after_ready(engine, base_url):
    """Last in the module: every grammar, tool and mixed batch above ran on the bundle's graphs,
    and /metrics counts the host's mask work."""
    assert engine.engine.compiles_after_ready == 0
    assert engine.engine.can_constrain
    text = httpx.get(f"{base_url}/metrics").text
    masks = re.search(r"^aotlm:grammar_masks_total (\S+)$", text, re.MULTILINE)
    seconds = re.search(r"^aotlm:grammar_mask_seconds_total (\S+)$", text, re.MULTILINE)
    assert float(masks.group(1)) > 50 and float(seconds.group(1)) > 0
    assert re.search(r"^aotlm:compiles_after_ready 0\.0$", text, re.MULTILINE)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "structured_outputs",
        ),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        (
            {"structured_outputs": {"json": '{"a":' * 3000 + "1" + "}" * 3000}},
            "structured_outputs.json",
        ),
        ({"guided_regex": "a", "structured_outputs": {"regex": "b"}}, "guided_regex"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_field(base_url, client, extra, param):
    body = {"model": MODEL, "messages": ASK, **extra}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    after = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert after.usage.completion_tokens == 2  # the server serves the next request


def test_a_schema_nested_deeper_than_anyone_needs_is_a_400(base_url, client):
    raw = '{"type": "object", "properties": {"a": ' * 600 + '{"type": "string"}' + "}}" * 600
    body = '{"model": "' + MODEL + '", "messages": [{"role": "user", "content": "x"}], '
    body += '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": '
    body += raw + "}}}"
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=body,
        headers={**AUTH, "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    after = client.completions.create(
        model=MODEL, prompt="x", max_tokens=2, extra_body={"ignore_eos": True}
    )
    assert after.usage.completion_tokens == 2  # and the server serves the next request


def test_a_bundle_without_the_masked_sampler_refuses_grammars_and_serves(long_bundle):
    """Format-7 bundles hold no sample_masked: loaded as such (its graphs filtered), the server
    answers grammar requests with a 400 that says to rebuild, and serves everything else."""

    def load() -> Engine:
        e = Engine.from_bundle(long_bundle)
        graphs = {k: v for k, v in e.loaded.executables.items() if k[0] != "sample_masked"}
        return Engine(dataclasses.replace(e.loaded, executables=graphs))

    old = AsyncEngine(load)
    assert old.wait_loaded(120), old.unavailable_reason()
    try:
        with serving(create_app(old, model_name=MODEL, api_key=KEY)) as url:
            c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
            with pytest.raises(openai.BadRequestError, match="rebuild it with `aotlm build`"):
                c.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person)
            with pytest.raises(openai.BadRequestError, match="rebuild"):
                c.chat.completions.create(
                    model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required"
                )
            r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, tools=TOOLS)
            assert r.choices[0].finish_reason == "length"
    finally:
        old.shutdown()
