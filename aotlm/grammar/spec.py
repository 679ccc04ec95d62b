"""What a request constrains its output to, as one hashable value, and its llguidance grammar.

The kinds are what OpenAI's `response_format` and vLLM's `structured_outputs` ask for: a JSON
schema, any JSON object, a regex, one of a list of strings, or a Lark grammar. A spec remembers
the request field it came from, so every error names that field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

from aotlm.errors import RequestError

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
# Whitespace between JSON tokens: what pretty-printing needs (a newline and indentation ~7 levels
# deep), but bounded, so a model that prefers whitespace cannot fill max_tokens with it (unbounded,
# the usual default, is a known way for small models to never close an object). A schema's own
# "x-guidance" options override this (e.g. {"whitespace_flexible": false} for compact JSON).
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,16}"}


class GrammarError(RequestError):
    """A schema, regex, choice list or grammar the engine cannot use; `param` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class GrammarSpec:
    kind: Kind
    source: str  # the schema as canonical JSON, the regex, the choices as a JSON list, the grammar
    param: str = "response_format"  # the request field it came from, for errors

    @classmethod
    def of(cls, kind: str, value: Any, param: str) -> GrammarSpec:
        """Check the value's type for its kind; the content is checked when compiled."""
        if kind not in KINDS:
            raise GrammarError(param, f"unknown kind {kind!r} (one of {', '.join(KINDS)})")
        if kind == "json_schema":
            if not isinstance(value, dict):
                raise GrammarError(param, "a JSON schema must be an object")
            # Not sort_keys: the properties' order is the order the output writes them in.
            try:
                return cls(kind, json.dumps(value, separators=(",", ":")), param)
            except RecursionError:  # a request can nest deeper than Python's encoder goes
                raise GrammarError(param, "the schema is nested too deeply") from None
        if kind == "json_object":
            return cls(kind, "", param)
        if kind == "choice":
            if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                raise GrammarError(param, "choice must be a non-empty list of strings")
            return cls(kind, json.dumps(value), param)
        if not isinstance(value, str) or not value:
            raise GrammarError(param, f"{kind} must be a non-empty string")
        return cls(kind, value, param)  # type: ignore[arg-type]

    @property
    def key(self) -> tuple[str, str]:
        """What the compiled grammar depends on (not the field it came from)."""
        return (self.kind, self.source)

    def to_llguidance(self) -> str:
        """The engine's grammar text; errors in it surface when it is validated."""
        m = llguidance.LLMatcher
        if self.kind == "json_schema":
            # llguidance merges the defaults in, and a whitespace_pattern beats the schema's own
            # whitespace_flexible: the schema's choice, if it makes one, must replace ours.
            own = json.loads(self.source).get("x-guidance")
            mine = isinstance(own, dict) and own.keys() & {
                "whitespace_flexible",
                "whitespace_pattern",
            }
            return m.grammar_from_json_schema(self.source, defaults=None if mine else JSON_OPTIONS)
        if self.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return m.grammar_from_regex(self.source)
        if self.kind == "choice":
            # Lark string literals are JSON strings: json.dumps quotes and escapes each choice.
            alternatives = " | ".join(json.dumps(c) for c in json.loads(self.source))
            return m.grammar_from_lark(f"start: {alternatives}")
        return m.grammar_from_lark(self.source)
