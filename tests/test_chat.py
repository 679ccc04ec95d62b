"""Chat templates render in a sandbox, add BOS once, and turn every failure into a 400."""

from __future__ import annotations

import pytest

from aotlm.errors import RequestError
from aotlm.runtime.http.chat import chat_prompt_ids, render_chat
from aotlm.tiny import CHAT_TEMPLATE


class FakeTokenizer:
    def __init__(self, template: str | None = CHAT_TEMPLATE, bos: object = "<s>") -> None:
        self.config = {"bos_token": bos, "eos_token": "</s>"}
        self.chat_template = template
        self.calls: list[tuple[str, bool]] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        return [ord(c) for c in text]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_renders_the_tiny_template_with_a_generation_prompt():
    text = render_chat(FakeTokenizer(), MESSAGES)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    assert not render_chat(FakeTokenizer(), MESSAGES, add_generation_prompt=False).endswith(
        "<|assistant|>\n"
    )


def test_bos_written_by_the_template_is_not_added_again():
    tok = FakeTokenizer()
    chat_prompt_ids(tok, MESSAGES)
    assert tok.calls[-1][1] is False
    plain = FakeTokenizer(template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    chat_prompt_ids(plain, MESSAGES)
    assert plain.calls[-1][1] is True


def test_special_tokens_given_as_objects():
    tok = FakeTokenizer(bos={"content": "<s>", "lstrip": False})
    assert render_chat(tok, MESSAGES).startswith("<s><|system|>")


def test_text_content_parts_are_joined_and_others_refused():
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert "a\nb" in render_chat(FakeTokenizer(), parts)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(RequestError, match="image_url"):
        render_chat(FakeTokenizer(), image)


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        (CHAT_TEMPLATE, [{"role": "robot", "content": "x"}], "role must be"),  # raise_exception
        ("{{ ''.__class__.__mro__ }}", MESSAGES, "rejected"),  # sandbox
        ("{{ messages.append(1) }}", MESSAGES, "rejected"),  # immutable
        ("{% for %}", MESSAGES, "rejected"),  # syntax
        (None, MESSAGES, "no chat template"),
        (CHAT_TEMPLATE, [], "at least one"),
    ],
)
def test_failures_are_request_errors(template, messages, match):
    with pytest.raises(RequestError, match=match):
        render_chat(FakeTokenizer(template=template), messages)


def test_hf_helpers_are_available():
    tok = FakeTokenizer(template="{{ messages | tojson }}|{{ strftime_now('%Y') | length }}")
    assert render_chat(tok, [{"role": "user", "content": "é"}]).endswith('"é"}]|4')
