"""The bundle's tokenizer: encode, decode, EOS ids and the chat template's raw text."""

from __future__ import annotations

import json

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from aotlm.bundle import Bundle
from aotlm.errors import RequestError


def valid_text(text: str) -> str:
    """`text`, if it is valid Unicode. JSON can carry a lone surrogate (`"\\ud800"`) that the
    (Rust) tokenizer refuses with a TypeError: that is the client's error, a RequestError (400)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(
            f"the text is not valid Unicode ({e.reason} at character {e.start})"
        ) from None
    return text


class BundleTokenizer:
    def __init__(self, bundle: Bundle, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = Tokenizer.from_file(str(bundle.file("tokenizer/tokenizer.json")))
        # tokenizer.json may pad and truncate (sentence-transformers exports pad and cut to 128):
        # aotlm pads to its own buckets and checks lengths itself, so neither may apply here.
        self._tok.no_padding()
        self._tok.no_truncation()
        files = bundle.manifest.files
        self.config = (
            self._json(bundle, "tokenizer/tokenizer_config.json")
            if "tokenizer/tokenizer_config.json" in files
            else {}
        )
        generation = (
            self._json(bundle, "tokenizer/generation_config.json")
            if "tokenizer/generation_config.json" in files
            else {}
        )
        self.chat_template = (
            bundle.read("tokenizer/chat_template.jinja").decode()
            if "tokenizer/chat_template.jinja" in files
            else None
        )
        eos = generation.get("eos_token_id", list(eos_token_ids))
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else [eos])
        self.vocab_size = self._tok.get_vocab_size()

    @staticmethod
    def _json(bundle: Bundle, rel: str) -> dict:
        data = json.loads(bundle.read(rel))
        return data if isinstance(data, dict) else {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(valid_text(text), add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self._tok)


class Detokenizer:
    """One sequence's output text, grown a token at a time.

    Decoding the whole output after every token is O(n^2) over a generation (4% of a CPU
    serving run here); tokenizers' DecodeStream keeps the state to decode only what is new, and
    holds back the bytes of an incomplete UTF-8 character. Once the sequence finishes,
    ``finish`` replaces the text with a full decode, so the final text is exactly
    ``decode(output)`` (incomplete trailing bytes included, as U+FFFD) whatever the streaming did.
    """

    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)
        self._fed = 0
        self.text = ""

    def update(self, ids: list[int]) -> str:
        """Feed the tokens of ``ids`` not seen yet (``ids`` is the whole output so far)."""
        for token in ids[self._fed :]:
            piece = self._stream.step(self._tok, token)
            if piece:
                self.text += piece
        self._fed = len(ids)
        return self.text

    def finish(self, ids: list[int]) -> str:
        self.text = self._tok.decode(ids, skip_special_tokens=True)
        self._fed = len(ids)
        return self.text
