"""model.yaml -> bundle -> sealed engine, checked against transformers on the same checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from bundle_factory import build_from_yaml, bundle_last_logits, write_model_yaml
from click.testing import CliRunner
from hf_factory import load_hf_model, make_hf_checkpoint

from aotlm.cli import main
from aotlm.errors import RequestError
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams

TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CASES = {
    "llama-d64-gqa2": dict(family="llama", head_dim=64, num_heads=4, num_kv_heads=2),
    "llama-d128-gqa4-tied": dict(
        family="llama", head_dim=128, num_heads=4, num_kv_heads=1, tie=True
    ),
    "qwen3-d80-mha-tied": dict(family="qwen3", head_dim=80, num_heads=2, num_kv_heads=2, tie=True),
    "qwen3-d96-gqa2": dict(family="qwen3", head_dim=96, num_heads=4, num_kv_heads=2),
    "qwen3moe-e16-k4": dict(family="qwen3_moe", num_experts=16, num_experts_per_tok=4),
    "mixtral-e8-k2": dict(family="mixtral", num_local_experts=8, num_experts_per_tok=2),
    # The 100-token prompt crosses the 32-token window of the local layers, in two chunks.
    "gemma3-d256-window32": dict(
        family="gemma3",
        head_dim=256,
        num_heads=2,
        num_kv_heads=1,
        tie=True,
        num_layers=3,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        final_logit_softcapping=30.0,
    ),
}
# Token buckets are 16/32/64: these land in each of them, and 100 is prefilled in two chunks.
PROMPT_LENGTHS = (5, 27, 50, 100)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_checkpoint, tmp_path_factory):
    """(hf model, sealed engine, prompts) for one random checkpoint."""
    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_hf_checkpoint(root / "ckpt", vocab_size=1000, **CASES[request.param])
    for name in TOKENIZER:
        shutil.copy(tiny_checkpoint / name, ckpt / name)
    build_from_yaml(write_model_yaml(root / "spec", ckpt), root / "bundle")
    engine = Engine.from_bundle(root / "bundle", strict=True)
    rng = np.random.default_rng(len(request.param))
    prompts = [rng.integers(6, 1000, size=n).tolist() for n in PROMPT_LENGTHS]
    return load_hf_model(ckpt), engine, prompts


def test_last_position_logits_match_transformers(case):
    hf, engine, prompts = case
    for prompt in prompts:
        ours = bundle_last_logits(engine, prompt)
        with torch.no_grad():
            theirs = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 1e-4 * scale, f"prompt of {len(prompt)} tokens"
    assert engine.compiles_after_ready == 0


def test_24_greedy_tokens_equal_transformers_generate(case):
    hf, engine, prompts = case
    hf.generation_config.eos_token_id = None
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = engine.generate(prompts, params)  # all prompts at once: continuous batching
    for prompt, (ours,) in zip(prompts, results, strict=True):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0
            )
        assert list(ours.token_ids) == out[0, len(prompt) :].tolist(), f"prompt of {len(prompt)}"
    assert engine.compiles_after_ready == 0


@pytest.fixture(scope="module")
def tiny_engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle[0], strict=True)


def test_every_bucket_runs_with_zero_compiles_after_ready(tiny_engine):
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, max_tokens=6)
    for batch in (1, 2, 3, 4, 6):
        lengths = rng.integers(1, 120, size=batch)
        prompts = [rng.integers(6, 1000, size=int(n)).tolist() for n in lengths]
        for (c,) in tiny_engine.generate(prompts, params):
            assert len(c.token_ids) == 6
    used = set(tiny_engine.runner.bucket_calls)
    built = set(tiny_engine.loaded.executables)
    assert {k for k in built if k[0] == "forward"} <= used, "every token bucket was exercised"
    assert {k for k in built if k[0] == "sample"} <= used, "every request bucket was exercised"
    assert tiny_engine.compiles_after_ready == 0
    assert tiny_engine.block_manager.num_used_pages == 0


def test_seeded_sampling_is_reproducible_and_greedy_is_batch_independent(tiny_engine):
    prompt = "The compiler reads the program"
    sampled = SamplingParams(temperature=1.0, seed=42, max_tokens=12)
    alone = tiny_engine.generate([prompt], sampled)[0][0].token_ids
    crowd = tiny_engine.generate([prompt, "Rain", "A long walk home " * 5], sampled)[0][0].token_ids
    assert alone == crowd
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    assert (
        tiny_engine.generate([prompt], greedy)[0][0].token_ids
        == tiny_engine.generate(["x y z", prompt], greedy)[1][0].token_ids
    )


def test_too_long_prompt_is_a_clear_error_not_a_compile(tiny_engine):
    with pytest.raises(
        RequestError, match=r"prompt is 200 tokens; this bundle's max_seq_len is 128"
    ):
        tiny_engine.add_request(list(range(6, 206)), SamplingParams(max_tokens=4))
    assert tiny_engine.compiles_after_ready == 0


def test_tiny_checkpoint_greedy_matches_transformers(tiny_checkpoint, tiny_engine):
    hf = load_hf_model(tiny_checkpoint)
    hf.generation_config.eos_token_id = None
    prompt = tiny_engine.tokenizer.encode("The weather today")
    ours = tiny_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0][0]
    with torch.no_grad():
        # The checkpoint's own pad id (2): passing 0 would make transformers mask the BOS.
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    assert list(ours.token_ids) == out[0, len(prompt) :].tolist()


def test_cli_build_inspect_generate_json(tiny_yaml, tmp_path):
    cli = CliRunner()
    out = tmp_path / "b"
    built = cli.invoke(main, ["build", str(tiny_yaml), "-o", str(out), "--json"])
    assert built.exit_code == 0, built.output
    summary = json.loads(built.output)
    inspected = json.loads(cli.invoke(main, ["inspect", str(out), "--json"]).output)
    assert inspected["digest"] == summary["digest"]
    assert inspected["functions"] == {
        "forward": 3,
        "logits": 9,
        "sample": 3,
        "sample_penalized": 3,
        "sample_masked": 3,
        "decode": 3,  # the shared tiny model.yaml has decode_steps: 4
    }
    gen = cli.invoke(
        main, ["generate", str(out), "--prompt", "Hello there", "--max-tokens", "5", "--json"]
    )
    assert gen.exit_code == 0, gen.output
    result = json.loads(gen.output.strip().splitlines()[-1])
    assert set(result) == {"text", "token_ids", "compiles_after_ready"}
    assert len(result["token_ids"]) == 5 and result["compiles_after_ready"] == 0
    too_long = cli.invoke(main, ["generate", str(out), "--prompt", "word " * 400, "--json"])
    assert too_long.exit_code != 0 and "max_seq_len is 128" in too_long.output
