"""Encoder bundles: embed[S,B] built from the real all-MiniLM-L6-v2 weights, run by the Embedder,
checked against transformers (mean pooling + L2 normalization in PyTorch) on the same checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from test_bert import minilm_dir

from aotlm.buckets.ladder import pick_bucket
from aotlm.bundle import read_manifest
from aotlm.cli import main
from aotlm.errors import NoBucketError
from aotlm.runtime.embedding.embedder import Embedder, InputTooLongError, plan_batches

SEQ, BATCH = (16, 32, 64, 128), (1, 4)  # the minilm_bundle fixture's ladders
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a white horse along a long and winding mountain road while it rains heavily.",
    "The compiler traces every bucket once at build time, exports the graphs as portable "
    "StableHLO, and the server only loads them, so nothing is compiled while requests are "
    "being answered.",
    " ".join(
        ["Embedding models map sentences of any length to vectors of a fixed size, so that "] * 3
    )
    + "similar sentences end up close to each other and unrelated ones far apart.",
]
LONG = "word " * 300


@pytest.fixture(scope="module")
def embedder(minilm_bundle) -> Embedder:
    return Embedder.from_bundle(minilm_bundle[0], strict=True)


@pytest.fixture(scope="module")
def hf():
    return (
        transformers.AutoModel.from_pretrained(minilm_dir()).eval(),
        transformers.AutoTokenizer.from_pretrained(minilm_dir()),
    )


def reference(hf, ids: list[int]) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2: BertModel, mean pooling, L2 normalize."""
    model, _ = hf
    with torch.no_grad():
        h = model(input_ids=torch.tensor([ids])).last_hidden_state
    return torch.nn.functional.normalize(h.mean(1), dim=-1)[0].numpy()


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_plan_batches_covers_every_input_once_longest_first():
    lengths = [5, 200, 7, 9, 3, 120, 8, 8, 6]
    calls = plan_batches(lengths, (16, 128, 256), (1, 2, 4))
    rows = [r for c in calls for r in c.rows]
    assert sorted(rows) == list(range(len(lengths)))
    assert [lengths[r] for r in rows] == sorted(lengths, reverse=True)
    for c in calls:
        assert len(c.rows) <= c.batch <= 4 and c.batch in (1, 2, 4)
        assert max(lengths[r] for r in c.rows) <= c.seq_len
    # the 200-token input runs alone: the short ones are not padded up to 256
    assert any(c.rows == (1,) and c.seq_len == 256 for c in calls)
    assert plan_batches([], (16,), (1,)) == []
    with pytest.raises(NoBucketError, match="no token bucket fits 300"):
        plan_batches([300], (16, 256), (1,))


def test_manifest_records_an_encoder_without_kv_cache(minilm_bundle):
    m = read_manifest(minilm_bundle[0])[0].to_dict()
    model = m["model"]
    assert (model["kind"], model["architecture"]) == ("encoder", "BertModel")
    assert (model["pooling"], model["normalize"]) == ("mean", True)
    assert model["config"]["hidden_size"] == 384 and model["config"]["num_layers"] == 6
    assert not {"page_size", "kv_pages", "pages_per_seq"} & set(m["serving"])
    assert m["buckets"] == {"tokens": list(SEQ), "requests": list(BATCH)}
    files = sorted(f["file"] for f in m["functions"])
    assert files == sorted(f"exported/embed_t{s}_r{b}.jaxexp" for s in SEQ for b in BATCH)
    assert {f["name"] for f in m["functions"]} == {"embed"}
    assert m["targets"]["cpu"]["tier"] == "compiled"
    assert m["targets"]["cpu"]["memory_plan"]["kv_pool_bytes"] == 0


def test_embeddings_match_transformers_in_every_bucket(embedder, hf):
    assert embedder.loaded.tier == "compiled" and embedder.counter.before_seal == 0
    ids = [embedder.token_ids(s) for s in SENTENCES]
    assert {pick_bucket(SEQ, len(x)) for x in ids} == set(SEQ)
    assert ids == [hf[1](s)["input_ids"] for s in SENTENCES]  # same tokenization as HF
    ours = embedder.embed(SENTENCES)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    for i, x in enumerate(ids):
        assert cosine_distance(ours[i], reference(hf, x)) < 1e-5, SENTENCES[i]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    eat, bread, baby = ours[:3]
    assert eat @ bread > eat @ baby  # eating food ~ eating bread, not carrying a baby
    assert embedder.compiles_after_ready == 0


def test_an_embedding_does_not_depend_on_its_batch_or_order(embedder):
    together = embedder.embed(SENTENCES)
    alone = np.stack([embedder.embed([s])[0] for s in SENTENCES])
    reversed_ = embedder.embed(SENTENCES[::-1])[::-1]
    for a, b, c in zip(together, alone, reversed_, strict=True):
        assert cosine_distance(a, b) < 1e-6 and cosine_distance(a, c) < 1e-6
    assert embedder.compiles_after_ready == 0


def test_too_long_input_is_refused_unless_truncated_like_sentence_transformers(embedder, hf):
    with pytest.raises(
        InputTooLongError, match=r"input has 302 tokens.*maximum input length is 128"
    ):
        embedder.embed([LONG])
    with pytest.raises(InputTooLongError, match=r"input\[1\] has 302 tokens"):
        embedder.embed(["short", LONG])
    cut = embedder.token_ids(LONG, embedder.truncation(-1))
    assert cut == hf[1](LONG, truncation=True, max_length=128)["input_ids"]  # [CLS] ... [SEP]
    assert embedder.token_ids(LONG, embedder.truncation(20)) == [*cut[:19], cut[-1]]
    ours = embedder.embed([LONG, "short"], truncate_prompt_tokens=-1)
    assert cosine_distance(ours[0], reference(hf, cut)) < 1e-5
    # token ids keep their last k, as vLLM does
    assert embedder.token_ids(list(range(1000, 1200)), 128) == list(range(1072, 1200))
    with pytest.raises(Exception, match="truncate_prompt_tokens must be -1"):
        embedder.truncation(129)
    assert embedder.compiles_after_ready == 0


def test_cli_embed_prints_vectors_and_generate_refuses_an_encoder(minilm_bundle):
    path = str(minilm_bundle[0])
    r = CliRunner().invoke(main, ["embed", path, "--text", SENTENCES[0], "--json", "--strict"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.splitlines()[0])
    assert len(out["embeddings"][0]) == out["dim"] == 384 and out["compiles_after_ready"] == 0
    r = CliRunner().invoke(main, ["embed", path, "--text", LONG])
    assert r.exit_code == 1 and "maximum input length is 128" in r.output
    r = CliRunner().invoke(main, ["generate", path, "--prompt", "hi"])
    assert r.exit_code == 1 and "encoder (embedding model) bundle cannot generate" in r.output
    r = CliRunner().invoke(main, ["inspect", path])
    assert r.exit_code == 0 and "BertModel encoder, float32, mean pooling, normalized" in r.output
    assert CliRunner().invoke(main, ["verify", path]).exit_code == 0


def test_a_decoder_bundle_is_not_an_embedder(tiny_bundle):
    with pytest.raises(Exception, match="is not an embedding model"):
        Embedder.from_bundle(tiny_bundle[0])
