"""A request's output constraint: OpenAI's `response_format` or vLLM's `structured_outputs`
(or its older `guided_*` fields).

Both name what the output must be, one way each; a request that sends both, or several kinds in
`structured_outputs`, is refused rather than one silently winning. The result is a `GrammarSpec`
that remembers the field it came from, so a schema the engine cannot compile is a 400 naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aotlm.grammar.spec import GrammarError, GrammarSpec


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extra body (its older `guided_*` fields, one object)."""

    model_config = ConfigDict(extra="ignore")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def response_format_spec(rf: ResponseFormat) -> GrammarSpec | None:
    if rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec.of("json_object", None, "response_format")
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise GrammarError(
            "response_format.json_schema",
            'type "json_schema" needs json_schema.schema (the JSON schema the output must match)',
        )
    return GrammarSpec.of("json_schema", rf.json_schema.json_schema, "response_format.json_schema")


def structured_outputs_spec(so: StructuredOutputs) -> GrammarSpec | None:
    given = {
        "json": so.json_,
        "regex": so.regex,
        "choice": so.choice,
        "grammar": so.grammar,
        "json_object": so.json_object or None,
    }
    return _one_of(given, "structured_outputs", lambda key: f"structured_outputs.{key}")


class GuidedFields(BaseModel):
    """vLLM's older top-level `guided_*` fields, for clients written before structured_outputs."""

    model_config = ConfigDict(extra="ignore")

    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


def guided_spec(g: GuidedFields) -> GrammarSpec | None:
    given = {
        "json": g.guided_json,
        "regex": g.guided_regex,
        "choice": g.guided_choice,
        "grammar": g.guided_grammar,
    }
    return _one_of(given, None, lambda key: f"guided_{key}")


def _one_of(
    given: dict[str, Any], field: str | None, param: Callable[[str], str]
) -> GrammarSpec | None:
    """The one kind given; `field` names the error when several are (None: the last one)."""
    given = {k: v for k, v in given.items() if v is not None}
    if len(given) > 1:
        names = [param(k) for k in given]
        raise GrammarError(
            field or names[-1], f"give one of json, regex, choice, grammar, not {names}"
        )
    if not given:
        return None
    ((key, value),) = given.items()
    if key == "json":
        if isinstance(value, str):  # vLLM accepts the schema as a JSON string too
            value = _json_object(value, param(key))
        return GrammarSpec.of("json_schema", value, param(key))
    return GrammarSpec.of(key, value, param(key))


def request_spec(
    response_format: ResponseFormat | None,
    structured_outputs: StructuredOutputs | None,
    guided: GuidedFields | None = None,
) -> GrammarSpec | None:
    """The constraint a request asks for, or None for free text; several ways at once is 400."""
    specs = [
        response_format_spec(response_format) if response_format is not None else None,
        structured_outputs_spec(structured_outputs) if structured_outputs is not None else None,
        guided_spec(guided) if guided is not None else None,
    ]
    given = [s for s in specs if s is not None]
    if len(given) > 1:
        fields = " and ".join(s.param.split(".")[0] for s in given)
        field = given[-1].param.split(".")[0]
        raise GrammarError(field, f"give one output constraint, not {fields}")
    return given[0] if given else None


def _json_object(text: str, param: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GrammarError(param, f"not valid JSON: {e}") from None
    except RecursionError:
        raise GrammarError(param, "the schema is nested too deeply") from None
