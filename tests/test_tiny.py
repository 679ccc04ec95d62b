"""The embedded tiny Llama: reproducible bytes, and a checkpoint transformers loads as is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from aotlm.tiny import SPECIAL_TOKENS, main, make_tiny_checkpoint

FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(ckpt)


def test_writes_a_checkpoint_directory(ckpt: Path) -> None:
    assert {p.name for p in ckpt.iterdir()} == FILES


def test_same_seed_same_bytes_other_seed_other_weights(ckpt: Path, tmp_path: Path) -> None:
    again = make_tiny_checkpoint(tmp_path / "again")
    for name in FILES:
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main([str(tmp_path / "cli"), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert {p.name for p in (tmp_path / "cli").iterdir()} == FILES


def test_config_and_weight_shapes(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == len(tok["model"]["vocab"]) == 1000
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)
    h, inter, v, d = 256, 512, cfg["vocab_size"], 64
    expected = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    expected["lm_head.weight"] = (v, h)
    for i in range(2):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.self_attn.q_proj.weight": (4 * d, h),
            f"{p}.self_attn.k_proj.weight": (2 * d, h),
            f"{p}.self_attn.v_proj.weight": (2 * d, h),
            f"{p}.self_attn.o_proj.weight": (h, 4 * d),
            f"{p}.mlp.gate_proj.weight": (inter, h),
            f"{p}.mlp.up_proj.weight": (inter, h),
            f"{p}.mlp.down_proj.weight": (h, inter),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    weights = load_file(ckpt / "model.safetensors")
    assert {k: w.shape for k, w in weights.items()} == expected
    assert all(w.dtype == np.float32 for w in weights.values())
    assert np.all(weights["model.norm.weight"] == 1.0)
    assert 0.05 <= weights["model.embed_tokens.weight"].std() <= 0.1


def test_transformers_loads_the_model(ckpt: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.head_dim == 64
    with torch.no_grad():
        logits = model(torch.tensor([[0, 50, 60, 70]])).logits
    assert logits.shape == (1, 4, 1000)
    assert torch.isfinite(logits).all()
    # Random weights, but not degenerate: different prefixes give different greedy tokens.
    assert len(set(logits[0].argmax(-1).tolist())) > 1


@pytest.mark.parametrize(
    "text", ["Hello, world!", "  leading spaces\tand tabs\n", "naïve café 日本語 🙂", "<|user|> x"]
)
def test_tokenizer_round_trips(hf_tokenizer, text: str) -> None:
    ids = hf_tokenizer(text)["input_ids"]
    assert ids[0] == hf_tokenizer.bos_token_id
    assert hf_tokenizer.decode(ids[1:]) == text


def test_tokenizer_special_tokens(hf_tokenizer) -> None:
    assert len(hf_tokenizer) == 1000
    assert hf_tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(6))
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token, hf_tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )


def test_chat_template_renders(hf_tokenizer, ckpt: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a mapping
    assert ids[0] == hf_tokenizer.bos_token_id and ids.count(hf_tokenizer.bos_token_id) == 1
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (ckpt / "chat_template.jinja").read_text()


@pytest.mark.parametrize("family", ["gemma3", "qwen3-moe", "mixtral"])
def test_other_families_load_in_transformers_and_match_ours(family: str, tmp_path: Path) -> None:
    import torch
    from test_models import PagedRunner
    from transformers import AutoModelForCausalLM

    ckpt = make_tiny_checkpoint(tmp_path / family, family=family)
    assert (
        make_tiny_checkpoint(tmp_path / "again", family=family)
        .joinpath("model.safetensors")
        .read_bytes()
        == (ckpt / "model.safetensors").read_bytes()
    )
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    prompt = [5, 17, 300, 42, 999, 7, 8]
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    ours = PagedRunner(ckpt).step([(0, 0, prompt)], 16)[0]
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert int(np.argmax(ours)) == int(np.argmax(theirs))
