"""OpenAI request models -> `SamplingParams`, and the JSON shapes of choices, logprobs, usage.

Unknown fields are ignored, as OpenAI clients send extras. Known fields the engine cannot honour
are refused with a 400 naming them instead of being silently dropped: a client asking for
`logit_bias` must not get unbiased text while believing otherwise. Penalties (presence and
frequency in [-2, 2], OpenAI's; repetition in (0, inf), vLLM's) run on device; out of range is 400.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from aotlm.errors import RequestError
from aotlm.grammar.spec import GrammarSpec
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.generation.streams import ChoiceDelta
from aotlm.runtime.http.api_errors import ParamError
from aotlm.runtime.http.structured import (
    GuidedFields,
    ResponseFormat,
    StructuredOutputs,
    request_spec,
)
from aotlm.runtime.http.tools import ToolChoice, ToolDefinition

TokenText = Callable[[int], str]


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra body
    guided_json: dict[str, Any] | str | None = None  # vLLM's older fields, the same kinds
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        """Alternatives per token to return; None when no logprobs were asked for."""
        return None

    # field -> the values accepted for now (what the engine cannot do yet must not be ignored)
    neutral_values: ClassVar[dict[str, tuple[object, ...]]] = {}

    def check_supported(self) -> None:
        for name, accepted in self.neutral_values.items():
            value = getattr(self, name)
            if value not in accepted:
                raise ParamError(
                    name,
                    f"{name}={value!r} is not supported yet (the device sampler does not "
                    f"implement it); leave it out or send {accepted[-1]!r}",
                )

    def grammar(self) -> GrammarSpec | None:
        """The output constraint asked for (`response_format` or `structured_outputs`)."""
        guided = GuidedFields.model_validate(
            self.model_dump(include=set(GuidedFields.model_fields))
        )
        return request_spec(self.response_format, self.structured_outputs, guided)

    def sampling_params(
        self, max_tokens: int, grammar: GrammarSpec | None = None
    ) -> SamplingParams:
        """Validated `SamplingParams`; raises `ParamError` (HTTP 400) naming the bad field."""
        self.check_supported()
        repetition = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        try:
            return SamplingParams(
                temperature=1.0 if self.temperature is None else self.temperature,
                top_k=self.top_k or 0,
                top_p=1.0 if self.top_p is None else self.top_p,
                min_p=self.min_p or 0.0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=repetition,
                seed=self.seed,
                stop=self.stop or (),
                stop_token_ids=self.stop_token_ids or (),
                max_tokens=max_tokens,
                logprobs=self.num_top_logprobs,
                n=1 if self.n is None else self.n,
                ignore_eos=self.ignore_eos,
                grammar=grammar,
            ).validate()
        except RequestError as e:  # its messages start with the parameter's name
            name = str(e).split(" ", 1)[0]
            raise ParamError(name if name in type(self).model_fields else None, str(e)) from None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def num_top_logprobs(self) -> int | None:
        return self.logprobs

    neutral_values: ClassVar[dict[str, tuple[object, ...]]] = {
        **SamplingRequest.neutral_values,
        "echo": (None, False),
        "suffix": (None,),
        "logit_bias": (None, {}),
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, self.n or 1):
            raise ParamError("best_of", "best_of other than n is not supported yet")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        if not p:
            raise ParamError("prompt", "prompt must not be empty")
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    """Extra keys (name, tool_calls, ...) are kept: a chat template may read them."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_top_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs=true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.model_dump() for m in self.messages]


# ---- response shapes ------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_logprobs(
    delta: ChoiceDelta, token_text: TokenText, text_offset: int
) -> tuple[dict[str, Any], int]:
    """Legacy completions logprobs for a delta's tokens; returns it and the next text offset."""
    tokens = [token_text(t) for t in delta.token_ids]
    offsets = []
    for tok in tokens:
        offsets.append(text_offset)
        text_offset += len(tok)
    tops = []
    for tok, lp, alts in zip(tokens, delta.logprobs, delta.top_logprobs, strict=True):
        top = {token_text(t): v for t, v in alts}
        top.setdefault(tok, lp)  # OpenAI lists the sampled token among the top ones
        tops.append(top)
    out = {
        "tokens": tokens,
        "token_logprobs": list(delta.logprobs),
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return out, text_offset


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(delta: ChoiceDelta, token_text: TokenText) -> dict[str, Any]:
    """Chat logprobs: one entry per token, each with its requested top alternatives."""
    content = []
    for tok, lp, alts in zip(delta.token_ids, delta.logprobs, delta.top_logprobs, strict=True):
        entry = _chat_entry(token_text(tok), lp)
        entry["top_logprobs"] = [_chat_entry(token_text(t), v) for t, v in alts]
        content.append(entry)
    return {"content": content}


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDefinition] | None = None  # rendered with the messages, as chat does
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def completion_choice(
    index: int, d: ChoiceDelta, token_text: TokenText, want_logprobs: bool, text_offset: int
) -> tuple[dict[str, Any], int]:
    """A completions choice (streamed or whole) and the next logprobs text offset."""
    logprobs = None
    if want_logprobs:
        logprobs, text_offset = completion_logprobs(d, token_text, text_offset)
    choice = {
        "index": index,
        "text": d.text,
        "logprobs": logprobs,
        "finish_reason": d.finish_reason,
        "stop_reason": d.stop_reason,
    }
    return choice, text_offset


def chat_choice(
    index: int,
    d: ChoiceDelta,
    token_text: TokenText,
    want_logprobs: bool,
    stream: bool,
    fields: dict[str, Any] | None = None,
    called: bool = False,
) -> dict[str, Any]:
    """A chat choice: a `delta` when streamed, the whole `message` otherwise. `fields` replace
    the text when tools read it (`content`, `tool_calls`); `called`: the choice made calls."""
    fields = {"content": d.text} if fields is None else fields
    if stream:
        body = {"delta": {k: v for k, v in fields.items() if v}}
    else:
        message = {"role": "assistant", "content": fields.get("content") or None}
        if fields.get("tool_calls"):  # the message's calls carry no stream index
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in fields["tool_calls"]
            ]
        elif message["content"] is None:
            message["content"] = ""
        body = {"message": message}
    finish = d.finish_reason
    return {
        "index": index,
        **body,
        "logprobs": chat_logprobs(d, token_text) if want_logprobs else None,
        "finish_reason": "tool_calls" if called and finish == "stop" else finish,
        "stop_reason": d.stop_reason,
    }
