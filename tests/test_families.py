"""The model registry: dispatch by architecture, encoder model.yaml rules, unsupported checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_bert import minilm_dir

from aotlm.build.bundle import build_bundle
from aotlm.build.families import (
    BERT,
    DECODER,
    ENCODER,
    checkpoint_kind,
    family_for_checkpoint,
)
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle.manifest import ModelInfo
from aotlm.errors import BundleError, CheckpointError, ConfigError
from aotlm.models.catalog import model_config

ENCODER_SPEC = {
    "dtype": "float32",
    "max_seq_len": 32,
    "buckets": {"tokens": [16, 32], "requests": [1, 64]},
}


def write_yaml(tmp_path: Path, **changes) -> Path:
    spec = {"model": str(minilm_dir()), **ENCODER_SPEC, **changes}
    path = tmp_path / "minilm.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_architectures_pick_their_family(tiny_checkpoint):
    assert family_for_checkpoint(minilm_dir()) is BERT
    assert (checkpoint_kind(minilm_dir()), checkpoint_kind(tiny_checkpoint)) == (ENCODER, DECODER)
    assert family_for_checkpoint(tiny_checkpoint).kind == DECODER


def test_an_unsupported_architecture_lists_every_supported_one(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"]})
    )
    spec = {"model": "ckpt", **ENCODER_SPEC}
    spec["buckets"] = {"tokens": [16, 32], "requests": [1, 2], "page_size": 16}
    (tmp_path / "gpt2.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_build_config(tmp_path / "gpt2.yaml")  # validated as a decoder; the build refuses
    with pytest.raises(CheckpointError) as e:
        build_bundle(cfg, tmp_path / "out")
    message = str(e.value)
    assert "unsupported architecture 'GPT2LMHeadModel'" in message
    for arch in ("LlamaForCausalLM", "Qwen3ForCausalLM", "BertModel (encoder)"):
        assert arch in message
    assert not (tmp_path / "out").exists()


def test_encoder_yaml_has_sequence_and_batch_ladders_and_no_kv(tmp_path):
    cfg = load_build_config(write_yaml(tmp_path))
    assert cfg.kind == ENCODER and (cfg.page_size, cfg.kv_pages, cfg.pages_per_seq) == (0, 0, 0)
    # batch buckets are not bounded by the sequence-length ladder (unlike decoder requests)
    assert (cfg.token_buckets, cfg.request_buckets) == ((16, 32), (1, 64))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"buckets": {"tokens": [16, 32], "requests": [1], "page_size": 16}},
            "buckets.page_size: the checkpoint is an encoder .* no KV cache",
        ),
        ({"kv_pages": 100}, "kv_pages: the checkpoint is an encoder"),
        ({"decode_steps": 4}, "decode_steps: the checkpoint is an encoder .* generates no tokens"),
        (
            {"buckets": {"tokens": [16], "requests": [1]}},
            r"buckets.tokens\[0\]: .* must equal max_seq_len \(32\) \(got 16\)",
        ),
        ({"buckets": {"tokens": [16, 64], "requests": [1]}}, "must be at most max_seq_len"),
        ({"buckets": {"tokens": [32]}}, "buckets.requests: required key is missing"),
    ],
)
def test_bad_encoder_yaml_names_the_key(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        load_build_config(write_yaml(tmp_path, **changes))


def test_max_seq_len_beyond_the_position_table_is_refused(tmp_path):
    cfg = load_build_config(
        write_yaml(tmp_path, max_seq_len=1024, buckets={"tokens": [1024], "requests": [1]})
    )
    with pytest.raises(ConfigError, match="max_position_embeddings \\(512\\)"):
        build_bundle(cfg, tmp_path / "out")


def test_a_manifest_of_an_unknown_architecture_is_refused():
    model = ModelInfo(kind="encoder", architecture="T5EncoderModel", config={})
    with pytest.raises(BundleError, match=r"'T5EncoderModel' .* not one this aotlm serves"):
        model_config(model, "b")
    model = ModelInfo(kind="decoder", architecture="BertModel", config={})
    with pytest.raises(BundleError, match="upgrade aotlm or rebuild"):
        model_config(model, "b")
