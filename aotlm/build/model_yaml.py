"""model.yaml -> a frozen, validated :class:`BuildConfig`.

One loader, one schema (docs/internals.md). Every error is a ``ConfigError`` that starts with the
file name and the key path (``tiny.yaml: buckets.tokens[2]: must be larger than 64 (got 32)``)
so a user can fix the file without reading code. Validation is complete here: build and serve
trust a ``BuildConfig`` and never re-check it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from aotlm.buckets.ladder import ladder_from_spec
from aotlm.buckets.plan_spec import check_plan_keys, planned_ladders
from aotlm.build import model_yaml_fields as fields
from aotlm.build.model_yaml_fields import Checker
from aotlm.bundle.manifest import ENCODER
from aotlm.errors import ConfigError
from aotlm.models.catalog import checkpoint_kind
from aotlm.models.compressed_tensors import PreQuantized, read_prequantized
from aotlm.models.lora import LoraConfig

DTYPES = ("float32", "bfloat16")
MAX_PAGE_SIZE = 1024
MAX_YAML_VALUES = 100_000  # a model.yaml holds dozens; a bomb of aliases holds billions
DEFAULT_TARGETS = ("cpu",)
_TOP_KEYS = (
    "model",
    "name",
    "dtype",
    "max_seq_len",
    "buckets",
    "kv_pages",
    "targets",
    "memory_gib",
    "mesh",
    "attention",
    "decode_steps",
    "quantization",
    "quality",
    "lora",
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
    # "decoder", or "encoder" (an embedding model, by the checkpoint's architecture): its
    # token_buckets are sequence lengths, request_buckets batch sizes, and it has no KV cache
    # (page_size and kv_pages are 0).
    kind: str = "decoder"
    # With `buckets: {plan: TRACE.jsonl, ...}`: the planner's result as sorted JSON (hashable,
    # like the rest), recorded in the manifest's buckets.plan. None for ladders given directly.
    bucket_plan: str | None = None
    # `mesh: {tp: N}`: tensor-parallel degree, the model split over N devices
    # (aotlm/models/sharding.py); 1: one device. Checked against the checkpoint by the build.
    tp: int = 1
    # `mesh: {ep: M}`: experts split over M devices (mixture-of-experts models); the mesh has
    # tp * ep devices.
    ep: int = 1
    # `attention: {block_queries: N, block_kv_pages: M}`: the Pallas kernel's block sizes (query
    # tokens per block, KV pages per block), tuned per target; None picks the kernel's default.
    # The resolved sizes are recorded in the manifest's serving.attention.
    attention_blocks: tuple[int | None, int | None] = (None, None)
    # `attention: {cpu: kernel | jnp}`: what a cpu target's attention runs, aotlm's C++ kernel
    # (default) or the blocked jnp path (for a serving machine where the kernel is not built).
    attention_cpu: str = "kernel"
    # `decode_steps: K` (decoders): also build decode[R], which runs up to K decode steps in one
    # device call when every running sequence is decoding and none waits; 1: no such graphs.
    decode_steps: int = 1
    # `quantization: {weights: int8 | fp8}`: weight-only quantization per output channel, done
    # by the build (aotlm/models/quantize.py); None: weights in `dtype`.
    weights_quant: str | None = None
    # The checkpoint's own quantization (compressed-tensors): its weights are read as they are.
    prequantized: PreQuantized | None = None
    # `quantization: {kv_cache_dtype: fp8}`: e4m3 KV pages with per-layer scales; None: `dtype`.
    kv_cache_dtype: str | None = None
    # `quality: {text, max_kl, max_tokens}`: the quantized model against the unquantized one on
    # an evaluation text (None: the one shipped in aotlm/data), failing the build past max_kl.
    quality_text: Path | None = None
    quality_max_kl: float | None = None
    quality_tokens: int = fields.DEFAULT_QUALITY_TOKENS
    # `lora: {max_loras, max_rank, targets}`: adapter slots the graphs take as data
    # (aotlm/models/lora.py); None: no adapters.
    lora: LoraConfig | None = None

    @property
    def quantized(self) -> bool:
        return self.weights_quant is not None or self.kv_cache_dtype is not None

    @property
    def pages_per_seq(self) -> int:
        """Block-table width: pages one sequence of ``max_seq_len`` tokens can touch."""
        return math.ceil(self.max_seq_len / self.page_size) if self.page_size else 0


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
    except RecursionError:
        raise ConfigError(f"{path.name}: YAML nested too deeply for a model.yaml") from None
    _check_expanded_size(data, path.name)
    return parse_build_config(data, path)


def _check_expanded_size(data: Any, file_name: str) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_VALUES values (a "billion
    laughs" bomb, or a self-referencing alias): every later walk, and every error message that
    quotes a value, would otherwise take exponential time and memory."""
    stack, seen = [data], 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(
                f"{file_name}: the YAML expands to more than {MAX_YAML_VALUES} values "
                "(recursive or repeated aliases?); a model.yaml is a few dozen"
            )
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list | tuple | set):
            stack.extend(value)


def parse_build_config(data: dict, source: Path) -> BuildConfig:
    """Validate already-parsed YAML; ``source`` names errors and anchors a relative ``model``."""
    source = Path(source).absolute()
    check = Checker(source.name)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source.name}: expected a mapping of keys (model, dtype, ...) at the top level, "
            f"got {fields.type_name(data)}"
        )
    check.keys(data, "", _TOP_KEYS, _REQUIRED_TOP)

    name = data.get("name", source.stem)
    if not isinstance(name, str) or not name.strip():
        raise check.error("name", f"expected a non-empty string, got {name!r}")
    dtype = check.string(data["dtype"], "dtype")
    if dtype not in DTYPES:
        raise check.error("dtype", f"must be one of {', '.join(DTYPES)} (got {dtype!r})")
    max_seq_len = check.positive_int(data["max_seq_len"], "max_seq_len")
    model = fields.checkpoint_dir(check, data["model"], source.parent)
    tp, ep = fields.mesh(check, data.get("mesh"))
    if checkpoint_kind(model) == ENCODER:
        if tp * ep > 1:
            raise check.error(
                "mesh", "the checkpoint is an encoder (embedding model): it runs on one device"
            )
        return _encoder_config(check, data, source, model, name, dtype, max_seq_len)

    buckets = data["buckets"]
    planned = isinstance(buckets, Mapping) and "plan" in buckets
    if planned:
        check_plan_keys(buckets, check.where)
    else:
        check.keys(buckets, "buckets", _BUCKET_KEYS, _BUCKET_KEYS)
    page_size = check.positive_int(buckets["page_size"], "buckets.page_size")
    if page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise check.error(
            "buckets.page_size",
            f"must be a power of two between 1 and {MAX_PAGE_SIZE} (got {page_size})",
        )
    bucket_plan = None
    if planned:
        tokens, requests, bucket_plan = planned_ladders(
            buckets, check.where, max_seq_len, model, source.parent
        )
    else:
        tokens = ladder_from_spec(buckets["tokens"], check.where("buckets.tokens"))
        fields.check_at_most(check, "buckets.tokens", tokens, max_seq_len, "max_seq_len")
        requests = ladder_from_spec(buckets["requests"], check.where("buckets.requests"))
    # Every scheduled request contributes at least one token to a step.
    fields.check_at_most(
        check, "buckets.requests", requests, tokens[-1], "the largest token bucket"
    )

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

    weights_quant, kv_cache_dtype = fields.quantization(check, data.get("quantization"))
    quality_text, max_kl, quality_tokens = fields.quality(check, data.get("quality"), source.parent)
    prequantized = read_prequantized(model)
    if prequantized is not None:
        if weights_quant not in (None, prequantized.scheme):
            raise check.error(
                "quantization.weights",
                f"the checkpoint is pre-quantized to {prequantized.scheme} (compressed-tensors, "
                f"config.json quantization_config); got {weights_quant!r}: remove the key or "
                "use an unquantized checkpoint",
            )
        if "quality" in data and kv_cache_dtype is None:
            raise check.error(
                "quality",
                "the checkpoint is pre-quantized (compressed-tensors): there is no unquantized "
                "model to measure it against; build from the unquantized checkpoint to gate it "
                "(with quantization.kv_cache_dtype the gate measures the fp8 cache alone)",
            )
        weights_quant = prequantized.scheme
    elif "quality" in data and weights_quant is None and kv_cache_dtype is None:
        raise check.error(
            "quality", "measures a quantized model against the unquantized one: set quantization"
        )
    return BuildConfig(
        source=source,
        model=model,
        name=name,
        dtype=dtype,
        max_seq_len=max_seq_len,
        token_buckets=tokens,
        request_buckets=requests,
        page_size=page_size,
        kv_pages=kv_pages,
        targets=fields.targets(check, data.get("targets", list(DEFAULT_TARGETS))),
        memory_gib=fields.memory_gib(check, data.get("memory_gib")),
        bucket_plan=bucket_plan,
        tp=tp,
        ep=ep,
        attention_blocks=fields.attention_blocks(check, data.get("attention")),
        attention_cpu=fields.attention_cpu(check, data.get("attention")),
        decode_steps=fields.decode_steps(check, data.get("decode_steps", 1)),
        weights_quant=weights_quant,
        prequantized=prequantized,
        kv_cache_dtype=kv_cache_dtype,
        quality_text=quality_text,
        quality_max_kl=max_kl,
        quality_tokens=quality_tokens,
        lora=fields.lora(check, data.get("lora")),
    )


def with_targets(config: BuildConfig, targets: Sequence[str]) -> BuildConfig:
    """A copy of ``config`` that builds for ``targets`` (the ``aotlm build --target`` override)."""
    checked = fields.targets(Checker("aotlm build"), list(targets), key="--target")
    return dataclasses.replace(config, targets=checked)


def _encoder_config(
    check: Checker,
    data: Mapping,
    source: Path,
    model: Path,
    name: str,
    dtype: str,
    max_seq_len: int,
) -> BuildConfig:
    """An encoder (embedding model): `buckets.tokens` are sequence lengths, the largest being
    max_seq_len (a sequence runs whole in one graph), `buckets.requests` batch sizes; no KV."""
    buckets = data["buckets"]
    for key, given in (("kv_pages", data), ("decode_steps", data), ("buckets.page_size", buckets)):
        if isinstance(given, Mapping) and key.rsplit(".", 1)[-1] in given:
            raise check.error(
                key,
                "the checkpoint is an encoder (embedding model): it keeps no KV cache and "
                "generates no tokens, so this key does not apply; remove it",
            )
    if "lora" in data:
        raise check.error(
            "lora", "the checkpoint is an encoder (embedding model): adapters serve decoders"
        )
    if "quality" in data:
        raise check.error(
            "quality",
            "the gate's KL is over next-token distributions; an encoder's quantization is "
            "measured by its embeddings' cosine similarity (recorded, not gated)",
        )
    weights_quant, kv_cache_dtype = fields.quantization(check, data.get("quantization"))
    if kv_cache_dtype is not None:
        raise check.error(
            "quantization.kv_cache_dtype",
            "the checkpoint is an encoder (embedding model): it keeps no KV cache; remove it",
        )
    check.keys(buckets, "buckets", ("tokens", "requests"), ("tokens", "requests"))
    tokens = ladder_from_spec(buckets["tokens"], check.where("buckets.tokens"))
    fields.check_at_most(check, "buckets.tokens", tokens, max_seq_len, "max_seq_len")
    if tokens[-1] != max_seq_len:
        raise check.error(
            f"buckets.tokens[{len(tokens) - 1}]",
            f"an encoder runs each sequence whole, so the largest sequence-length bucket must "
            f"equal max_seq_len ({max_seq_len}) (got {tokens[-1]})",
        )
    return BuildConfig(
        source=source,
        model=model,
        name=name,
        dtype=dtype,
        max_seq_len=max_seq_len,
        token_buckets=tokens,
        request_buckets=ladder_from_spec(buckets["requests"], check.where("buckets.requests")),
        page_size=0,
        kv_pages=0,
        targets=fields.targets(check, data.get("targets", list(DEFAULT_TARGETS))),
        memory_gib=fields.memory_gib(check, data.get("memory_gib")),
        kind="encoder",
        weights_quant=weights_quant,
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # PyYAML's str() spans several lines; the CLI prints errors on one.
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f": {exc}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"
