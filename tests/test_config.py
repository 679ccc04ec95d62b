"""model.yaml loading: a good file parses to the right values; every bad one names file and key."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from aotlm.buckets.planner import graph_count
from aotlm.buckets.traffic import SYNTHETIC, write_trace
from aotlm.build.model_yaml import (
    BuildConfig,
    default_kv_pages,
    load_build_config,
    parse_build_config,
    with_targets,
)
from aotlm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
GOOD: dict[str, Any] = {
    "model": "ckpt",
    "dtype": "float32",
    "max_seq_len": 256,
    "buckets": {"tokens": [16, 32, 64, 128], "requests": [1, 2, 4, 8], "page_size": 16},
}


@pytest.fixture
def write(tmp_path: Path):
    """Write a tiny.yaml beside a stub checkpoint dir; return its path."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")

    def _write(data: Any) -> Path:
        path = tmp_path / "tiny.yaml"
        path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    return _write


def edited(**changes: Any) -> dict[str, Any]:
    """GOOD with dotted keys replaced (value None deletes the key)."""
    data = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def test_good_config_parses(write) -> None:
    path = write(GOOD)
    cfg = load_build_config(path)
    assert isinstance(cfg, BuildConfig)
    assert cfg.source == path
    assert cfg.model == (path.parent / "ckpt").resolve()
    assert cfg.name == "tiny"
    assert cfg.dtype == "float32"
    assert cfg.max_seq_len == 256
    assert cfg.token_buckets == (16, 32, 64, 128)
    assert cfg.request_buckets == (1, 2, 4, 8)
    assert cfg.page_size == 16
    assert cfg.pages_per_seq == 16
    assert cfg.kv_pages == 8 * 16 + 1 == default_kv_pages(256, 16, 8)
    assert cfg.targets == ("cpu",)


def test_config_is_frozen(write) -> None:
    cfg = load_build_config(write(GOOD))
    with pytest.raises(AttributeError):
        cfg.dtype = "bfloat16"  # type: ignore[misc]


def test_optional_keys_and_ladder_forms(write) -> None:
    data = edited(
        name="my-model",
        dtype="bfloat16",
        max_seq_len=1000,
        kv_pages=500,
        targets=["cpu", "cuda", "tpu:v5e:2x2", "tpu:v5p:2x2x1"],
        buckets__tokens={"step": {"min": 16, "max": 512, "gap": 128}},
        buckets__requests={"pow2": {"min": 1, "max": 16}},
        buckets__page_size=32,
    )
    cfg = load_build_config(write(data))
    assert cfg.name == "my-model"
    assert cfg.dtype == "bfloat16"
    assert cfg.token_buckets == (16, 32, 64, 128, 256, 384, 512)
    assert cfg.request_buckets == (1, 2, 4, 8, 16)
    assert cfg.pages_per_seq == 32  # ceil(1000 / 32)
    assert cfg.kv_pages == 500
    assert cfg.targets == ("cpu", "cuda", "tpu:v5e:2x2", "tpu:v5p:2x2x1")
    assert cfg.decode_steps == 1  # absent: one decode step per call, no decode graphs
    assert load_build_config(write(edited(decode_steps=8))).decode_steps == 8


def test_memory_gib_is_optional(write) -> None:
    assert load_build_config(write(GOOD)).memory_gib is None
    assert load_build_config(write(edited(memory_gib=2))).memory_gib == 2.0
    assert load_build_config(write(edited(memory_gib=0.5))).memory_gib == 0.5


def test_parse_build_config_from_dict(write) -> None:
    path = write(GOOD)
    assert parse_build_config(copy.deepcopy(GOOD), path) == load_build_config(path)


def test_with_targets_overrides_and_validates(write) -> None:
    cfg = load_build_config(write(GOOD))
    assert with_targets(cfg, ["cuda", "tpu:v6e:2x2"]).targets == ("cuda", "tpu:v6e:2x2")
    assert cfg.targets == ("cpu",)
    with pytest.raises(ConfigError, match=r"^aotlm build: --target\[0\]: expected cpu, cuda"):
        with_targets(cfg, ["gpu"])


def test_shipped_tiny_llama_yaml(tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    shutil.copy(REPO / "artifacts" / "tiny-llama.yaml", tmp_path / "artifacts")
    (tmp_path / "checkpoints" / "tiny-llama").mkdir(parents=True)
    (tmp_path / "checkpoints" / "tiny-llama" / "config.json").write_text("{}")
    cfg = load_build_config(tmp_path / "artifacts" / "tiny-llama.yaml")
    assert cfg.name == "tiny-llama"
    assert cfg.model == (tmp_path / "checkpoints" / "tiny-llama").resolve()
    assert (cfg.dtype, cfg.max_seq_len, cfg.page_size) == ("float32", 256, 16)
    assert cfg.token_buckets == (16, 32, 64, 128)
    assert cfg.request_buckets == (1, 2, 4, 8)
    assert cfg.targets == ("cpu",)
    assert cfg.decode_steps == 8


BAD = [
    (edited(foo=1), "foo: unknown key (allowed: model, name, dtype, max_seq_len, buckets, "),
    (edited(buckets__extra=1), "buckets.extra: unknown key (allowed: tokens, requests, page_size)"),
    (edited(dtype=None), "dtype: required key is missing"),
    (edited(buckets__page_size=None), "buckets.page_size: required key is missing"),
    (edited(dtype="float16"), "dtype: must be one of float32, bfloat16 (got 'float16')"),
    (edited(dtype=32), "dtype: expected a string, got 32"),
    (edited(name=""), "name: expected a non-empty string"),
    (edited(max_seq_len="abc"), "max_seq_len: expected an integer, got 'abc'"),
    (edited(max_seq_len=True), "max_seq_len: expected an integer, got True"),
    (edited(max_seq_len=256.0), "max_seq_len: expected an integer, got 256.0"),
    (edited(max_seq_len=0), "max_seq_len: must be positive (got 0)"),
    (edited(buckets=[16, 32]), "buckets: expected a mapping"),
    (edited(buckets__tokens=[16, 64, 32]), "buckets.tokens[2]: must be larger than 64 (got 32)"),
    (edited(buckets__tokens=[16, 16]), "buckets.tokens[1]: must be larger than 16 (got 16)"),
    (edited(buckets__tokens=[0, 16]), "buckets.tokens[0]: must be positive (got 0)"),
    (edited(buckets__tokens=[-16]), "buckets.tokens[0]: must be positive (got -16)"),
    (edited(buckets__tokens=[]), "buckets.tokens: must not be empty"),
    (edited(buckets__tokens=[16, 512]), "buckets.tokens[1]: must be at most max_seq_len (256)"),
    (
        edited(buckets__tokens={"pow2": {"min": 16, "max": 512}}),
        "buckets.tokens[5]: must be at most max_seq_len (256) (got 512)",
    ),
    (edited(buckets__tokens={"pow2": {"min": 16}}), "buckets.tokens.pow2.max: required key"),
    (edited(buckets__requests=[1, 2, 4, 256]), "buckets.requests[3]: must be at most the largest"),
    (edited(buckets__requests=[2, 1]), "buckets.requests[1]: must be larger than 2 (got 1)"),
    (edited(buckets__page_size=12), "buckets.page_size: must be a power of two between 1 and 1024"),
    (edited(buckets__page_size=2048), "buckets.page_size: must be a power of two"),
    (edited(buckets__page_size=0), "buckets.page_size: must be positive (got 0)"),
    (edited(kv_pages=16), "kv_pages: must be at least pages_per_seq + 1 = 17"),
    (edited(kv_pages="many"), "kv_pages: expected an integer, got 'many'"),
    (edited(targets=[]), "targets: expected a non-empty list of strings"),
    (edited(targets="cpu"), "targets: expected a non-empty list of strings"),
    (edited(targets=["cpu", "tpu"]), "targets[1]: expected cpu, cuda or tpu:<topology>"),
    (edited(targets=["gpu"]), "targets[0]: expected cpu, cuda or tpu:<topology>"),
    (edited(targets=[1]), "targets[0]: expected cpu, cuda or tpu:<topology>"),
    (edited(targets=["cpu", "cpu"]), "targets[1]: duplicate target 'cpu'"),
    (edited(memory_gib="lots"), "memory_gib: expected a number of GiB, got 'lots'"),
    (edited(memory_gib=True), "memory_gib: expected a number of GiB, got True"),
    (edited(memory_gib=0), "memory_gib: must be a positive number of GiB (got 0)"),
    (edited(memory_gib=-1.5), "memory_gib: must be a positive number of GiB (got -1.5)"),
    (edited(decode_steps=0), "decode_steps: must be positive (got 0)"),
    (edited(decode_steps=65), "decode_steps: must be between 1 and 64 (got 65)"),
    (edited(decode_steps="8"), "decode_steps: expected an integer, got '8'"),
    (edited(model=3), "model: expected a string, got 3"),
    (edited(model="nowhere"), "model: checkpoint directory "),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_config_names_file_and_key(write, data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_build_config(write(data))
    assert str(info.value).startswith(f"tiny.yaml: {message}"), str(info.value)


def test_missing_checkpoint_names_the_path(write, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_build_config(write(edited(model="nowhere")))
    assert str(tmp_path.resolve() / "nowhere") in str(info.value)


def test_checkpoint_without_config_json(write, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        load_build_config(write(edited(model="empty")))
    message = str(info.value)
    assert message.startswith("tiny.yaml: model: ")
    assert str(tmp_path.resolve() / "empty") in message and "config.json" in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed", "tiny.yaml: not valid YAML"),
        (
            "- 1\n- 2\n",
            "tiny.yaml: expected a mapping of keys (model, dtype, ...) at the top level",
        ),
        ("", "tiny.yaml: expected a mapping"),
    ],
)
def test_unparseable_or_non_mapping_yaml(write, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_build_config(write(text))
    assert str(info.value).startswith(message)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_build_config(tmp_path / "absent.yaml")


# ---- buckets: {plan: TRACE.jsonl, max_graphs: N, page_size: P} --------------------------------


@pytest.fixture
def planned(tiny_checkpoint, tmp_path: Path):
    """Write a trace and a planned model.yaml for the tiny checkpoint; return a writer."""
    requests = SYNTHETIC["mixed-heavy-tail"](80, seed=1, max_seq_len=128)
    write_trace(tmp_path / "trace.jsonl", requests)

    def _write(**buckets: Any) -> Path:
        spec = {"plan": "trace.jsonl", "max_graphs": 10, "page_size": 16, "max_tokens": 64}
        spec = {k: v for k, v in {**spec, **buckets}.items() if v is not None}
        data = {"model": str(tiny_checkpoint), "dtype": "float32", "max_seq_len": 128}
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump({**data, "buckets": spec}))
        return path

    return _write


def test_planned_buckets_resolve_at_load_time(planned) -> None:
    cfg = load_build_config(planned(max_requests=4))
    assert cfg.token_buckets[-1] == 64 and cfg.request_buckets[-1] == 4
    assert graph_count(len(cfg.token_buckets), len(cfg.request_buckets)) <= 10
    plan = json.loads(cfg.bucket_plan)
    assert plan["planned"]["tokens"] == list(cfg.token_buckets)
    assert plan["trace"] == "trace.jsonl" and plan["max_graphs"] == 10
    assert plan["planned"]["work_overhead"] <= plan["pow2"]["work_overhead"]
    assert cfg == load_build_config(planned(max_requests=4)) and hash(cfg)
    aligned = load_build_config(planned(align=8)).token_buckets
    assert all(t % 8 == 0 for t in aligned[:-1]) and aligned[-1] == 64


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ({"plan": "nope.jsonl"}, "buckets.plan: trace file"),
        ({"plan": 5}, "buckets.plan: expected a path"),
        ({"tokens": [16, 64]}, "buckets.tokens: not allowed with buckets.plan"),
        ({"max_graphs": 3}, "buckets.max_graphs: must be at least 5 (got 3)"),
        ({"max_graphs": None}, "buckets.max_graphs: required key is missing"),
        ({"page_size": 12}, "buckets.page_size: must be a power of two"),
        ({"max_tokens": 256}, "buckets.max_tokens: must be at most max_seq_len (128)"),
        ({"max_requests": 65}, "buckets.max_requests: must be at most buckets.max_tokens (64)"),
        ({"align": 0}, "buckets.align: must be at least 1 (got 0)"),
        ({"concurrency": "x"}, "buckets.concurrency: expected an integer"),
        ({"row_cost": 1}, "buckets.row_cost: unknown key"),
    ],
)
def test_bad_planned_buckets_name_the_key(planned, buckets: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_build_config(planned(**buckets))
    assert str(info.value).startswith(f"tiny.yaml: {message}"), str(info.value)


def test_a_bad_trace_line_is_named_under_buckets_plan(planned, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt_tokens": 3, "output_tokens": 1}\n{oops\n')
    with pytest.raises(ConfigError, match=r"^tiny.yaml: buckets.plan: bad.jsonl:2: not valid JSON"):
        load_build_config(planned(plan="bad.jsonl"))
