"""Tensor parallelism: model.yaml `mesh: {tp: N}`, aotlm/models/sharding.py, runtime/load/placement.py.

The multi-device part runs in a subprocess that sees 8 fake CPU devices (XLA_FLAGS must be set
before jax starts; this process has one): tests/sharding_driver.py builds the same random
checkpoint for 1, 4 and 8 devices and serves each. 8 query heads and 4 KV heads, so tp=4 splits
the KV heads (attention under shard_map) and tp=8 replicates them (XLA-partitioned reference).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import sharding_driver
import yaml
from bundle_factory import write_model_yaml
from hf_factory import make_hf_checkpoint
from jax.sharding import PartitionSpec as P

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle import read_manifest
from aotlm.errors import BundleError, ConfigError
from aotlm.models import ModelConfig, abstract_params
from aotlm.models.llama import param_specs
from aotlm.models.sharding import TP
from aotlm.runtime.load.loader import load_bundle

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPT_LENGTHS = (5, 20, 40)  # the 40-token prompt is prefilled in two chunks of 32
COLLECTIVE = r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\("


@pytest.fixture(scope="module")
def tp_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    ckpt = make_hf_checkpoint(
        tmp_path_factory.mktemp("tp") / "ckpt",
        vocab_size=1000,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
    )
    for name in TOKENIZER:
        shutil.copy(tiny_checkpoint / name, ckpt / name)
    return ckpt


@pytest.fixture(scope="module")
def runs(tp_checkpoint, tmp_path_factory) -> dict:
    """(tp, tier) -> the driver's report for that bundle."""
    out = tmp_path_factory.mktemp("tp-bundles")
    rng = np.random.default_rng(7)
    spec = {
        "checkpoint": str(tp_checkpoint),
        "tps": [1, 4, 8],
        "prompts": [rng.integers(6, 1000, size=n).tolist() for n in PROMPT_LENGTHS],
        "max_tokens": 16,
        "stablehlo_tp": 4,
    }
    return {(tp, tier): r for (tp, _, tier), r in sharding_driver.run(spec, out).items()}


@pytest.mark.parametrize("tp", [4, 8])
def test_sharded_bundle_gives_the_one_device_greedy_tokens(runs, tp):
    one, sharded = runs[(1, "compiled")], runs[(tp, "compiled")]
    assert sharded["mesh_devices"] == tp
    assert sharded["tokens"] == one["tokens"]
    assert sharded["decode_calls"] > 0 and one["decode_calls"] > 0  # multi-step decode ran too
    for ours, ref in zip(sharded["logits"], one["logits"], strict=True):
        ours, ref = np.array(ours), np.array(ref)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert sharded["compiles_after_ready"] == 0


def test_stablehlo_tier_compiles_the_sharded_exports_at_startup(runs):
    stablehlo = runs[(4, "stablehlo")]
    assert stablehlo["tier_reason"] == "trust policy allow_pickle=never"
    assert stablehlo["mesh_devices"] == 4
    assert stablehlo["tokens"] == runs[(1, "compiled")]["tokens"]
    assert stablehlo["compiles_after_ready"] == 0


def test_megatron_layout_two_all_reduces_per_layer(runs):
    """wq [L, H, NH*D] split by columns; KV pages split over KV heads when tp divides them
    (4 heads / 4 devices) and replicated when not (4 heads on 8 devices); the forward graph
    communicates only the two all-reduces of each layer (after wo and after w_down)."""
    assert runs[(1, "compiled")]["weight_shards"] == [[2, 128, 512]]
    assert runs[(4, "compiled")]["weight_shards"] == [[2, 128, 128]]
    assert runs[(8, "compiled")]["weight_shards"] == [[2, 128, 64]]
    assert runs[(4, "compiled")]["kv_shards"] == [[2, 17, 16, 1, 64]]
    assert runs[(8, "compiled")]["kv_shards"] == [[2, 17, 16, 4, 64]]
    for tp in (4, 8):
        assert runs[(tp, "compiled")]["collectives"] == {"all-reduce": 2}
    assert runs[(1, "compiled")]["collectives"] == {}


def test_manifest_and_fingerprint_record_the_mesh(runs):
    one, four = runs[(1, "compiled")], runs[(4, "compiled")]
    assert one["serving_mesh"] is None and one["fingerprint_mesh"] is None
    assert one["nr_devices"] == [1]
    assert four["serving_mesh"] == {"tp": 4} and four["fingerprint_mesh"] == {"tp": 4}
    assert four["nr_devices"] == [4]  # every graph runs on the mesh (inputs replicated)
    assert four["build_tier"] == "compiled" and four["tier"] == "compiled"


def test_memory_plan_counts_one_devices_shards(runs):
    one = runs[(1, "compiled")]["memory_plan"]
    four = runs[(4, "compiled")]["memory_plan"]
    assert four["kv_pool_bytes"] * 4 == one["kv_pool_bytes"]
    # embed and lm_head [1000, 128], final_norm [128], attn/mlp norms [2, 128] are replicated
    replicated = 4 * (2 * 1000 * 128 + 128 + 2 * 2 * 128)
    assert four["weights_bytes"] == replicated + (one["weights_bytes"] - replicated) // 4


def test_tp_bundle_builds_on_one_device_and_is_refused_there(tp_checkpoint, tmp_path):
    """Exports are traced against an abstract mesh, so a one-device machine builds the
    StableHLO tier; the compiled tier, and serving, need the devices."""
    spec = write_model_yaml(
        tmp_path / "spec", tp_checkpoint, mesh={"tp": 4}, max_seq_len=64,
        buckets={"tokens": [32], "requests": [4], "page_size": 16},
    )  # fmt: skip
    result = build_bundle(load_build_config(spec), tmp_path / "bundle")
    cpu = result.targets["cpu"]
    assert cpu["tier"] == "stablehlo"
    assert "mesh of 4 devices needs 4 cpu devices and this build process has 1" in cpu["reason"]
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in cpu["reason"]
    assert len(jax.devices()) == 1
    with pytest.raises(BundleError, match=r"mesh of 4 devices .* this process sees 1 cpu device"):
        load_bundle(tmp_path / "bundle")


def test_mesh_that_does_not_divide_the_model_fails_the_build(tp_checkpoint, tmp_path):
    spec = write_model_yaml(tmp_path, tp_checkpoint, mesh={"tp": 3})
    with pytest.raises(
        ConfigError, match=r"model.yaml: mesh.tp: tp=3 must divide .*num_heads \(8\)"
    ):
        build_bundle(load_build_config(spec), tmp_path / "bundle")


@pytest.mark.parametrize(
    ("mesh", "message"),
    [
        ({"tp": 0}, "mesh.tp: must be positive"),
        ({"tp": True}, "mesh.tp: expected an integer"),
        ({"dp": 2}, "mesh.dp: unknown key"),
        (4, "mesh: expected a mapping"),
        ({}, "mesh.tp: required key is missing"),
    ],
)
def test_mesh_key_errors_name_the_path(tiny_checkpoint, tmp_path, mesh, message):
    spec = write_model_yaml(tmp_path, tiny_checkpoint, mesh=mesh)
    with pytest.raises(ConfigError, match=message):
        load_build_config(spec)


def test_mesh_of_one_is_one_device(tiny_checkpoint, tmp_path):
    assert load_build_config(write_model_yaml(tmp_path, tiny_checkpoint, mesh={"tp": 1})).tp == 1
    assert load_build_config(write_model_yaml(tmp_path, tiny_checkpoint)).tp == 1


def test_encoder_with_mesh_is_refused(tmp_path):
    ckpt = tmp_path / "bert"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    spec = tmp_path / "model.yaml"
    spec.write_text(
        yaml.safe_dump(
            {"model": str(ckpt), "dtype": "float32", "max_seq_len": 16, "mesh": {"tp": 2},
             "buckets": {"tokens": [16], "requests": [1]}}
        )
    )  # fmt: skip
    with pytest.raises(ConfigError, match="mesh: the checkpoint is an encoder"):
        load_build_config(spec)


def _config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=8,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None,
        tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        max_position_embeddings=64, architecture="LlamaForCausalLM", torch_dtype="float32",
        bos_token_id=None, eos_token_ids=(),
    )  # fmt: skip
    return ModelConfig(**(base | overrides))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True}, {"qk_norm": True, "tie_word_embeddings": True}],
)
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_param_specs_match_abstract_params_and_divide(overrides, tp):
    cfg = _config(**overrides)
    params = abstract_params(cfg, "float32")
    specs = param_specs(cfg, tp)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    replicated = jax.tree.map(lambda _: P(), params)
    assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(
        replicated, is_leaf=is_spec
    )
    for aval, spec in zip(
        jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=is_spec), strict=True
    ):
        assert len(spec) <= aval.ndim
        assert all(
            axis is None or size % tp == 0 for size, axis in zip(aval.shape, spec, strict=False)
        )
    layers = specs["layers"]
    assert (TP in layers["wk"]) == (cfg.num_kv_heads % tp == 0)  # else K/V replicated
    assert TP in layers["wq"] and TP in layers["w_gate"] and TP in layers["w_down"]
    assert specs["embed"] == P()


def _libtpu_missing() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(_libtpu_missing(), reason="needs libtpu (the `tpu` extra) to compile for TPU")
def test_tpu_target_compiles_sharded_with_the_pallas_kernel_per_device(tp_checkpoint, tmp_path):
    """Deviceless v5e:2x2 (4 chips): attention runs under shard_map, so XLA never has to
    partition the Pallas custom call; each layer still communicates two all-reduces only. The
    compiled tier holds decode[R] too (the kernel inside the multi-step loop)."""
    from jax import export
    from jax.experimental import topologies

    from aotlm.bundle.executables import compile_exported

    buckets = {"tokens": [32], "requests": [4], "page_size": 16}
    results = {}
    for tp in (4, 8):
        spec = write_model_yaml(
            tmp_path / f"spec{tp}", tp_checkpoint, mesh={"tp": tp}, max_seq_len=64,
            buckets=buckets, targets=["tpu:v5e:2x2"], dtype="bfloat16", decode_steps=2,
        )  # fmt: skip
        results[tp] = build_bundle(load_build_config(spec), tmp_path / f"tp{tp}")
    four = results[4].targets["tpu:v5e:2x2"]
    assert four["tier"] == "compiled", four["reason"]
    compiled = read_manifest(tmp_path / "tp4")[0].compiled["tpu:v5e:2x2"].executables
    assert any(e.name == "decode" for e in compiled)
    assert "mesh of 4 devices" in four["reason"]
    eight = results[8].targets["tpu:v5e:2x2"]
    assert eight["tier"] == "stablehlo"
    assert "mesh of 8 devices needs 8 tpu devices and topology v5e:2x2 has 4" in eight["reason"]

    exp = export.deserialize(bytearray((tmp_path / "tp4/exported/forward_t32.jaxexp").read_bytes()))
    devices = topologies.get_topology_desc("v5e:2x2", "tpu").devices
    hlo = compile_exported(exp, (1, 2), devices).as_text()
    assert 'custom_call_target="tpu_custom_call"' in hlo
    assert re.findall(COLLECTIVE, hlo) == ["all-reduce", "all-reduce"]
