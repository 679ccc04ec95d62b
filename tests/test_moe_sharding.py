"""Expert and tensor parallelism for the new families on 8 fake CPU devices (in a subprocess,
tests/sharding_driver.py): an MoE model on meshes tp x ep = 2x4, 1x8 and 8x1, and Gemma 3 on
tp=4, each giving the one-device bundle's logits and greedy tokens with 0 compiles after ready.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import sharding_driver
from hf_factory import make_hf_checkpoint

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
PROMPT_LENGTHS = (5, 20, 40)  # 40 tokens: two chunks of 32, past Gemma's 16-token window
MOE_MESHES = [(1, 1), (2, 4), (1, 8), (8, 1)]
GEMMA_MESHES = [(1, 1), (4, 1)]


def _runs(family, meshes, tiny_checkpoint, tmp_path_factory, quantization=None, **kwargs) -> dict:
    root = tmp_path_factory.mktemp(family)
    ckpt = make_hf_checkpoint(
        root / "ckpt", family, vocab_size=1000, num_heads=8, num_kv_heads=4, **kwargs
    )
    for name in TOKENIZER:
        shutil.copy(tiny_checkpoint / name, ckpt / name)
    rng = np.random.default_rng(11)
    spec = {
        "checkpoint": str(ckpt),
        "meshes": [list(m) for m in meshes],
        "prompts": [rng.integers(6, 1000, size=n).tolist() for n in PROMPT_LENGTHS],
        "max_tokens": 12,
        "quantization": quantization,
    }
    return sharding_driver.run(spec, root)


@pytest.fixture(scope="module")
def moe_runs(tiny_checkpoint, tmp_path_factory) -> dict:
    return _runs(
        "qwen3_moe", MOE_MESHES, tiny_checkpoint, tmp_path_factory,
        head_dim=32, num_experts=8, num_experts_per_tok=2, intermediate_size=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def quantized_moe_runs(tiny_checkpoint, tmp_path_factory) -> dict:
    """int8 weights and the fp8 KV cache on a 2 x 4 mesh: the scales split with their weights'
    output channels, the uint8 pages over the KV heads, the cache's scales replicated."""
    return _runs(
        "qwen3_moe", [(1, 1), (2, 4)], tiny_checkpoint, tmp_path_factory,
        quantization={"weights": "int8", "kv_cache_dtype": "fp8"},
        head_dim=32, num_experts=8, num_experts_per_tok=2, intermediate_size=64,
    )  # fmt: skip


@pytest.fixture(scope="module")
def gemma_runs(tiny_checkpoint, tmp_path_factory) -> dict:
    return _runs(
        "gemma3", GEMMA_MESHES, tiny_checkpoint, tmp_path_factory,
        head_dim=32, num_layers=3, sliding_window=16, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )  # fmt: skip


def _same_as_one_device(runs: dict, mesh: tuple[int, int]) -> None:
    one, sharded = runs[(1, 1, "compiled")], runs[(*mesh, "compiled")]
    assert sharded["mesh_devices"] == mesh[0] * mesh[1]
    assert sharded["tokens"] == one["tokens"]
    for ours, ref in zip(sharded["logits"], one["logits"], strict=True):
        ours, ref = np.array(ours), np.array(ref)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    assert sharded["compiles_after_ready"] == 0 and sharded["decode_calls"] > 0


@pytest.mark.parametrize("mesh", MOE_MESHES[1:])
def test_expert_parallel_bundles_give_the_one_device_tokens(moe_runs, mesh):
    _same_as_one_device(moe_runs, mesh)


def test_experts_are_split_over_ep_and_intermediate_over_tp(moe_runs):
    """we_up [L, E, H, I] = [2, 8, 128, 64]: ep splits E, tp splits I; one all-reduce for
    attention's wo (over tp) and one for the experts (over the whole mesh) per layer."""
    assert moe_runs[(1, 1, "compiled")]["expert_shards"] == [[2, 8, 128, 64]]
    assert moe_runs[(2, 4, "compiled")]["expert_shards"] == [[2, 2, 128, 32]]
    assert moe_runs[(1, 8, "compiled")]["expert_shards"] == [[2, 1, 128, 64]]
    assert moe_runs[(8, 1, "compiled")]["expert_shards"] == [[2, 8, 128, 8]]
    two_four = moe_runs[(2, 4, "compiled")]
    assert two_four["serving_mesh"] == {"tp": 2, "ep": 4}
    assert two_four["fingerprint_mesh"] == {"tp": 2, "ep": 4}
    assert two_four["nr_devices"] == [8]
    assert set(two_four["collectives"]) == {"all-reduce"}
    assert moe_runs[(1, 1, "compiled")]["collectives"] == {}


def test_memory_plan_counts_the_experts_each_device_holds(moe_runs):
    one = moe_runs[(1, 1, "compiled")]["memory_plan"]["weights_bytes"]
    ep8 = moe_runs[(1, 8, "compiled")]["memory_plan"]["weights_bytes"]
    experts = 3 * 2 * 8 * 128 * 64 * 4  # gate, up, down x layers x experts, float32
    assert ep8 == one - experts + experts // 8


def test_quantized_experts_on_a_mesh_give_the_one_device_tokens(quantized_moe_runs):
    _same_as_one_device(quantized_moe_runs, (2, 4))
    assert quantized_moe_runs[(2, 4, "compiled")]["expert_shards"] == [[2, 2, 128, 32]]


@pytest.mark.parametrize("mesh", GEMMA_MESHES[1:])
def test_tensor_parallel_gemma3_gives_the_one_device_tokens(gemma_runs, mesh):
    _same_as_one_device(gemma_runs, mesh)
