"""model.yaml -> a frozen, validated :class:`BuildConfig`.

One loader, one schema (docs/internals.md). Every error is a ``ConfigError`` that starts with the
file name and the key path (``tiny.yaml: buckets.tokens[2]: must be larger than 64 (got 32)``)
so a user can fix the file without reading code. Validation is complete here: build and serve
trust a ``BuildConfig`` and never re-check it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from aotlm.buckets.ladder import ladder_from_spec
from aotlm.errors import ConfigError

DTYPES = ("float32", "bfloat16")
MAX_PAGE_SIZE = 1024
DEFAULT_TARGETS = ("cpu",)
# Topologies as jax's get_topology_desc names them: v5e:2x2, v6e:2x2, v5p:2x2x1, tpu7x:2x2x1.
_TARGET_RE = re.compile(r"cpu|cuda|tpu:[a-z][a-z0-9]*:\d+(x\d+)+")
_TOP_KEYS = (
    "model",
    "name",
    "dtype",
    "max_seq_len",
    "buckets",
    "kv_pages",
    "targets",
    "memory_gib",
)
_REQUIRED_TOP = ("model", "dtype", "max_seq_len", "buckets")
_BUCKET_KEYS = ("tokens", "requests", "page_size")


def default_kv_pages(max_seq_len: int, page_size: int, max_requests: int) -> int:
    """Pages for ``max_requests`` full-length sequences, plus page 0 (the trash page)."""
    return max_requests * math.ceil(max_seq_len / page_size) + 1


@dataclasses.dataclass(frozen=True, slots=True)
class BuildConfig:
    """A validated model.yaml. Paths are absolute; ladders are sorted tuples."""

    source: Path
    model: Path
    name: str
    dtype: str
    max_seq_len: int
    token_buckets: tuple[int, ...]
    request_buckets: tuple[int, ...]
    page_size: int
    kv_pages: int
    targets: tuple[str, ...] = DEFAULT_TARGETS
    # Device memory limit for the build-time memory plan, overriding each target's own (a TPU
    # chip's HBM); on cpu and cuda it is the only limit. None: no limit where none is known.
    memory_gib: float | None = None

    @property
    def pages_per_seq(self) -> int:
        """Block-table width: pages one sequence of ``max_seq_len`` tokens can touch."""
        return math.ceil(self.max_seq_len / self.page_size)


def load_build_config(path: str | Path) -> BuildConfig:
    """Read and validate a model.yaml file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name}: not valid YAML{_yaml_problem(exc)}") from None
    return parse_build_config(data, path)


def parse_build_config(data: dict, source: Path) -> BuildConfig:
    """Validate already-parsed YAML; ``source`` names errors and anchors a relative ``model``."""
    source = Path(source).absolute()
    check = _Checker(source.name)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source.name}: expected a mapping of keys (model, dtype, ...) at the top level, "
            f"got {_type_name(data)}"
        )
    check.keys(data, "", _TOP_KEYS, _REQUIRED_TOP)

    name = data.get("name", source.stem)
    if not isinstance(name, str) or not name.strip():
        raise check.error("name", f"expected a non-empty string, got {name!r}")
    dtype = check.string(data["dtype"], "dtype")
    if dtype not in DTYPES:
        raise check.error("dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    max_seq_len = check.positive_int(data["max_seq_len"], "max_seq_len")

    buckets = data["buckets"]
    check.keys(buckets, "buckets", _BUCKET_KEYS, _BUCKET_KEYS)
    page_size = check.positive_int(buckets["page_size"], "buckets.page_size")
    if page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise check.error(
            "buckets.page_size",
            f"must be a power of two between 1 and {MAX_PAGE_SIZE} (got {page_size})",
        )
    tokens = ladder_from_spec(buckets["tokens"], check.where("buckets.tokens"))
    _check_at_most(check, "buckets.tokens", tokens, max_seq_len, "max_seq_len")
    requests = ladder_from_spec(buckets["requests"], check.where("buckets.requests"))
    # Every scheduled request contributes at least one token to a step.
    _check_at_most(check, "buckets.requests", requests, tokens[-1], "the largest token bucket")

    pages_per_seq = math.ceil(max_seq_len / page_size)
    kv_pages = default_kv_pages(max_seq_len, page_size, requests[-1])
    if "kv_pages" in data:
        kv_pages = check.positive_int(data["kv_pages"], "kv_pages")
        if kv_pages < pages_per_seq + 1:
            raise check.error(
                "kv_pages",
                f"must be at least pages_per_seq + 1 = {pages_per_seq + 1} so one full-length "
                f"sequence fits (page 0 is reserved) (got {kv_pages})",
            )

    return BuildConfig(
        source=source,
        model=_checkpoint_dir(check, data["model"], source.parent),
        name=name,
        dtype=dtype,
        max_seq_len=max_seq_len,
        token_buckets=tokens,
        request_buckets=requests,
        page_size=page_size,
        kv_pages=kv_pages,
        targets=_targets(check, data.get("targets", list(DEFAULT_TARGETS))),
        memory_gib=_memory_gib(check, data.get("memory_gib")),
    )


def with_targets(config: BuildConfig, targets: Sequence[str]) -> BuildConfig:
    """A copy of ``config`` that builds for ``targets`` (the ``aotlm build --target`` override)."""
    checked = _targets(_Checker("aotlm build"), list(targets), key="--target")
    return dataclasses.replace(config, targets=checked)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's str() spans several lines; the CLI prints errors on one.
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f": {exc}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _check_at_most(
    check: _Checker, key: str, ladder: tuple[int, ...], limit: int, limit_name: str
) -> None:
    for i, value in enumerate(ladder):
        if value > limit:
            raise check.error(
                f"{key}[{i}]", f"must be at most {limit_name} ({limit}) (got {value})"
            )


def _checkpoint_dir(check: _Checker, value: Any, base: Path) -> Path:
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


def _targets(check: _Checker, value: Any, key: str = "targets") -> tuple[str, ...]:
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


def _memory_gib(check: _Checker, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise check.error("memory_gib", f"expected a number of GiB, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise check.error("memory_gib", f"must be a positive number of GiB (got {value})")
    return float(value)


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", type(None): "nothing (empty file?)"}.get(
        type(value), type(value).__name__
    )


class _Checker:
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
