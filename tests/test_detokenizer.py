"""Incremental detokenization: what streaming shows is always a prefix of the full decode, and the
final text is exactly the full decode, for byte-level (split UTF-8) and Metaspace tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aotlm.runtime.load.tokenizer import Detokenizer

TEXT = "naïve café — 東京 señor 🙂 ok. " * 20


def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer)
    return tok


def metaspace() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"])
    )
    return tok


@pytest.mark.parametrize("make", [byte_level, metaspace])
@pytest.mark.parametrize("seed", range(4))
def test_streamed_text_is_a_prefix_and_final_text_is_exact(make, seed):
    tok = make()
    rng = np.random.default_rng(seed)
    # real text, and random ids (byte tokens that split UTF-8 characters anywhere)
    ids = (
        tok.encode(TEXT).ids[:60]
        if seed % 2 == 0
        else rng.integers(0, tok.get_vocab_size(), 60).tolist()
    )
    detok = Detokenizer(tok)
    for n in range(1, len(ids) + 1):
        text = detok.update(ids[:n])
        full = tok.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(text), (n, text, full)
        assert len(full.rstrip("\ufffd")) - len(text) <= 16  # nothing held back for long
    assert detok.finish(ids) == tok.decode(ids, skip_special_tokens=True)
