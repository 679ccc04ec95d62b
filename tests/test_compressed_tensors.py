"""Pre-quantized checkpoints made by the real compressed-tensors library (the format
llm-compressor writes and vLLM loads) build into bundles that compute exactly their weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from bundle_factory import build_from_yaml, bundle_last_logits, write_model_yaml
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationConfig,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from hf_factory import make_hf_checkpoint

from aotlm.bundle import open_bundle
from aotlm.errors import CheckpointError, ConfigError
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.safetensors_io import read_safetensors, serialize_safetensors

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
# preset -> (compressed-tensors format, aotlm scheme): W8A8 is int8 per channel with dynamic
# int8 activations, FP8 e4m3 per tensor with static activation scales (both run w8a16 here).
PRESETS = {"W8A8": ("int-quantized", "int8"), "FP8": ("float-quantized", "fp8")}


def _calibrate(model) -> None:
    """What llm-compressor's observers do for weights: min/max scales per the scheme."""
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        args = module.quantization_scheme.weights
        w = module.weight.data
        if str(getattr(args.strategy, "value", args.strategy)) == "channel":
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            lo, hi = w.amin(), w.amax()
        scale, _ = calculate_qparams(lo, hi, args)
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(
            module.weight_scale.dtype
        )
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.05)


def make_compressed(base, out, preset: str, fmt: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"]
    )
    apply_quantization_config(model, config)
    _calibrate(model)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for name in TOKENIZER:
        shutil.copy(base / name, out / name)
    return out


def load_file(path):  # aotlm's reader: safetensors.numpy has no float8
    return dict(read_safetensors(path))


def save_file(tensors, path, metadata=None):
    path.write_bytes(serialize_safetensors(tensors))


def _dequantized_checkpoint(src, out):
    """The same model in float32: every int8 / e4m3 weight times its scale."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    plain = {}
    for name, t in tensors.items():
        if name.endswith(("_scale", "input_scale")):
            continue
        if t.dtype not in (np.float32,):
            scale = tensors[name + "_scale"].astype(np.float32).reshape(-1, 1)
            t = (t.astype(np.float32) * scale).astype(np.float32)
        plain[name] = t
    save_file(plain, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    ckpt = make_hf_checkpoint(tmp_path_factory.mktemp("ct") / "base", vocab_size=1000)
    for name in TOKENIZER:
        shutil.copy(tiny_checkpoint / name, ckpt / name)
    return ckpt


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_compressed_tensors_checkpoint_builds_and_computes_its_weights(base, tmp_path, preset):
    fmt, scheme = PRESETS[preset]
    ckpt = make_compressed(base, tmp_path / "ckpt", preset, fmt)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"]["format"] == fmt
    result = build_from_yaml(write_model_yaml(tmp_path / "q", ckpt), tmp_path / "bundle")
    manifest = open_bundle(result.out_dir).manifest
    storage = "int8" if scheme == "int8" else "float8_e4m3fn"
    assert manifest.weights["attention"]["dtypes"] == [storage]
    q = manifest.quantization
    assert q["weights"] == scheme and q["source"] == "checkpoint"
    assert q["format"] == f"compressed-tensors {fmt}" and "quality" not in q
    assert "activations_not_applied" in q  # W8A8 / FP8 activations: run in the serving dtype
    twin = build_from_yaml(
        write_model_yaml(tmp_path / "d", _dequantized_checkpoint(ckpt, tmp_path / "deq")),
        tmp_path / "twin",
    )
    engines = [Engine.from_bundle(b.out_dir, strict=True) for b in (result, twin)]
    rng = np.random.default_rng(0)
    for n in (5, 40):
        prompt = rng.integers(6, 1000, size=n).tolist()
        ours, deq = (bundle_last_logits(e, prompt) for e in engines)
        np.testing.assert_allclose(ours, deq, rtol=0, atol=1e-4 * np.abs(deq).max())
    assert engines[0].compiles_after_ready == 0


@pytest.fixture(scope="module")
def int8_checkpoint(base, tmp_path_factory):
    return make_compressed(base, tmp_path_factory.mktemp("w8a8") / "ckpt", "W8A8", "int-quantized")


def _edit(src, out, *, config=None, tensors=None):
    shutil.copytree(src, out)
    if config is not None:
        doc = json.loads((out / "config.json").read_text())
        config(doc["quantization_config"])
        (out / "config.json").write_text(json.dumps(doc))
    if tensors is not None:
        t = load_file(src / "model.safetensors")
        tensors(t)
        save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    return out


SCALE = "model.layers.1.mlp.down_proj.weight_scale"


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            dict(tensors=lambda t: t.pop(SCALE)),
            CheckpointError,
            rf"missing tensor '{SCALE}' \(the scales of 'model\.layers\.1\.mlp\.down_proj\.weight'\)",
        ),
        (
            dict(tensors=lambda t: t.__setitem__(SCALE, t[SCALE][:7])),
            CheckpointError,
            rf"tensor '{SCALE}' has shape \(7, 1\), want \(128, 1\) or \(128,\)",
        ),
        (
            dict(config=lambda q: q.__setitem__("format", "pack-quantized")),
            CheckpointError,
            r"quantization_config\.format: 'pack-quantized' is not supported",
        ),
        (
            dict(config=lambda q: q.__setitem__("quant_method", "awq")),
            CheckpointError,
            r"quantization_config\.quant_method: 'awq' is not supported",
        ),
        (
            dict(config=lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4)),
            CheckpointError,
            r"config_groups\.group_0\.weights\.num_bits: 4 is not 8",
        ),
        (
            dict(
                config=lambda q: q["config_groups"]["group_0"]["weights"].update(
                    strategy="group", group_size=128
                )
            ),
            CheckpointError,
            r"weights\.strategy: 'group' is not supported",
        ),
    ],
)
def test_a_bad_pre_quantized_checkpoint_is_refused_naming_it(
    int8_checkpoint, tmp_path, edit, error, match
):
    ckpt = _edit(int8_checkpoint, tmp_path / "ckpt", **edit)
    with pytest.raises(error, match=match):
        build_from_yaml(write_model_yaml(tmp_path / "spec", ckpt), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_yaml_cannot_requantize_or_gate_a_pre_quantized_checkpoint(int8_checkpoint, tmp_path):
    from aotlm.build.model_yaml import load_build_config

    with pytest.raises(
        ConfigError, match=r"quantization\.weights: the checkpoint is pre-quantized"
    ):
        load_build_config(
            write_model_yaml(tmp_path / "a", int8_checkpoint, quantization={"weights": "fp8"})
        )
    with pytest.raises(ConfigError, match=r"quality: the checkpoint is pre-quantized"):
        load_build_config(
            write_model_yaml(
                tmp_path / "b",
                int8_checkpoint,
                quantization={"weights": "int8"},
                quality={"max_kl": 1.0},
            )
        )


def test_a_pre_quantized_checkpoint_takes_the_fp8_kv_cache_gated_alone(int8_checkpoint, tmp_path):
    """`kv_cache_dtype: fp8` on a compressed-tensors checkpoint: its weights read as stored, the
    cache calibrated on them, and the quality gate measuring the fp8 cache alone (against the
    same weights over a cache in the serving dtype) — a gate below it fails the build."""
    spec = write_model_yaml(
        tmp_path / "q", int8_checkpoint, quantization={"kv_cache_dtype": "fp8"},
        quality={"max_tokens": 64},
    )  # fmt: skip
    result = build_from_yaml(spec, tmp_path / "bundle")
    q = open_bundle(result.out_dir).manifest.quantization
    assert q["source"] == "checkpoint" and q["weights"] == "int8" and q["kv_cache_dtype"] == "fp8"
    assert q["quality"]["mean_kl"] > 0 and q["quality"]["tokens"] == 64
    engine = Engine.from_bundle(result.out_dir, strict=True)
    assert engine.runner.k_pages.dtype == np.uint8
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0][0].token_ids) == 4 and engine.compiles_after_ready == 0
    spec = write_model_yaml(
        tmp_path / "gated", int8_checkpoint, quantization={"kv_cache_dtype": "fp8"},
        quality={"max_tokens": 64, "max_kl": q["quality"]["mean_kl"] / 2},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"quality\.max_kl"):
        build_from_yaml(spec, tmp_path / "gated-out")
