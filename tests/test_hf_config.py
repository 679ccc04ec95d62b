"""config.json -> ModelConfig: both HF spellings, per-family switches, and clear rejections."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hf_factory import make_hf_config

from aotlm.errors import CheckpointError
from aotlm.models import SUPPORTED_ARCHITECTURES, ModelConfig, read_hf_config
from aotlm.models.config import model_config_from_dict

OLD_LLAMA3: dict[str, Any] = {  # transformers < 5 spelling (Llama 3.1 8B, shrunk)
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def _write(tmp_path: Path, config: dict[str, Any], generation: dict | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_old_spelling_llama3(tmp_path: Path) -> None:
    cfg = read_hf_config(_write(tmp_path, OLD_LLAMA3))
    assert cfg.head_dim == 32 and cfg.num_kv_heads == 2 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling_dict == {**OLD_LLAMA3["rope_scaling"]}
    assert cfg.torch_dtype == "bfloat16" and cfg.family == "llama"
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (128000, (128001, 128008, 128009))
    assert not (cfg.attention_bias or cfg.qk_norm or cfg.tie_word_embeddings)
    assert cfg.sliding_window is None
    hash(cfg)  # a static jit argument
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    as_lists = json.loads(json.dumps(dataclasses.asdict(cfg)))  # what a manifest holds
    assert model_config_from_dict(as_lists) == cfg


def test_new_spelling_matches_old(tmp_path: Path) -> None:
    new = {k: v for k, v in OLD_LLAMA3.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": 500000.0, **OLD_LLAMA3["rope_scaling"]}
    new["dtype"] = new.pop("torch_dtype")
    (tmp_path / "old").mkdir()
    old_cfg = read_hf_config(_write(tmp_path / "old", OLD_LLAMA3))
    assert read_hf_config(_write(tmp_path, new)) == old_cfg


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mistral"])
def test_transformers_written_configs(tmp_path: Path, family: str) -> None:
    hf = make_hf_config(family, head_dim=80, tie=family == "qwen3")
    hf.save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)  # no "architectures" key: inferred from model_type
    assert cfg.family == family and cfg.head_dim == 80 and cfg.hidden_size == 128
    assert cfg.attention_bias == (family == "qwen2") and cfg.qk_norm == (family == "qwen3")
    assert cfg.tie_word_embeddings == (family == "qwen3") and cfg.rope_scaling is None
    assert cfg.sliding_window == (4096 if family == "mistral" else None)


def test_head_dim_defaults_and_eos_from_generation_config(tmp_path: Path) -> None:
    config = {**OLD_LLAMA3, "eos_token_id": 128001, "rope_scaling": None}
    config.pop("num_key_value_heads")
    cfg = read_hf_config(_write(tmp_path, config, {"eos_token_id": [128009, 128001]}))
    assert cfg.head_dim == 32 and cfg.num_kv_heads == 4 and cfg.rope_scaling is None
    assert cfg.eos_token_ids == (128001, 128009)


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    path = _write(tmp_path, {**OLD_LLAMA3, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel") as err:
        read_hf_config(path)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_type(tmp_path: Path, rope_type: str) -> None:
    path = _write(tmp_path, {**OLD_LLAMA3, "rope_scaling": {"type": rope_type, "factor": 2.0}})
    with pytest.raises(CheckpointError, match=f"unsupported rope type '{rope_type}'"):
        read_hf_config(path)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": "128"}, "hidden_size"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
        ({"head_dim": 33}, "head_dim"),
        ({"architectures": "LlamaForCausalLM"}, "architectures"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, change: dict, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle) as err:
        read_hf_config(_write(tmp_path, {**OLD_LLAMA3, **change}))
    assert "config.json" in str(err.value)


def test_missing_or_broken_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        read_hf_config(tmp_path)


def _saved(tmp_path: Path, family: str, **kwargs) -> Path:
    make_hf_config(family, **kwargs).save_pretrained(tmp_path)
    return tmp_path


def test_moe_configs_as_transformers_writes_them(tmp_path: Path) -> None:
    cfg = read_hf_config(_saved(tmp_path / "q", "qwen3_moe", num_experts=16, num_experts_per_tok=4))
    assert (cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size) == (16, 4, 128)
    assert cfg.qk_norm and not cfg.norm_topk_prob and cfg.shared_expert_intermediate_size == 0
    cfg = read_hf_config(_saved(tmp_path / "m", "mixtral", num_local_experts=8))
    assert cfg.num_experts == 8 and cfg.experts_per_token == 2 and cfg.norm_topk_prob
    cfg = read_hf_config(
        _saved(tmp_path / "s", "qwen2_moe", num_experts=8, shared_expert_intermediate_size=96)
    )
    assert cfg.shared_expert_intermediate_size == 96 and cfg.attention_bias


def test_gemma3_config_reads_layer_pattern_ropes_and_caps(tmp_path: Path) -> None:
    cfg = read_hf_config(
        _saved(tmp_path, "gemma3", num_layers=6, tie=True, final_logit_softcapping=30.0)
    )
    assert cfg.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert [cfg.sliding_layer(i) for i in range(6)] == [True] * 5 + [False]
    assert (cfg.rope_local_theta, cfg.rope_theta) == (10000.0, 1000000.0)
    assert cfg.final_logit_softcapping == 30.0 and cfg.tie_word_embeddings and cfg.qk_norm
    assert cfg.attention_scale == 256**-0.5
    assert model_config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_gemma3_multimodal_checkpoint_reads_its_text_config(tmp_path: Path) -> None:
    text = make_hf_config("gemma3", num_layers=2).to_dict()
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": text, "vision_config": {"hidden_size": 32}}  # fmt: skip
    cfg = read_hf_config(_write(tmp_path, config))
    assert cfg.architecture == "Gemma3ForConditionalGeneration" and cfg.num_layers == 2
    del config["text_config"]["num_hidden_layers"]
    with pytest.raises(CheckpointError, match=r"text_config\.num_hidden_layers"):
        read_hf_config(_write(tmp_path, config))


@pytest.mark.parametrize(
    "family, change, key",
    [
        ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
        ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ("gemma3", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ("gemma3", {"hidden_activation": "gelu"}, "hidden_activation"),
        ("gemma3", {"layer_types": ["full_attention"]}, "layer_types"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_fields_a_family_cannot_honour_are_refused_by_name(tmp_path, family, change, key):
    config = json.loads((_saved(tmp_path, family) / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"config.json: {key}: "):
        read_hf_config(_write(tmp_path, config | change))
