"""The paged forward pass against transformers: same logits, same greedy tokens, any batch layout."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from hf_factory import load_hf_model, make_hf_checkpoint

from aotlm.errors import CheckpointError
from aotlm.kernels.attention_reference import paged_attention_ref
from aotlm.models import (
    abstract_params,
    final_logits,
    flatten_params,
    forward,
    lm_head,
    load_checkpoint,
    read_hf_config,
    unflatten_params,
)
from aotlm.safetensors_io import read_safetensors, write_safetensors

PAGE, PAGES_PER_SEQ = 8, 8  # 64 positions per request
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
GEMMA = dict(
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    num_layers=3,
    final_logit_softcapping=30.0,
    query_pre_attn_scalar=48,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
    },
)
CASES = {  # id -> (family, factory kwargs); covers head dims 64/80/96/128 and GQA ratios 1/2/4
    "llama-d64-gqa2": ("llama", {}),
    "llama-d128-gqa4-tied": ("llama", dict(head_dim=128, num_kv_heads=1, tie=True)),
    "llama3rope-d64-mha": (
        "llama",
        dict(num_kv_heads=4, rope_scaling={**LLAMA3, "original_max_position_embeddings": 16}),
    ),
    "qwen3-d80-tied": ("qwen3", dict(head_dim=80, tie=True)),
    "qwen2-d96-mha": ("qwen2", dict(head_dim=96, num_kv_heads=4)),
    "mistral-d128-gqa4": ("mistral", dict(head_dim=128, num_heads=8, num_kv_heads=2)),
    "llama-sharded": ("llama", dict(sharded=True, seed=1)),
    # Mixtures of experts: 8/16 experts, top-k 2/4/8, with and without a shared expert.
    "qwen3moe-e8-k2": ("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2)),
    "qwen3moe-e16-k4-norm": (
        "qwen3_moe",
        dict(head_dim=128, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
    ),
    "qwen2moe-e8-k8-shared": (
        "qwen2_moe",
        dict(num_experts=8, num_experts_per_tok=8, shared_expert_intermediate_size=96),
    ),
    "mixtral-e8-k2": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    # Gemma 3: windows shorter than the prompts, global layers with linear rope scaling.
    "gemma3-d256-softcap": ("gemma3", dict(head_dim=256, tie=True, **GEMMA)),
    "gemma3-d128-untied": ("gemma3", dict(head_dim=128, num_kv_heads=1, **GEMMA)),
}
_step = jax.jit(forward, static_argnums=0, donate_argnums=(2, 3))


class PagedRunner:
    """Drives ``forward`` like the serving runner: fixed token buckets, padding into page 0."""

    def __init__(self, ckpt: Path, dtype: str = "float32", num_requests: int = 1) -> None:
        self.cfg = read_hf_config(ckpt)
        self.params = jax.device_put(load_checkpoint(ckpt, self.cfg, dtype))
        self.head = np.asarray(lm_head(self.cfg, self.params), np.float32)
        shape = (self.cfg.num_layers, 1 + num_requests * PAGES_PER_SEQ, PAGE)
        shape += (self.cfg.num_kv_heads, self.cfg.head_dim)
        self.k, self.v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        pages = np.arange(1, 1 + num_requests * PAGES_PER_SEQ, dtype=np.int32)
        self.block_tables = pages.reshape(num_requests, PAGES_PER_SEQ)

    def step(self, chunks: list[tuple[int, int, list[int]]], bucket: int) -> np.ndarray:
        """chunks: (request, start position, token ids). Returns f32 logits of each chunk's last."""
        tokens, positions, slots, reqs = (np.zeros(bucket, np.int32) for _ in range(4))
        rows, t = [], 0
        for req, start, ids in chunks:
            for i, tok in enumerate(ids):
                pos = start + i
                tokens[t], positions[t], reqs[t] = tok, pos, req
                slots[t] = self.block_tables[req, pos // PAGE] * PAGE + pos % PAGE
                t += 1
            rows.append(t - 1)
        args = (tokens, positions, slots, reqs, self.block_tables)
        hidden, self.k, self.v = _step(self.cfg, self.params, self.k, self.v, *args)
        return np.asarray(final_logits(self.cfg, hidden[np.asarray(rows)], self.head))

    def greedy(self, prompt: list[int], n: int, prefill_bucket: int = 16) -> list[int]:
        out = [int(np.argmax(self.step([(0, 0, prompt)], prefill_bucket)[0]))]
        while len(out) < n:
            logits = self.step([(0, len(prompt) + len(out) - 1, [out[-1]])], 4)
            out.append(int(np.argmax(logits[0])))
        return out


@functools.cache
def _checkpoint(case: str, root: Path) -> Path:
    family, kwargs = CASES[case]
    return make_hf_checkpoint(root / case, family, **kwargs)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")


def _prompt(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 256, n).tolist()


def _assert_close(ours: np.ndarray, ref: np.ndarray, rel: float) -> None:
    err = float(np.max(np.abs(ours - ref)))
    assert err <= rel * float(np.max(np.abs(ref))), f"max abs diff {err}, ref max {ref.max()}"


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case: str, ckpt_root: Path) -> None:
    ckpt = _checkpoint(case, ckpt_root)
    hf = load_hf_model(ckpt)
    runner = PagedRunner(ckpt)
    for n in (1, 7, 13):
        prompt = _prompt(n, seed=n)
        runner.k, runner.v = jnp.zeros_like(runner.k), jnp.zeros_like(runner.v)
        ours = runner.step([(0, 0, prompt)], 16)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        _assert_close(ours, ref, 1e-4)

    prompt = _prompt(7, seed=42)
    runner.k, runner.v = jnp.zeros_like(runner.k), jnp.zeros_like(runner.v)
    ours_tokens = runner.greedy(prompt, 24)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    gen = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    hf_tokens = gen[0, len(prompt) :].tolist()
    # transformers stops early at an EOS token; up to there the sequences must be equal.
    assert ours_tokens[: len(hf_tokens)] == hf_tokens
    assert len(hf_tokens) == 24 or hf_tokens[-1] in runner.cfg.eos_token_ids


def test_ragged_batch_matches_each_request_alone(ckpt_root: Path) -> None:
    ckpt = _checkpoint("qwen3-d80-tied", ckpt_root)
    a, b = _prompt(5, seed=1), _prompt(11, seed=2)
    batch = PagedRunner(ckpt, num_requests=2)
    both = batch.step([(0, 0, a), (1, 0, b)], 16)
    both_next = batch.step([(0, 5, [7]), (1, 11, [9])], 4)
    for req, prompt, tok in ((0, a, 7), (1, b, 9)):
        alone = PagedRunner(ckpt)
        _assert_close(both[req], alone.step([(0, 0, prompt)], 16)[0], 1e-5)
        _assert_close(both_next[req], alone.step([(0, len(prompt), [tok])], 4)[0], 1e-5)


def test_chunked_prefill_matches_one_shot(ckpt_root: Path) -> None:
    ckpt = _checkpoint("llama-d64-gqa2", ckpt_root)
    prompt = _prompt(13, seed=3)
    one = PagedRunner(ckpt).step([(0, 0, prompt)], 16)[0]
    chunked = PagedRunner(ckpt)
    chunked.step([(0, 0, prompt[:8])], 16)
    _assert_close(chunked.step([(0, 8, prompt[8:])], 16)[0], one, 1e-5)


def test_bfloat16_serving_dtype(ckpt_root: Path) -> None:
    ckpt = _checkpoint("qwen2-d96-mha", ckpt_root)
    runner = PagedRunner(ckpt, dtype="bfloat16")
    assert runner.k.dtype == jnp.bfloat16
    prompt = _prompt(13, seed=4)
    ours = runner.step([(0, 0, prompt)], 16)[0]
    assert runner.k.dtype == jnp.bfloat16 and np.isfinite(ours).all()
    with torch.no_grad():
        ref = load_hf_model(ckpt)(torch.tensor([prompt])).logits[0, -1].numpy()
    _assert_close(ours, ref, 5e-2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["qwen2-d96-mha", "qwen3-d80-tied"])
def test_load_checkpoint_matches_abstract_params(case: str, dtype: str, ckpt_root: Path) -> None:
    ckpt = _checkpoint(case, ckpt_root)
    cfg = read_hf_config(ckpt)
    params = load_checkpoint(ckpt, cfg, dtype)
    avals = abstract_params(cfg, dtype)
    assert jax.tree.structure(params) == jax.tree.structure(avals)
    for p, a in zip(jax.tree.leaves(params), jax.tree.leaves(avals), strict=True):
        assert type(p) is np.ndarray and (p.shape, p.dtype) == (a.shape, a.dtype)
    flat = flatten_params(params)
    assert {"embed", "final_norm", "layers.wq", "layers.w_down"} <= set(flat)
    assert ("lm_head" in flat) != cfg.tie_word_embeddings
    assert jax.tree.structure(unflatten_params(flat)) == jax.tree.structure(params)
    hf = read_safetensors(ckpt / "model.safetensors")
    wq = hf["model.layers.1.self_attn.q_proj.weight"].T
    np.testing.assert_array_equal(params["layers"]["wq"][1], wq.astype(params["embed"].dtype))
    if dtype == "bfloat16":
        assert params["embed"].dtype == np.dtype(ml_dtypes.bfloat16)


def _edit(ckpt: Path, tmp: Path, edit) -> Path:
    """A copy of ckpt whose model.safetensors tensors dict went through ``edit``."""
    out = tmp / "edited"
    out.mkdir()
    (out / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    tensors = read_safetensors(ckpt / "model.safetensors")
    edit(tensors)
    write_safetensors(out / "model.safetensors", tensors)
    return out


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
        (lambda t: t.pop("lm_head.weight"), "lm_head.weight"),
        (
            lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((3, 128))}),
            "model.layers.0.self_attn.k_proj.weight",
        ),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((128, 128))}),
            "unexpected tensor 'model.layers.2.mlp.up_proj.weight'",
        ),
    ],
    ids=["missing", "untied-without-lm-head", "wrong-shape", "extra-layer"],
)
def test_bad_checkpoints_name_the_tensor(edit, needle: str, ckpt_root: Path, tmp_path: Path):
    bad = _edit(_checkpoint("llama-d64-gqa2", ckpt_root), tmp_path, edit)
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        load_checkpoint(bad, read_hf_config(bad), "float32")


def test_missing_weights_file(tmp_path: Path, ckpt_root: Path) -> None:
    ckpt = _checkpoint("llama-d64-gqa2", ckpt_root)
    (tmp_path / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path, read_hf_config(tmp_path), "float32")


def test_paged_attention_ref_matches_dense_attention() -> None:
    """Scattered pages and a ragged batch give the same result as plain causal attention."""
    rng = np.random.default_rng(0)
    heads, kv_heads, d, page, lens = 8, 2, 16, 4, (6, 11)
    group = heads // kv_heads
    num_pages = 1 + sum(-(-n // page) for n in lens)
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    tables = np.zeros((2, 3), np.int32)
    tables[0, :2], tables[1, :3] = perm[:2], perm[2:5]
    kp = rng.standard_normal((num_pages, page, kv_heads, d)).astype(np.float32)
    vp = rng.standard_normal((num_pages, page, kv_heads, d)).astype(np.float32)
    q = rng.standard_normal((sum(lens), heads, d)).astype(np.float32)
    reqs = np.repeat(np.arange(2, dtype=np.int32), lens)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
    out = np.asarray(paged_attention_ref(q, kp, vp, pos, reqs, tables, d**-0.5))
    for t in range(len(q)):
        r, p = reqs[t], pos[t]
        keys = kp[tables[r]].reshape(-1, kv_heads, d)[: p + 1]
        vals = vp[tables[r]].reshape(-1, kv_heads, d)[: p + 1]
        for h in range(heads):
            s = keys[:, h // group] @ q[t, h] * d**-0.5
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            np.testing.assert_allclose(out[t, h], w @ vals[:, h // group], rtol=1e-5, atol=1e-5)


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path: Path) -> None:
    """Gemma3ForConditionalGeneration: config from text_config, the language model's tensors
    under its prefix, the vision tower and projector left unread; text logits as transformers'."""
    import transformers

    text = transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2,
        sliding_window=4,
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=28, patch_size=14,
    )  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=299, boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(tmp_path)
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    runner = PagedRunner(tmp_path)
    assert runner.cfg.architecture == "Gemma3ForConditionalGeneration"
    prompt = _prompt(9, seed=9)
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
    _assert_close(runner.step([(0, 0, prompt)], 16)[0], ref, 1e-4)
