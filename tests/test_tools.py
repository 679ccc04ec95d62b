"""Tool calling without a model: what tools and tool_choice mean, and how outputs are read,
whole and streamed in any chunking."""

from __future__ import annotations

import json

import llguidance
import pytest

from aotlm.runtime.http.api_errors import ParamError
from aotlm.runtime.http.tools import NamedToolChoice, ToolDefinition, plan_tools, template_format
from aotlm.tiny import CHAT_TEMPLATE

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
TOOLS = [
    ToolDefinition.model_validate({"function": {"name": "get_weather", "parameters": WEATHER}}),
    ToolDefinition.model_validate({"function": {"name": "now"}}),
]
LLAMA3 = '{{ "<|python_tag|>" }}{% for t in tools %}{{ t | tojson }}{% endfor %}'


def named(name: str) -> NamedToolChoice:
    return NamedToolChoice.model_validate({"type": "function", "function": {"name": name}})


def read(plan, chunks: list[str]) -> tuple[str, list[dict]]:
    """Feed the chunks as a stream would; what the OpenAI client accumulates from the deltas."""
    out = plan.output()
    content, calls = "", []
    for k, chunk in enumerate(chunks):
        fields = out.read(chunk, final=k == len(chunks) - 1)
        content += fields.get("content", "")
        calls += fields.get("tool_calls", [])
    assert [c["index"] for c in calls] == list(range(len(calls)))
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


HERMES_TEXT = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>{"name": "now", "arguments": {}}</tool_call>'
)


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_hermes_calls_are_read_in_any_chunking(size):
    plan = plan_tools(TOOLS, "auto", CHAT_TEMPLATE)
    assert plan.format == "hermes" and plan.grammar is None
    content, calls = read(plan, chunked(HERMES_TEXT, size))
    assert content == "Let me look.\n"
    assert calls == [("get_weather", {"city": "Paris"}), ("now", {})]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_text_without_calls_is_all_content(size):
    plan = plan_tools(TOOLS, "auto", CHAT_TEMPLATE)
    text = "a < b and <tool but not a call <tool_cal"
    assert read(plan, chunked(text, size)) == (text, [])


def test_an_unclosed_or_broken_call_is_content():
    plan = plan_tools(TOOLS, "auto", CHAT_TEMPLATE)
    assert read(plan, ['<tool_call>{"name": "now", "arguments": {}}']) == ("", [("now", {})])
    broken = '<tool_call>{"name": "now", "argu'
    assert read(plan, [broken]) == (broken, [])
    undeclared = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert read(plan, chunked(undeclared, 4)) == (undeclared, [])


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_llama3_json_calls(size):
    plan = plan_tools(TOOLS, "auto", LLAMA3)
    assert plan.format == "llama3_json"
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "now"}'
    assert read(plan, chunked(text, size)) == ("", [("get_weather", {"city": "Rome"}), ("now", {})])
    assert read(plan, chunked("  Plain answer.", size)) == ("  Plain answer.", [])
    assert read(plan, chunked('{"not": "a call"}', size)) == ('{"not": "a call"}', [])
    answer = '{"name": "Bob", "age": 3}'  # JSON with a "name" that is no declared tool
    assert read(plan, chunked(answer, size)) == (answer, [])


def test_required_forces_an_array_of_declared_calls():
    plan = plan_tools(TOOLS, "required", CHAT_TEMPLATE)
    grammar = json.loads(plan.grammar.source)
    assert grammar["minItems"] == 1
    assert [c["properties"]["name"]["const"] for c in grammar["items"]["anyOf"]] == [
        "get_weather",
        "now",
    ]
    assert not llguidance.LLMatcher.validate_grammar(plan.grammar.to_llguidance())
    text = (
        '[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "X"}}]'
    )
    assert read(plan, chunked(text, 5)) == ("", [("now", {}), ("get_weather", {"city": "X"})])
    cut = '[{"name": "now", "par'  # max_tokens ended it: no call, the text as content
    assert read(plan, [cut]) == (cut, [])


def test_no_parallel_calls_means_exactly_one():
    plan = plan_tools(TOOLS, "required", CHAT_TEMPLATE, parallel=False)
    assert json.loads(plan.grammar.source)["maxItems"] == 1


def test_a_named_function_forces_its_parameters():
    plan = plan_tools(TOOLS, named("get_weather"), CHAT_TEMPLATE)
    assert json.loads(plan.grammar.source) == WEATHER
    assert read(plan, ['{"city": ', '"Oslo"}']) == ("", [("get_weather", {"city": "Oslo"})])


def test_none_renders_the_tools_and_reads_nothing():
    plan = plan_tools(TOOLS, "none", CHAT_TEMPLATE)
    assert plan.output() is None and plan.grammar is None and len(plan.tools) == 2


@pytest.mark.parametrize(
    ("tools", "choice", "template", "param"),
    [
        (None, "required", CHAT_TEMPLATE, "tool_choice"),
        (TOOLS, named("missing"), CHAT_TEMPLATE, "tool_choice"),
        (TOOLS, "auto", "{{ messages }}", "tools"),  # the template cannot show tools
        (TOOLS, "auto", "{{ tools }}", "tools"),  # shows them, no call format we can read
        (TOOLS[:1] * 2, "auto", CHAT_TEMPLATE, "tools"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_field(tools, choice, template, param):
    with pytest.raises(ParamError) as e:
        plan_tools(tools, choice, template)
    assert e.value.param == param


def test_unknown_format_still_allows_forced_calls():
    assert plan_tools(TOOLS, "required", "{{ tools }}").grammar is not None
    assert template_format("{{ tools }}") is None
