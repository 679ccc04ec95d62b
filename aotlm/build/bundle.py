"""`aotlm build`: model.yaml -> bundle. Traces from abstract shapes; real weights are only copied."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

import aotlm
from aotlm.build import quality
from aotlm.build.cache import BuildCache
from aotlm.build.export import aval_list, shardings_entry, target_platforms
from aotlm.build.families import DECODER, ModelFamily, family_for_checkpoint
from aotlm.build.memory_plan import check_plan, memory_plan, nbytes
from aotlm.build.model_yaml import BuildConfig
from aotlm.build.signatures import kv_dtype, params_avals
from aotlm.build.step_builder import Progress, StepBuilder, build_steps, compiled_file
from aotlm.build.steps import DONATE_ARGNUMS
from aotlm.build.targets import COMPILED, STABLEHLO, Target, TargetPlan, plan_target
from aotlm.bundle import write_bundle
from aotlm.bundle.built_here import BuiltHere
from aotlm.bundle.format import WEIGHTS_FILE
from aotlm.bundle.manifest import (
    Attention,
    Buckets,
    CompiledTarget,
    Executable,
    Function,
    Manifest,
    ModelInfo,
    Serving,
    TargetEntry,
)
from aotlm.errors import CheckpointError, ConfigError
from aotlm.kernels.cpu_attention import TARGET as CPU_ATTENTION_TARGET
from aotlm.kernels.paged_attention_pallas import BlockSizes
from aotlm.models import ModelConfig
from aotlm.models import compressed_tensors as ct
from aotlm.models.checkpoint import flatten_params
from aotlm.models.lora import MLP_TARGETS
from aotlm.models.quantize import KEPT, quantize_params, weights_by_kind
from aotlm.models.sharding import check_mesh
from aotlm.safetensors_io import serialize_safetensors
from aotlm.state_dir import default_cache_dir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    digest: str
    functions: list[dict]  # name, bucket, file, size, seconds
    seconds: float
    total_bytes: int
    targets: dict = field(default_factory=dict)  # name -> tier, reason, memory_plan
    exported: int = 0  # functions exported in this build (not taken from the build cache)
    compiled: int = 0  # executables compiled in this build
    cached: int = 0  # exports and executables taken from the build cache


def check_model_fits(build: BuildConfig, cfg: ModelConfig) -> None:
    name = build.source.name
    if build.max_seq_len > cfg.max_position_embeddings:
        raise ConfigError(
            f"{name}: max_seq_len: {build.max_seq_len} is longer than the checkpoint's "
            f"max_position_embeddings ({cfg.max_position_embeddings})"
        )
    if build.lora is not None:
        if cfg.is_gemma:
            raise ConfigError(f"{name}: lora: not supported for Gemma 3 yet; remove lora")
        if build.tp * build.ep > 1:
            raise ConfigError(f"{name}: lora: not supported with a mesh yet; remove mesh or lora")
        mlp = [t for t in build.lora.targets if t in MLP_TARGETS]
        if cfg.is_moe and mlp:
            raise ConfigError(
                f"{name}: lora.targets: {', '.join(mlp)}: a mixture-of-experts layer has no "
                "dense MLP to adapt (its experts are not LoRA targets); list attention "
                "projections only"
            )


def tokenizer_files(checkpoint: Path) -> dict[str, bytes]:
    """tokenizer.json is required; the chat template comes from its own file or tokenizer_config."""
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(
            f"{checkpoint / 'tokenizer.json'}: missing (aotlm needs a fast tokenizer)"
        )
    files = {
        f"tokenizer/{n}": (checkpoint / n).read_bytes()
        for n in TOKENIZER_FILES
        if (checkpoint / n).is_file()
    }
    if "tokenizer/chat_template.jinja" not in files and "tokenizer/tokenizer_config.json" in files:
        template = json.loads(files["tokenizer/tokenizer_config.json"]).get("chat_template")
        if isinstance(template, str):
            files["tokenizer/chat_template.jinja"] = template.encode()
    return files


def _target_entries(
    build, plans, steps, resident
) -> tuple[dict[str, CompiledTarget], dict[str, TargetEntry]]:
    """(manifest `compiled`, manifest `targets`); checks each target's memory plan."""
    compiled, targets = {}, {}
    for plan in plans:
        t = plan.target
        execs = None
        if plan.tier == COMPILED:
            entries = tuple(
                Executable(
                    s.spec.name, s.spec.bucket, compiled_file(t, s.spec), s.compiled[t.name][1]
                )
                for s in steps
            )
            compiled[t.name] = CompiledTarget(plan.fingerprint, entries)
            execs = {e.file: e.memory for e in entries}
        mem = memory_plan(t, build, *resident, execs)
        check_plan(t, build, mem)
        targets[t.name] = TargetEntry(plan.tier, plan.reason, mem)
    return compiled, targets


def _serving(build: BuildConfig, cfg, family: ModelFamily, platforms: tuple[str, ...]) -> Serving:
    """The manifest's serving shape; only decoders have a KV cache (page size, page count)."""
    common = dict(
        dtype=build.dtype,
        max_seq_len=build.max_seq_len,
        targets=tuple(build.targets),
        platforms=tuple(platforms),
        tp=build.tp,
        ep=build.ep,
    )
    if family.kind != DECODER:
        return Serving(**common)
    return Serving(
        **common,
        page_size=build.page_size,
        kv_pages=build.kv_pages,
        pages_per_seq=build.pages_per_seq,
        decode_steps=build.decode_steps,
        attention=_attention(build, cfg),
        kv_cache_dtype=build.kv_cache_dtype,
        kv_pages_dtype=kv_dtype(build),
        lora=build.lora.to_dict() if build.lora is not None else None,
    )


def _attention(build: BuildConfig, cfg) -> Attention:
    """What a decoder's attention runs per platform: the Pallas kernel's resolved block sizes
    (TPU), aotlm's CPU kernel or the blocked jnp path (CPU), and the custom calls a loader must
    have registered before it deserializes the graphs."""
    platforms = target_platforms(build.targets)
    cpu_kernel = build.attention_cpu == "kernel" and "cpu" in platforms
    if cpu_kernel and cfg.head_dim % 8:
        raise ConfigError(
            f"{build.source.name}: attention.cpu: the CPU kernel needs a head_dim that is a "
            f"multiple of 8 (this model's is {cfg.head_dim}); set `attention: {{cpu: jnp}}`"
        )
    try:
        blocks = BlockSizes(*build.attention_blocks).resolve(
            group=cfg.num_heads // cfg.num_kv_heads,
            page_size=build.page_size,
            pages_per_seq=build.pages_per_seq,
            kv_row_bytes=cfg.num_kv_heads * cfg.head_dim * jnp.dtype(kv_dtype(build)).itemsize,
            q_dtype=build.dtype,
        )
    except ValueError as e:
        raise ConfigError(f"{build.source.name}: attention: {e}") from None
    return Attention(
        impl=f"pallas on tpu, {build.attention_cpu} on cpu, blocked jnp on gpu",
        kernel="aotlm_ragged_paged_attention",
        block_sizes=blocks.as_dict(),
        cpu=build.attention_cpu,
        custom_calls=(CPU_ATTENTION_TARGET,) if cpu_kernel else (),
    )


def _weights(family: ModelFamily, cfg, build: BuildConfig, tokenizer_json: bytes):
    """(the params to write, the manifest's quantization record) of a quantized build, with
    the quality gate's figures (aotlm/build/quality.py)."""
    params = reference = family.load_checkpoint(build.model, cfg, build.dtype)
    record = {"weights": build.weights_quant, "kv_cache_dtype": build.kv_cache_dtype}
    if build.prequantized is not None:  # read as stored: only the fp8 cache to compare
        record |= {"source": "checkpoint", "kept": KEPT} | ct.summary(build.prequantized)
    else:
        params = quantize_params(params, build.weights_quant)
        record |= {"source": "aotlm build", "kept": KEPT}
    if family.kind != DECODER:
        figures = quality.measure_encoder(family, cfg, build, reference, params, tokenizer_json)
        return params, _present(record | {"quality": figures})
    if build.kv_cache_dtype is not None:  # calibrated on the model as it will serve
        tokens, source = quality.gate_tokens(build, tokenizer_json)
        scales = quality.kv_scales(cfg, build, params, tokens)
        params = {**params, "kv_scale": scales}
        record["kv_scales"] = {"text": source, "tokens": len(tokens), "max": float(scales.max())}
    elif build.prequantized is not None:
        return params, _present(record)
    kv = (jnp.dtype(build.dtype), jnp.dtype(kv_dtype(build)))
    figures = quality.measure(cfg, build, reference, params, tokenizer_json, kv)
    quality.check(build, figures)
    return params, _present(record | {"quality": figures})


def _present(record: dict) -> dict:
    return {k: v for k, v in record.items() if v is not None}


def _abstract_params(family: ModelFamily, cfg, build: BuildConfig) -> dict:
    return family.abstract_params(cfg, build.dtype, build.weights_quant, build.kv_cache_dtype)


def _buckets(build: BuildConfig) -> Buckets:
    """The ladders, and the plan that chose them when model.yaml gave `buckets.plan`."""
    plan = json.loads(build.bucket_plan) if build.bucket_plan is not None else None
    return Buckets(tuple(build.token_buckets), tuple(build.request_buckets), plan)


def build_bundle(
    build: BuildConfig,
    out_dir: Path | str,
    *,
    jobs: int = 1,
    progress: Progress | None = None,
    cache_dir: Path | str | None = None,
    use_cache: bool = True,
    compile_targets: bool = True,
) -> BuildResult:
    """Export every bucket, compile it for each target that can be compiled here, write a bundle.

    `cache_dir` (default: aotlm.state_dir.default_cache_dir()) holds the build cache and the record
    of bundles built here; `use_cache=False` recomputes everything; `compile_targets=False`
    writes the StableHLO tier only.
    """
    start = time.perf_counter()
    family = family_for_checkpoint(build.model)
    if family.kind != build.kind:
        raise ConfigError(
            f"{build.source.name}: model: the checkpoint is a {family.kind} ({family.name}) but "
            f"the config was validated as a {build.kind}: load it with load_build_config"
        )
    cfg = family.read_config(build.model)
    check_model_fits(build, cfg)
    if build.tp * build.ep > 1:
        if family.sharded_step_functions is None:
            raise ConfigError(
                f"{build.source.name}: mesh: {family.name} models run on one device; remove mesh"
            )
        check_mesh(cfg, build.tp, f"{build.source.name}: mesh.tp", build.ep)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    targets = [Target.parse(t) for t in build.targets]
    if compile_targets:
        plans = [plan_target(t, build.tp, build.ep) for t in targets]
    else:
        plans = [TargetPlan(t, STABLEHLO, "compiled tier not requested") for t in targets]
    files = tokenizer_files(build.model)
    specs = family.step_specs(cfg, build)
    # On a mesh: each device's shards; with LoRA the slots too (params_avals adds them).
    with_slots = build.tp * build.ep > 1 or build.lora is not None
    params_per_device = params_avals(cfg, build) if with_slots else None
    resident = (
        nbytes(
            params_per_device
            or family.abstract_params(cfg, build.dtype, build.weights_quant, build.kv_cache_dtype)
        ),
        family.kv_pool_bytes(cfg, build),
    )
    for plan in plans:  # fail before compiling anything when weights + KV alone do not fit
        check_plan(plan.target, build, memory_plan(plan.target, build, *resident, None))
    params = quantization = None
    if build.quantized:  # the quality gate fails the build before any export
        params, quantization = _weights(family, cfg, build, files["tokenizer/tokenizer.json"])
    builder = StepBuilder(family, cfg, build, plans, BuildCache(cache_root) if use_cache else None)
    steps = build_steps(builder, specs, jobs, progress)
    compiled, target_entries = _target_entries(build, plans, steps, resident)
    if params is None:  # unquantized: read the checkpoint only now, after the exports
        params = family.load_checkpoint(build.model, cfg, build.dtype)
    files[WEIGHTS_FILE] = serialize_safetensors(flatten_params(params))
    del params
    functions = []
    for s in steps:
        files[s.spec.file] = s.export
        for plan in builder.plans:
            files[compiled_file(plan.target, s.spec)] = s.compiled[plan.target.name][0]
        functions.append(
            Function(
                name=s.spec.name,
                bucket=s.spec.bucket,
                file=s.spec.file,
                donate_argnums=tuple(DONATE_ARGNUMS[s.spec.name]),
                in_avals=aval_list(s.exp.in_avals),
                out_avals=aval_list(s.exp.out_avals),
                shardings=shardings_entry(s.exp) or None,
            )
        )
    manifest = Manifest(
        name=build.name,
        model=ModelInfo(
            kind=family.kind,
            architecture=cfg.architecture,
            config=cfg.to_dict(),
            **family.manifest_extra(cfg),
        ),
        serving=_serving(build, cfg, family, builder.platforms),
        buckets=_buckets(build),
        functions=tuple(functions),
        compiled=compiled,
        targets=target_entries,
        aotlm_version=aotlm.__version__,
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        weights=weights_by_kind(
            family.abstract_params(cfg, build.dtype, build.weights_quant, build.kv_cache_dtype)
        ),
        quantization=quantization,
    )
    digest = write_bundle(out_dir, manifest, files)
    BuiltHere(cache_root).record(digest, Path(out_dir))
    wire = manifest.to_dict()
    rows = [
        {**f, "size": len(files[f["file"]]), "seconds": s.seconds}
        for f, s in zip(wire["functions"], steps, strict=True)
    ]
    return BuildResult(
        out_dir=Path(out_dir),
        digest=digest,
        functions=rows,
        seconds=time.perf_counter() - start,
        total_bytes=sum(len(b) for b in files.values()),
        targets=wire["targets"],
        exported=sum(s.exported for s in steps),
        compiled=sum(s.compiled_count for s in steps),
        cached=sum(1 + len(s.compiled) - s.exported - s.compiled_count for s in steps),
    )
