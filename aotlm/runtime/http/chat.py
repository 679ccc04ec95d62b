"""Chat messages -> prompt token ids, through the bundle's own chat template.

A chat template is code shipped with a model, so it runs in jinja2's immutable sandbox (no
attribute access to internals, no mutation of the passed objects) with the helpers that Hugging
Face templates expect: `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII.
Any failure is the request's fault (a bad role, a template that rejects the conversation), so it
becomes a `RequestError` (HTTP 400).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aotlm.errors import RequestError


class ChatTokenizer(Protocol):
    """What rendering needs from `BundleTokenizer`."""

    config: dict
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


class _TemplateRaised(jinja2.TemplateError):
    """`raise_exception(...)` inside a template: the template rejected the conversation."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """One sandboxed environment and compiled template per template source, reused."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(source)


def _special_token(config: Mapping[str, Any], name: str) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    value = config.get(name)
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def _content_text(content: object) -> str:
    """OpenAI content: a string, null, or a list of parts of which we accept text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content if isinstance(content, list) else [content]:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise RequestError(f"messages: content parts of type {kind!r} are not supported")
        texts.append(str(part.get("text", "")))
    return "\n".join(texts)


def render_chat(
    tokenizer: ChatTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """The prompt text for `messages` (and the request's `tools`, in OpenAI's shape, as Hugging
    Face templates take them), rendered by the bundle's chat template."""
    if not tokenizer.chat_template:
        raise RequestError("this model has no chat template: use /v1/completions")
    if not messages:
        raise RequestError("messages must hold at least one message")
    msgs = [{**m, "content": _content_text(m.get("content"))} for m in messages]
    try:
        return _compile(tokenizer.chat_template).render(
            messages=msgs,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=_special_token(tokenizer.config, "bos_token"),
            eos_token=_special_token(tokenizer.config, "eos_token"),
        )
    except jinja2.TemplateError as e:  # SecurityError and UndefinedError are TemplateErrors
        raise RequestError(f"the chat template rejected the messages: {e}") from e
    # e.g. `'a' + none`, `x[9]`, `1 / 0`, the sandbox's cap on range(), messages nested deeper
    # than `tojson` can go
    except (TypeError, ValueError, LookupError, ArithmeticError, RecursionError) as e:
        raise RequestError(f"the chat template failed on these messages: {e}") from e


def chat_prompt_ids(
    tokenizer: ChatTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """Render then encode. When the template already wrote BOS, encoding must not add it again."""
    text = render_chat(
        tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools
    )
    bos = _special_token(tokenizer.config, "bos_token")
    return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
