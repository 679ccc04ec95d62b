"""LoRA slots in the model (aotlm/models/lora.py, peft_adapter.py) against transformers + PEFT on
the same random-weight base: each adapter's logits and greedy tokens, a batch mixing base and two
adapters, rank padding and rsLoRA scaling, and adapters that do not fit refused by name."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_factory import load_hf_model, make_hf_checkpoint

from aotlm.errors import AdapterError
from aotlm.models import final_logits, lm_head
from aotlm.models.checkpoint import load_checkpoint
from aotlm.models.config import read_hf_config
from aotlm.models.llama import forward, layer_shapes
from aotlm.models.lora import TARGETS, LoraConfig, clear_slot, empty_lora, write_slot
from aotlm.models.peft_adapter import read_adapter

peft = pytest.importorskip("peft", reason="peft is in the test extras (scripts/venv.sh test)")

ALL = tuple(TARGETS)
PAGE, PAGES = 16, 4
LORA = LoraConfig(max_loras=3, max_rank=8, targets=ALL)


def make_adapter(base: Path, out: Path, *, rank: int, targets=ALL, seed: int, **extra) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False), saved to ``out``."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False,
        **extra,
    )  # fmt: skip
    model = peft.get_peft_model(load_hf_model(base), config)
    with torch.no_grad():  # PEFT's random B is as large as A: keep the update a perturbation
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    model.save_pretrained(out)
    return out


@functools.cache
def _peft_model(base: Path, adapter: Path):
    return peft.PeftModel.from_pretrained(load_hf_model(base), adapter).eval()


def peft_logits(base: Path, adapter: Path | None, prompt: list[int]) -> np.ndarray:
    model = load_hf_model(base) if adapter is None else _peft_model(base, adapter)
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("lora")
    base = make_hf_checkpoint(root / "base", "llama")
    adapters = {
        "a": make_adapter(base, root / "a", rank=4, seed=1),
        "b": make_adapter(base, root / "b", rank=8, targets=("q_proj", "v_proj"), seed=2),
        "rs": make_adapter(base, root / "rs", rank=2, seed=3, use_rslora=True),
    }
    return base, adapters


_step = jax.jit(forward, static_argnums=0, static_argnames="lora_rank", donate_argnums=(2, 3))


class Slots:
    """The model with LoRA slots, stepped like the serving runner (one page table per row)."""

    def __init__(self, base: Path, rows: int = 3) -> None:
        self.cfg = read_hf_config(base)
        self.shapes = layer_shapes(self.cfg)
        self.stacks = empty_lora(self.shapes, LORA, np.float32)
        self.params = load_checkpoint(base, self.cfg, "float32")
        self.head = np.asarray(lm_head(self.cfg, self.params), np.float32)
        shape = (self.cfg.num_layers, 1 + rows * PAGES, PAGE, self.cfg.num_kv_heads)
        self.shape = (*shape, self.cfg.head_dim)
        self.tables = np.arange(1, 1 + rows * PAGES, dtype=np.int32).reshape(rows, PAGES)

    def load(self, slot: int, adapter_dir: Path) -> None:
        write_slot(self.stacks, slot, read_adapter(adapter_dir, self.shapes, LORA).updates, LORA)

    def prefill(self, rows: list[tuple[list[int], int]]) -> list[np.ndarray]:
        """rows: (prompt, slot) each from position 0 on its own pages, in one step; logits per
        prompt position, per row."""
        tokens, positions, slots, reqs, adapters = [], [], [], [], []
        for r, (prompt, slot) in enumerate(rows):
            for pos, tok in enumerate(prompt):
                tokens.append(tok), positions.append(pos), reqs.append(r), adapters.append(slot)
                slots.append(self.tables[r, pos // PAGE] * PAGE + pos % PAGE)
        pad = 64 - len(tokens)
        arrays = [np.asarray(a + [0] * pad, np.int32) for a in (tokens, positions, slots, reqs)]
        params = {**self.params, "lora": self.stacks}
        zeros = np.zeros(self.shape, np.float32)
        hidden, _, _ = _step(
            self.cfg, params, zeros, zeros.copy(), *arrays, self.tables[: len(rows)],
            adapters=np.asarray(adapters + [0] * pad, np.int32), lora_rank=LORA.max_rank,
        )  # fmt: skip
        logits = np.asarray(final_logits(self.cfg, hidden, self.head))
        out, t = [], 0
        for prompt, _ in rows:
            out.append(logits[t : t + len(prompt)])
            t += len(prompt)
        return out


PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 11, 64, 8], [200, 3, 3, 9, 120, 45], [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("name", ["a", "b", "rs"])
def test_each_adapter_matches_peft(base_and_adapters, name):
    base, adapters = base_and_adapters
    model = Slots(base)
    model.load(2, adapters[name])
    for prompt in PROMPTS:
        (ours,) = model.prefill([(prompt, 2)])
        ref = peft_logits(base, adapters[name], prompt)
        np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
        assert (ours.argmax(-1) == ref.argmax(-1)).all()
        base_ref = peft_logits(base, None, prompt)
        assert np.abs(ref - base_ref).max() > 100 * 2e-4 * np.abs(ref).max(), "a no-op adapter"


def test_a_batch_mixing_base_and_two_adapters_gives_each_row_its_own(base_and_adapters):
    base, adapters = base_and_adapters
    model = Slots(base)
    model.load(1, adapters["a"])
    model.load(3, adapters["b"])
    rows = [(PROMPTS[0], 1), (PROMPTS[1], 0), (PROMPTS[2], 3)]
    mixed = model.prefill(rows)
    for ours, (prompt, slot) in zip(mixed, rows, strict=True):
        (alone,) = model.prefill([(prompt, slot)])
        np.testing.assert_allclose(ours, alone, atol=1e-5 * np.abs(alone).max())
    np.testing.assert_allclose(
        mixed[1], peft_logits(base, None, PROMPTS[1]), atol=2e-4 * np.abs(mixed[1]).max()
    )


def test_a_cleared_slot_is_the_base_model(base_and_adapters):
    base, adapters = base_and_adapters
    model = Slots(base)
    model.load(1, adapters["a"])
    clear_slot(model.stacks, 1, LORA)
    (ours,) = model.prefill([(PROMPTS[0], 1)])
    (plain,) = model.prefill([(PROMPTS[0], 0)])
    np.testing.assert_array_equal(ours, plain)


def _copy_adapter(src: Path, dst: Path, **config) -> Path:
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    cfg = json.loads((src / "adapter_config.json").read_text()) | config
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_adapters_that_do_not_fit_are_refused_by_name(base_and_adapters, tmp_path):
    base, adapters = base_and_adapters
    shapes = layer_shapes(read_hf_config(base))
    small = LoraConfig(max_loras=2, max_rank=4, targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: r: 8 exceeds .*max_rank 4"):
        read_adapter(adapters["b"], shapes, small)
    with pytest.raises(AdapterError, match=r"target_modules: .*k_proj.* not among"):
        read_adapter(adapters["a"], shapes, LoraConfig(2, 8, ("q_proj", "v_proj")))
    with pytest.raises(AdapterError, match=r"adapter_config\.json: missing"):
        read_adapter(tmp_path / "nowhere", shapes, LORA)
    dora = _copy_adapter(adapters["a"], tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match=r"use_dora: True is not supported"):
        read_adapter(dora, shapes, LORA)
    other = make_hf_checkpoint(tmp_path / "wider", "llama", seed=4, hidden_size=48)
    with pytest.raises(AdapterError, match=r"lora_[AB]\.weight: shape .*another base model"):
        read_adapter(adapters["a"], layer_shapes(read_hf_config(other)), LORA)


def test_the_lora_field_of_model_yaml_names_what_is_wrong():
    from aotlm.build.model_yaml_fields import Checker, lora
    from aotlm.errors import ConfigError

    check = Checker("model.yaml")
    got = lora(check, {"max_loras": 4, "max_rank": 16, "targets": ["v_proj", "q_proj"]})
    assert got == LoraConfig(4, 16, ("q_proj", "v_proj"))  # in the layer's order
    assert lora(check, {"max_loras": 2, "max_rank": 8}).targets == ALL
    assert lora(check, None) is None
    for bad, where in [
        ({"max_loras": 2}, r"lora\.max_rank: required"),
        ({"max_loras": 0, "max_rank": 8}, r"lora\.max_loras: must be positive"),
        ({"max_loras": 64, "max_rank": 64}, r"model\.yaml: lora: max_loras \* max_rank = 4096"),
        ({"max_loras": 2, "max_rank": 8, "targets": ["qproj"]}, r"lora\.targets\[0\]: unknown"),
        ({"max_loras": 2, "max_rank": 8, "rank": 8}, r"lora\.rank: unknown key"),
    ]:
        with pytest.raises(ConfigError, match=where):
            lora(check, bad)


@pytest.fixture(scope="module")
def lora_bundle(tiny_checkpoint, tmp_path_factory):
    from bundle_factory import build_from_yaml, write_model_yaml

    root = tmp_path_factory.mktemp("lora-bundle")
    spec = write_model_yaml(
        root, tiny_checkpoint, lora={"max_loras": 2, "max_rank": 8}, decode_steps=4
    )
    build_from_yaml(spec, root / "bundle")
    adapter = make_adapter(tiny_checkpoint, root / "adapter", rank=4, seed=5)
    return root / "bundle", adapter


@pytest.fixture(scope="module")
def three_adapters(lora_bundle, tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("three")
    return {
        "a": lora_bundle[1],
        "b": make_adapter(
            tiny_checkpoint, root / "b", rank=8, targets=("q_proj", "v_proj"), seed=6
        ),
        "c": make_adapter(tiny_checkpoint, root / "c", rank=2, seed=7, use_rslora=True),
    }


def peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(peft_logits(base, adapter, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def test_a_bundle_takes_adapters_as_data_and_matches_peft(lora_bundle, tiny_checkpoint):
    """The slots are graph inputs: loading an adapter is a transfer, the logits of a prompt and
    the greedy tokens of multi-step decode under it are PEFT's, and nothing compiles."""
    from bundle_factory import bundle_last_logits

    from aotlm.bundle import read_manifest
    from aotlm.runtime.generation.batch import ChunkInput
    from aotlm.runtime.generation.engine import Engine

    bundle, adapter = lora_bundle
    lora = read_manifest(bundle)[0].serving.lora
    assert lora == {"max_loras": 2, "max_rank": 8, "targets": list(ALL)}
    engine = Engine.from_bundle(bundle)
    runner = engine.runner
    config = LoraConfig(2, 8, ALL)
    shapes = layer_shapes(engine.loaded.model)
    stacks = empty_lora(shapes, config, np.float32)
    write_slot(stacks, 2, read_adapter(adapter, shapes, config).updates, config)
    runner.set_lora_slots(stacks)
    prompt = PROMPTS[0] * 3
    base = bundle_last_logits(engine, prompt)
    np.testing.assert_allclose(
        base, peft_logits(tiny_checkpoint, None, prompt)[-1], atol=2e-4 * np.abs(base).max()
    )
    table = list(range(1, 1 + runner.pages_per_seq))
    (ours,) = runner.compute_logits([ChunkInput(prompt, 0, table, samples=True, adapter=2)])
    ref = peft_logits(tiny_checkpoint, adapter, prompt)[-1]
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
    assert np.abs(ours - base).max() > 0.05 * np.abs(base).max(), "the adapter changed nothing"
    # Greedy decode under the adapter, 4 steps per call, against PEFT's argmax continuation.
    tokens = [*prompt, int(ours.argmax())]
    for _ in range(2):
        last = ChunkInput([tokens[-1]], len(tokens) - 1, table, samples=True, adapter=2)
        out = runner.execute_decode([last], [len(tokens) + 3], 4)[0]
        tokens += [s.token_id for s in out]
    want = list(prompt)
    for _ in range(len(tokens) - len(prompt)):
        want.append(int(peft_logits(tiny_checkpoint, adapter, want)[-1].argmax()))
    assert tokens == want
    assert engine.compiles_after_ready == 0


def _engine(bundle: Path, adapters: dict[str, Path]):
    from aotlm.runtime.generation.engine import Engine

    engine = Engine.from_bundle(bundle)
    for name, path in adapters.items():
        engine.adapters.register(name, path)
    return engine


def test_more_adapters_than_slots_in_one_batch_each_get_peft_tokens(
    lora_bundle, three_adapters, tiny_checkpoint
):
    """Three adapters and the base in one generate call on a 2-slot bundle: requests wait for a
    slot instead of failing, and each gets exactly what PEFT gives it alone."""
    from aotlm.runtime.generation.sampling_params import SamplingParams

    engine = _engine(lora_bundle[0], three_adapters)
    names = ["a", "b", None, "c", "a"]
    prompts = [PROMPTS[i % 3] * 2 for i in range(len(names))]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = engine.generate(prompts, params, adapters=names)
    for prompt, name, (completion,) in zip(prompts, names, results, strict=True):
        path = three_adapters[name] if name else None
        assert list(completion.token_ids) == peft_greedy(tiny_checkpoint, path, prompt, 6), name
    assert engine.adapters.swaps >= 3  # c had to wait for a slot a or b gave up
    assert engine.compiles_after_ready == 0


def test_the_prefix_cache_is_never_shared_across_adapters(lora_bundle, three_adapters):
    from aotlm.runtime.generation.sampling_params import SamplingParams

    engine = _engine(lora_bundle[0], three_adapters)
    bm = engine.block_manager
    prompt = list(range(5, 5 + 40))  # two full pages of 16
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    hits = []
    for name in ("a", "b", None, "a"):
        before = bm.prefix_hits
        engine.generate([prompt], params, adapters=[name])
        hits.append(bm.prefix_hits - before)
    assert hits == [0, 0, 0, 32], hits  # only the same adapter's second request reuses KV


def test_unloading_an_adapter_while_it_runs_loses_nothing(
    lora_bundle, three_adapters, tiny_checkpoint
):
    from aotlm.errors import RequestError
    from aotlm.runtime.generation.sampling_params import SamplingParams

    engine = _engine(lora_bundle[0], {"a": three_adapters["a"]})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    (seq,) = engine.add_request(PROMPTS[0], params, "a")
    engine.step()
    engine.adapters.unregister("a")
    with pytest.raises(RequestError, match="adapter 'a'"):
        engine.add_request(PROMPTS[0], params, "a")
    while engine.has_unfinished:
        engine.step()
    assert len(seq.output_token_ids) == 8 and engine.adapters.slot_of("a") is None
    # Unloaded while running, then another adapter loaded under the same name at once: the
    # running request keeps the old weights, the new one gets the new adapter's.
    engine.adapters.register("a", three_adapters["a"])
    (old,) = engine.add_request(PROMPTS[1], params, "a")
    engine.step()
    engine.adapters.unregister("a")
    engine.adapters.register("a", three_adapters["b"])
    (new,) = engine.add_request(PROMPTS[1], params, "a")
    while engine.has_unfinished:
        engine.step()
    want_old = peft_greedy(tiny_checkpoint, three_adapters["a"], PROMPTS[1], 8)
    want_new = peft_greedy(tiny_checkpoint, three_adapters["b"], PROMPTS[1], 8)
    assert want_old != want_new
    assert old.output_token_ids == want_old and new.output_token_ids == want_new
    engine.adapters.unregister("a")
    engine.adapters.register("a", three_adapters["a"])  # loads again under the same name
    with pytest.raises(AdapterError, match="already loaded"):
        engine.adapters.register("a", three_adapters["a"])
    with pytest.raises(AdapterError, match=r"lora_name: '\.\./x'"):
        engine.adapters.register("../x", three_adapters["a"])
    assert engine.compiles_after_ready == 0


def test_slots_of_another_rank_and_the_same_width_are_not_taken_from_the_build_cache(
    lora_bundle, tiny_checkpoint, tmp_path
):
    """4 slots of rank 4 have the avals of 2 slots of rank 8 (16 columns): the build cache must
    still export the graphs again (the rank shapes the slot mask), and the bundle match PEFT."""
    from bundle_factory import build_from_yaml, write_model_yaml

    from aotlm.runtime.generation.batch import ChunkInput
    from aotlm.runtime.generation.engine import Engine
    from aotlm.runtime.generation.sampling_params import SamplingParams

    spec = write_model_yaml(
        tmp_path, tiny_checkpoint, lora={"max_loras": 4, "max_rank": 4}, decode_steps=4
    )
    result = build_from_yaml(spec, tmp_path / "bundle")
    assert result.exported > 0
    engine = Engine.from_bundle(tmp_path / "bundle")
    engine.adapters.register("a", lora_bundle[1])  # rank 4
    (seq,) = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1), "a")
    assert engine.adapters.acquire(seq) and seq.lora_slot == 1
    table = list(range(1, 1 + engine.runner.pages_per_seq))
    engine.adapters.flush()
    chunk = ChunkInput(PROMPTS[0], 0, table, samples=True, adapter=1)
    (ours,) = engine.runner.compute_logits([chunk])
    ref = peft_logits(tiny_checkpoint, lora_bundle[1], PROMPTS[0])[-1]
    np.testing.assert_allclose(ours, ref, atol=2e-4 * np.abs(ref).max())
