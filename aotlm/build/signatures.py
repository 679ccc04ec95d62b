"""Abstract inputs of every step function at every bucket: shapes and dtypes only, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from aotlm.build.model_yaml import BuildConfig
from aotlm.bundle.manifest import kv_dtype_name
from aotlm.kernels.sampling import bitmask_words
from aotlm.kernels.step_inputs import DecodeRows, Penalties, Sampling, TokenMask
from aotlm.models import ModelConfig, abstract_params
from aotlm.models.llama import layer_shapes, param_specs
from aotlm.models.lora import abstract_lora
from aotlm.models.sharding import REPLICATED, abstract_mesh, kv_spec, with_shardings

I32 = jnp.int32
F32 = jnp.float32


@dataclass(frozen=True)
class StepSpec:
    """One (function, bucket) pair to export."""

    name: str
    bucket: dict[str, int]
    args: tuple[Any, ...]  # ShapeDtypeStructs; on a mesh each carries its NamedSharding
    out_shardings: Any = None  # on a mesh: the outputs' NamedShardings; None: one device

    @property
    def file(self) -> str:
        suffix = "_".join(f"{k[0]}{v}" for k, v in sorted(self.bucket.items(), reverse=True))
        return f"exported/{self.name}_{suffix}.jaxexp"


def _s(shape: tuple[int, ...], dtype, sharding: NamedSharding | None = None):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def kv_pages_aval(cfg: ModelConfig, build: BuildConfig) -> jax.ShapeDtypeStruct:
    """One KV page pool; on a mesh (``mesh: {tp: N}``) with its sharding over the KV heads."""
    shape = (cfg.num_layers, build.kv_pages, build.page_size, cfg.num_kv_heads, cfg.head_dim)
    sharding = None
    if build.tp * build.ep > 1:
        sharding = NamedSharding(abstract_mesh(build.tp, build.ep), kv_spec(cfg, build.tp))
    return _s(shape, jnp.dtype(kv_dtype(build)), sharding)


def kv_dtype(build: BuildConfig) -> str:
    return kv_dtype_name(build.dtype, build.kv_cache_dtype)


def params_avals(cfg: ModelConfig, build: BuildConfig) -> dict:
    """The abstract params; on a mesh each carries its sharding (Megatron layout)."""
    quant = (build.weights_quant, build.kv_cache_dtype)
    params = abstract_params(cfg, build.dtype, *quant)
    if build.lora is not None:  # the adapter slots, zeros until the server loads adapters
        params["lora"] = abstract_lora(layer_shapes(cfg), build.lora, build.dtype)
    if build.tp * build.ep > 1:
        specs = param_specs(cfg, build.tp, build.ep, *quant)
        return with_shardings(params, specs, abstract_mesh(build.tp, build.ep))
    return params


def _on_mesh(spec: StepSpec, tp: int, ep: int) -> StepSpec:
    """``spec`` on a mesh: the inputs without a sharding yet (all but forward's params and KV
    pages) and the outputs (but forward's KV pages, updated in place) replicated."""
    replicated = NamedSharding(abstract_mesh(tp, ep), REPLICATED)

    def place(a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        return a if a.sharding is not None else _s(a.shape, a.dtype, replicated)

    args = jax.tree.map(place, spec.args)
    out = replicated
    if spec.name == "forward":
        out = (replicated, args[1].sharding, args[2].sharding)
    elif spec.name == "decode":
        out = (replicated,) * 4 + (args[1].sharding, args[2].sharding)
    return StepSpec(spec.name, spec.bucket, args, out)


def adapters(build: BuildConfig, n: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The LoRA slot per token (forward) or row (decode), i32[n], in a bundle with ``lora``."""
    return (_s((n,), I32),) if build.lora is not None else ()


def head_aval(cfg: ModelConfig, build: BuildConfig) -> jax.ShapeDtypeStruct:
    return _s((cfg.vocab_size, cfg.hidden_size), jnp.dtype(build.dtype))


def step_specs(cfg: ModelConfig, build: BuildConfig) -> list[StepSpec]:
    """forward per token bucket, logits per (token, request) pair, sample, sample_penalized and
    sample_masked per request bucket (the second also takes each row's tokens, i32[R,
    max_seq_len], the third those and a token bitmask, i32[R, ceil(V/32)]), and with
    ``decode_steps`` > 1 decode per request bucket."""
    params = params_avals(cfg, build)
    kv = kv_pages_aval(cfg, build)
    r_max = max(build.request_buckets)
    dt = jnp.dtype(build.dtype)
    specs = []
    for t in build.token_buckets:
        tok = _s((t,), I32)
        tables = _s((r_max, build.pages_per_seq), I32)
        args = (params, kv, kv, tok, tok, tok, tok, tables)
        specs.append(StepSpec("forward", {"tokens": t}, args + adapters(build, t)))
    head = head_aval(cfg, build)
    for t in build.token_buckets:
        for r in build.request_buckets:
            hidden = _s((t, cfg.hidden_size), dt)
            specs.append(
                StepSpec("logits", {"tokens": t, "requests": r}, (head, hidden, _s((r,), I32)))
            )
    for r in build.request_buckets:
        logits, sampling = _s((r, cfg.vocab_size), F32), Sampling.avals(r)
        specs.append(StepSpec("sample", {"requests": r}, (logits, sampling)))
        penalties = Penalties.avals(r, max_seq_len=build.max_seq_len)
        specs.append(StepSpec("sample_penalized", {"requests": r}, (logits, sampling, penalties)))
        mask = TokenMask.avals(r, mask_words=bitmask_words(cfg.vocab_size))
        args = (logits, sampling, penalties, mask)
        specs.append(StepSpec("sample_masked", {"requests": r}, args))
    if build.decode_steps > 1:
        for r in build.request_buckets:
            rows = DecodeRows.avals(r, pages_per_seq=build.pages_per_seq)
            args = (params, kv, kv, rows, Sampling.avals(r), _s((), I32))
            specs.append(StepSpec("decode", {"requests": r}, args + adapters(build, r)))
    if build.tp * build.ep > 1:
        return [_on_mesh(spec, build.tp, build.ep) for spec in specs]
    return specs
