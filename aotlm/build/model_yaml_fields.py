"""The checks of model.yaml's fields: each turns a raw YAML value into a typed one or raises a
ConfigError naming the file and the key path (model_yaml.py composes them)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aotlm.errors import ConfigError

MAX_DECODE_STEPS = 64
WEIGHT_SCHEMES = ("int8", "fp8")
KV_CACHE_DTYPES = ("fp8",)
DEFAULT_QUALITY_TOKENS = 512
CPU_ATTENTION = ("kernel", "jnp")
# Topologies as jax's get_topology_desc names them: v5e:2x2, v6e:2x2, v5p:2x2x1, tpu7x:2x2x1.
_TARGET_RE = re.compile(r"cpu|cuda|tpu:[a-z][a-z0-9]*:\d+(x\d+)+")


def check_at_most(
    check: Checker, key: str, ladder: tuple[int, ...], limit: int, limit_name: str
) -> None:
    for i, value in enumerate(ladder):
        if value > limit:
            raise check.error(
                f"{key}[{i}]", f"must be at most {limit_name} ({limit}) (got {value})"
            )


def checkpoint_dir(check: Checker, value: Any, base: Path) -> Path:
    model = (base / check.string(value, "model")).resolve()
    if not model.is_dir():
        raise check.error(
            "model",
            f"checkpoint directory {model} does not exist (a relative path resolves against "
            f"the directory of {check.file_name}; `python -m aotlm.tiny DIR` creates the tiny "
            "test model)",
        )
    if not (model / "config.json").is_file():
        raise check.error(
            "model", f"{model} has no config.json (expected a Hugging Face checkpoint directory)"
        )
    return model


def targets(check: Checker, value: Any, key: str = "targets") -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise check.error(key, f"expected a non-empty list of strings, got {value!r}")
    for i, target in enumerate(value):
        if not isinstance(target, str) or not _TARGET_RE.fullmatch(target):
            raise check.error(
                f"{key}[{i}]",
                f"expected cpu, cuda or tpu:<topology> such as tpu:v5e:2x2 (got {target!r})",
            )
        if target in value[:i]:
            raise check.error(f"{key}[{i}]", f"duplicate target {target!r}")
    return tuple(value)


def mesh(check: Checker, value: Any) -> tuple[int, int]:
    """`mesh: {tp: N, ep: M}` -> (N, M), each 1 when absent. Whether the model splits N ways
    (heads, intermediate size) and its experts M ways is checked against the checkpoint by the
    build; whether N * M devices exist, when the bundle is compiled or loaded."""
    if value is None:
        return 1, 1
    check.keys(value, "mesh", ("tp", "ep"), ("tp",))
    tp = check.positive_int(value["tp"], "mesh.tp")
    return tp, check.positive_int(value.get("ep", 1), "mesh.ep")


def attention_blocks(check: Checker, value: Any) -> tuple[int | None, int | None]:
    """`attention: {block_queries, block_kv_pages}` (both optional) -> the kernel's block sizes."""
    if value is None:
        return (None, None)
    keys = ("block_queries", "block_kv_pages")
    check.keys(value, "attention", (*keys, "cpu"), ())
    return tuple(  # type: ignore[return-value]
        None if value.get(k) is None else check.positive_int(value[k], f"attention.{k}")
        for k in keys
    )


def attention_cpu(check: Checker, value: Any) -> str:
    """`attention: {cpu: kernel | jnp}` -> what a cpu target's attention runs (default kernel)."""
    choice = "kernel" if value is None else value.get("cpu", "kernel")
    if choice not in CPU_ATTENTION:
        raise check.error(
            "attention.cpu", f"must be one of {', '.join(CPU_ATTENTION)} (got {choice!r})"
        )
    return choice


def decode_steps(check: Checker, value: Any) -> int:
    steps = check.positive_int(value, "decode_steps")
    if steps > MAX_DECODE_STEPS:
        raise check.error("decode_steps", f"must be between 1 and {MAX_DECODE_STEPS} (got {steps})")
    return steps


def quantization(check: Checker, value: Any) -> tuple[str | None, str | None]:
    """`quantization: {weights: int8 | fp8, kv_cache_dtype: fp8}` -> (weights,
    kv_cache_dtype), None where not quantized (aotlm/models/quantize.py says which tensors,
    aotlm/kernels/kv_quant.py how the cache is)."""
    if value is None:
        return None, None
    check.keys(value, "quantization", ("weights", "kv_cache_dtype"), ())
    weights = value.get("weights")
    if weights is not None and weights not in WEIGHT_SCHEMES:
        raise check.error(
            "quantization.weights",
            f"unknown scheme {weights!r}; supported: {', '.join(WEIGHT_SCHEMES)} (weight-only, "
            "per output channel)",
        )
    kv = value.get("kv_cache_dtype")
    if kv is not None and kv not in KV_CACHE_DTYPES:
        raise check.error(
            "quantization.kv_cache_dtype",
            f"unknown KV cache dtype {kv!r}; supported: {', '.join(KV_CACHE_DTYPES)} (e4m3)",
        )
    return weights, kv


def lora(check: Checker, value: Any):
    """`lora: {max_loras: N, max_rank: R, targets: [q_proj, ...]}` -> LoraConfig or None
    (aotlm/models/lora.py). targets default to every projection of a decoder layer."""
    from aotlm.models.lora import MAX_SLOT_COLUMNS, TARGETS, LoraConfig

    if value is None:
        return None
    check.keys(value, "lora", ("max_loras", "max_rank", "targets"), ("max_loras", "max_rank"))
    slots = check.positive_int(value["max_loras"], "lora.max_loras")
    rank = check.positive_int(value["max_rank"], "lora.max_rank")
    if slots * rank > MAX_SLOT_COLUMNS:
        raise check.error(
            "lora",
            f"max_loras * max_rank = {slots * rank} exceeds {MAX_SLOT_COLUMNS}: every token "
            "computes every slot's columns (aotlm/models/lora.py), so fewer slots or a lower "
            "rank",
        )
    targets = value.get("targets", list(TARGETS))
    if not isinstance(targets, list) or not targets:
        raise check.error("lora.targets", f"expected a list of module names, got {targets!r}")
    for i, t in enumerate(targets):
        if t not in TARGETS:
            raise check.error(
                f"lora.targets[{i}]", f"unknown module {t!r}; supported: {', '.join(TARGETS)}"
            )
    if len(set(targets)) != len(targets):
        raise check.error("lora.targets", "lists a module twice")
    return LoraConfig(slots, rank, tuple(t for t in TARGETS if t in targets))


def quality(check: Checker, value: Any, base: Path) -> tuple[Path | None, float | None, int]:
    """`quality: {text: FILE, max_kl: X, max_tokens: N}` -> (text or None for the shipped one,
    the KL bound or None, tokens evaluated)."""
    if value is None:
        return None, None, DEFAULT_QUALITY_TOKENS
    check.keys(value, "quality", ("text", "max_kl", "max_tokens"), ())
    text = None
    if "text" in value:
        text = (base / check.string(value["text"], "quality.text")).resolve()
        if not text.is_file():
            raise check.error("quality.text", f"{text} is not a file")
    max_kl = value.get("max_kl")
    if max_kl is not None:
        if isinstance(max_kl, bool) or not isinstance(max_kl, int | float):
            raise check.error("quality.max_kl", f"expected a number, got {max_kl!r}")
        if not math.isfinite(max_kl) or max_kl < 0:
            raise check.error("quality.max_kl", f"must be a non-negative number (got {max_kl})")
        max_kl = float(max_kl)
    tokens = check.positive_int(
        value.get("max_tokens", DEFAULT_QUALITY_TOKENS), "quality.max_tokens"
    )
    if tokens < 2:
        raise check.error("quality.max_tokens", f"must be at least 2 (got {tokens})")
    return text, max_kl, tokens


def memory_gib(check: Checker, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise check.error("memory_gib", f"expected a number of GiB, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise check.error("memory_gib", f"must be a positive number of GiB (got {value})")
    return float(value)


def type_name(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "nothing (empty file?)"}.get(
        type(value), type(value).__name__
    )


class Checker:
    """Builds ``file: key.path: message`` errors and checks scalar types."""

    def __init__(self, file_name: str) -> None:
        self.file_name = file_name

    def where(self, key: str) -> str:
        return f"{self.file_name}: {key}"

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {message}")

    def keys(
        self, value: Any, key: str, allowed: tuple[str, ...], required: tuple[str, ...]
    ) -> None:
        prefix = f"{key}." if key else ""
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a mapping with keys {', '.join(allowed)}")
        for k in value:
            if k not in allowed:
                raise self.error(f"{prefix}{k}", f"unknown key (allowed: {', '.join(allowed)})")
        for k in required:
            if k not in value:
                raise self.error(f"{prefix}{k}", "required key is missing")

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def positive_int(self, value: Any, key: str) -> int:
        # bool is an int subclass in Python; `max_seq_len: yes` is a mistake, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if value <= 0:
            raise self.error(key, f"must be positive (got {value})")
        return value
