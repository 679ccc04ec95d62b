"""Tool calling on chat: what `tools` and `tool_choice` mean for the output, and its parsing.

`required` and a named function force a valid call with a grammar, the way vLLM does it: a JSON
array of {"name", "parameters"} objects (one per call, each a declared tool), or that function's
parameters object; the output is then JSON whatever the model's own call format. `auto` lets the
model choose and parses what it wrote in the format its chat template teaches it: Qwen/Hermes
`<tool_call>{"name", "arguments"}</tool_call>` blocks, or Llama-3's bare JSON object
`{"name", "parameters"}`. `none` renders the tools and parses nothing.

Streamed, content flows as it comes until a call may be starting; each call leaves as one
`tool_calls` delta once it is complete, which is how the OpenAI client accumulates them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aotlm.grammar.spec import GrammarSpec
from aotlm.runtime.http.api_errors import ParamError

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
Format = Literal["hermes", "llama3_json"]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request's tools mean: the template's `tools`, the forcing grammar (None
    for auto/none), and how the output is read."""

    tools: list[dict[str, Any]]
    mode: Literal["none", "auto", "required", "named"]
    grammar: GrammarSpec | None = None
    format: Format = "hermes"
    named: str | None = None

    def output(self) -> ToolOutput | None:
        return None if self.mode == "none" else ToolOutput(self)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)


def template_format(template: str) -> Format | None:
    """The call format a chat template teaches its model, from the template's own text."""
    if HERMES_OPEN in template:
        return "hermes"
    if PYTHON_TAG in template or '"parameters"' in template:
        return "llama3_json"
    return None


def plan_tools(
    tools: list[ToolDefinition] | None,
    choice: ToolChoice | None,
    template: str | None,
    parallel: bool = True,
) -> ToolPlan | None:
    """The request's `ToolPlan`, or None without tools; a 400 naming the field otherwise.
    `parallel` False (OpenAI's parallel_tool_calls) makes `required` exactly one call."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ParamError("tool_choice", "tool_choice needs tools to choose from")
        return None
    if not template or "tools" not in template:
        raise ParamError(
            "tools", "this model's chat template does not render tools: it cannot be told of them"
        )
    rendered = [t.model_dump(exclude_none=True) for t in tools]
    by_name = {t.function.name: t.function for t in tools}
    if len(by_name) != len(tools):
        raise ParamError("tools", "two tools have the same function name")
    if choice is None or choice == "auto":
        fmt = template_format(template)
        if fmt is None:
            raise ParamError(
                "tools",
                "this model's chat template writes tool calls in a format aotlm does not parse "
                f"(known: {HERMES_OPEN} JSON as Qwen and Hermes, Llama-3 JSON); send "
                'tool_choice "required" or a named function, which force the call',
            )
        return ToolPlan(rendered, "auto", format=fmt)
    if choice == "none":
        return ToolPlan(rendered, "none")
    if choice == "required":
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": _parameters(f)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, f in by_name.items()
        ]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            schema["maxItems"] = 1
        return ToolPlan(rendered, "required", GrammarSpec.of("json_schema", schema, "tools"))
    name = choice.function.name
    if name not in by_name:
        raise ParamError("tool_choice", f"tool_choice names {name!r}, which is not among tools")
    spec = GrammarSpec.of("json_schema", _parameters(by_name[name]), "tools")
    return ToolPlan(rendered, "named", spec, named=name)


def _parameters(f: FunctionDefinition) -> dict[str, Any]:
    return f.parameters if f.parameters is not None else {"type": "object"}


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One call in OpenAI's shape; `arguments` is always a JSON string."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _call_of(obj: Any, names: frozenset[str]) -> dict[str, Any] | None:
    """A parsed {"name", "arguments"|"parameters"} object naming a declared tool as a call;
    None if it is not one (an answer that merely has a "name" key is not a call)."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return tool_call(obj["name"], args)


def _json_objects(text: str) -> Iterator[Any]:
    """JSON values one after another, separated by whitespace or `;` (Llama-3's separator)."""
    decoder, i = json.JSONDecoder(), 0
    while (i := _skip(text, i)) < len(text):
        value, i = decoder.raw_decode(text, i)
        yield value


def _skip(text: str, i: int) -> int:
    while i < len(text) and (text[i].isspace() or text[i] == ";"):
        i += 1
    return i


@dataclass
class ToolOutput:
    """One choice's output under tools: `feed` each text delta, then `finish`; each returns
    the delta fields to send (`content`, `tool_calls`). Non-streamed, feed it the whole text."""

    plan: ToolPlan
    buffer: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    # auto: "open" until the text shows whether it is content or a call
    state: Literal["open", "content", "call"] = "open"
    inside: bool = False  # hermes: between <tool_call> and </tool_call>

    def read(self, text: str, final: bool) -> dict[str, Any]:
        """`feed`, then on the last delta `finish`, merged into one set of fields."""
        fields = self.feed(text)
        for key, value in (self.finish() if final else {}).items():
            fields[key] = fields[key] + value if key in fields else value
        return fields

    def feed(self, text: str) -> dict[str, Any]:
        self.buffer += text
        if self.plan.mode != "auto":
            return {}  # forced: the whole output is the call(s), read at the end
        if self.plan.format == "llama3_json":
            return self._feed_llama()
        return self._feed_hermes()

    def finish(self) -> dict[str, Any]:
        rest, self.buffer = self.buffer, ""
        if self.plan.mode != "auto":
            calls = self._forced(rest)
        elif self.state != "call":
            return {"content": rest} if rest else {}
        elif self.plan.format == "llama3_json":
            calls = self._llama_calls(rest)
        elif not self.inside:
            return {}
        else:  # an unclosed <tool_call>: the model stopped before </tool_call>
            call = self._hermes_call(rest)
            calls = [call] if call is not None else None
            rest = HERMES_OPEN + rest
        # No call after all (e.g. max_tokens cut the JSON): what was written is content.
        return self._calls(calls) if calls else {"content": rest}

    def _forced(self, text: str) -> list[dict[str, Any]] | None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None
        if self.plan.mode == "named":
            return [tool_call(self.plan.named or "", value)]
        if not isinstance(value, list):
            return None
        calls = [_call_of(v, self.plan.names) for v in value]
        return calls if calls and all(calls) else None  # type: ignore[return-value]

    def _calls(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        start = len(self.calls)
        self.calls.extend(calls)
        return {"tool_calls": [{"index": start + k, **c} for k, c in enumerate(calls)]}

    def _feed_hermes(self) -> dict[str, Any]:
        content, calls = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(HERMES_OPEN)
                # keep an end that may be the start of <tool_call>
                cut = (
                    at if at >= 0 else len(self.buffer) - _partial_suffix(self.buffer, HERMES_OPEN)
                )
                if self.state == "open":
                    content += self.buffer[:cut]
                # between and after calls only whitespace is expected: it is dropped
                self.buffer = self.buffer[cut:]
                if at < 0:
                    break
                self.buffer = self.buffer[len(HERMES_OPEN) :]
                self.inside, self.state = True, "call"
            else:
                end = self.buffer.find(HERMES_CLOSE)
                if end < 0:
                    break
                block = self.buffer[:end]
                if (call := self._hermes_call(block)) is not None:
                    calls.append(call)
                else:  # not a call after all: the client sees what the model wrote
                    content += HERMES_OPEN + block + HERMES_CLOSE
                self.buffer = self.buffer[end + len(HERMES_CLOSE) :]
                self.inside = False
        out = {"content": content} if content else {}
        return {**out, **self._calls(calls)} if calls else out

    def _hermes_call(self, block: str) -> dict[str, Any] | None:
        try:
            return _call_of(json.loads(block.strip()), self.plan.names)
        except json.JSONDecodeError:
            return None

    def _feed_llama(self) -> dict[str, Any]:
        if self.state == "open":
            head = self.buffer.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return {}  # cannot tell yet
            self.state = "call" if head.startswith(("{", PYTHON_TAG)) else "content"
        if self.state == "call":
            return {}  # read whole at the end
        content, self.buffer = self.buffer, ""
        return {"content": content}

    def _llama_calls(self, text: str) -> list[dict[str, Any]] | None:
        text = text.strip().removeprefix(PYTHON_TAG)
        try:
            calls = [_call_of(v, self.plan.names) for v in _json_objects(text)]
        except json.JSONDecodeError:
            return None
        return calls if calls and all(calls) else None  # type: ignore[return-value]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0
