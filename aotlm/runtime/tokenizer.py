"""The bundle's tokenizer: encode, decode, EOS ids and the chat template's raw text."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from aotlm.bundle import Bundle


class BundleTokenizer:
    def __init__(self, bundle: Bundle, eos_token_ids: tuple[int, ...] = ()) -> None:
        self._tok = Tokenizer.from_file(str(bundle.file("tokenizer/tokenizer.json")))
        files = bundle.manifest["files"]
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
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)
