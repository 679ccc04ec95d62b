"""Which code builds and serves a checkpoint: one small registry keyed by HF architecture name.

A family says what *kind* of model it is and hands the build and the loader everything they need
without either of them knowing the family:

- kind ``decoder``: text generation over a paged KV cache; step functions ``forward[T]``,
  ``logits[T,R]``, ``sample[R]`` (aotlm/trace/steps.py, signatures.py).
- kind ``encoder``: the embedding path; one step function ``embed[S,B]``, a whole padded batch of
  B sequences of S tokens in one graph, no KV cache (aotlm/trace/embed.py). Its signature,
  ``embed(params, input_ids i32[B,S], attention_mask i32[B,S], token_type_ids i32[B,S]) ->
  f32[B,H]``, does not depend on the network inside: a decoder-based embedding model (e.g.
  Qwen3-Embedding, causal attention + last-token pooling) is one more family of this kind with
  its own config reader, checkpoint loader, abstract params and ``embed`` function.

``family_for_checkpoint`` and ``family_for_manifest`` are the only lookups; an unsupported
architecture is an error that lists every supported one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotlm.config import BuildConfig
from aotlm.errors import BundleError, CheckpointError
from aotlm.models import bert, bert_checkpoint, checkpoint, llama
from aotlm.models.config import (
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    load_json_object,
    read_hf_config,
)
from aotlm.trace import embed as embed_trace
from aotlm.trace.memory import nbytes
from aotlm.trace.signatures import StepSpec, kv_pages_aval, step_specs
from aotlm.trace.steps import step_functions

DECODER = "decoder"
ENCODER = "encoder"
KINDS = (DECODER, ENCODER)


@dataclass(frozen=True)
class ModelFamily:
    """Everything build and load need for one family of checkpoints (configs are frozen
    dataclasses with ``architecture``, ``max_position_embeddings`` and ``to_dict``)."""

    name: str
    kind: str  # DECODER or ENCODER
    architectures: tuple[str, ...]
    read_config: Callable[[Path], Any]  # checkpoint dir -> config
    config_from_dict: Callable[[dict], Any]  # manifest model.config -> config
    load_checkpoint: Callable[[Path, Any, str], dict]  # (dir, config, dtype) -> numpy params
    abstract_params: Callable[[Any, str], dict]  # (config, dtype) -> ShapeDtypeStructs
    step_functions: Callable[[Any], dict[str, Callable]]  # config -> {name: pure function}
    step_specs: Callable[[Any, BuildConfig], list[StepSpec]]  # every (function, bucket)
    kv_pool_bytes: Callable[[Any, BuildConfig], int]  # device bytes of the KV cache
    manifest_extra: Callable[[Any], dict] = field(default=lambda cfg: {})  # into model.*
    # Claims a checkpoint whose architecture another family also lists (a Qwen3ForCausalLM
    # exported by sentence-transformers with last-token pooling is an embedding model); the
    # family without `detect` takes the rest.
    detect: Callable[[Path], bool] | None = None
    # (config, tp) -> step functions for a tensor-parallel mesh of tp devices (model.yaml
    # `mesh: {tp: N}`, aotlm/models/sharding.py); None: the family runs on one device only.
    sharded_step_functions: Callable[[Any, int], dict[str, Callable]] | None = None


def _decoder_kv_bytes(cfg: ModelConfig, build: BuildConfig) -> int:
    return 2 * nbytes(kv_pages_aval(cfg, build))


DECODERS = ModelFamily(
    name="llama",
    kind=DECODER,
    architectures=tuple(SUPPORTED_ARCHITECTURES),
    read_config=read_hf_config,
    config_from_dict=ModelConfig.from_dict,
    load_checkpoint=checkpoint.load_checkpoint,
    abstract_params=llama.abstract_params,
    step_functions=step_functions,
    step_specs=step_specs,
    kv_pool_bytes=_decoder_kv_bytes,
    sharded_step_functions=step_functions,
)

BERT = ModelFamily(
    name="bert",
    kind=ENCODER,
    architectures=("BertModel",),
    read_config=bert.read_encoder_config,
    config_from_dict=bert.EncoderConfig.from_dict,
    load_checkpoint=bert_checkpoint.load_encoder_checkpoint,
    abstract_params=bert.abstract_params,
    step_functions=lambda cfg: {"embed": functools.partial(bert.embed, cfg)},
    step_specs=functools.partial(embed_trace.embed_step_specs, bert.abstract_params),
    kv_pool_bytes=lambda cfg, build: 0,
    manifest_extra=lambda cfg: {"pooling": cfg.pooling, "normalize": cfg.normalize},
)

FAMILIES: tuple[ModelFamily, ...] = (DECODERS, BERT)
# config.json without `architectures`: its model_type names the family.
_BY_MODEL_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()} | {
    "bert": "BertModel"
}


def supported_architectures() -> str:
    """'LlamaForCausalLM, ... (decoder); BertModel (encoder)' for error messages and docs."""
    return "; ".join(
        f"{', '.join(f.architectures)} ({f.kind})" for f in FAMILIES if f.architectures
    )


def checkpoint_architecture(checkpoint_dir: Path) -> str | None:
    """The architecture named by a checkpoint's config.json (None when it names none)."""
    data = load_json_object(Path(checkpoint_dir) / "config.json")
    archs = data.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return _BY_MODEL_TYPE.get(data.get("model_type"))  # type: ignore[arg-type]


def _lookup(arch: str | None, checkpoint_dir: Path) -> ModelFamily | None:
    """The family for `arch`: one whose `detect` claims the checkpoint, else the plain one."""
    matches = [f for f in FAMILIES if arch in f.architectures]
    claimed = [f for f in matches if f.detect is not None and f.detect(checkpoint_dir)]
    plain = [f for f in matches if f.detect is None]
    return (claimed or plain or [None])[0]


def family_for_checkpoint(checkpoint_dir: Path) -> ModelFamily:
    """The family that builds `checkpoint_dir` (CheckpointError listing all when none does)."""
    arch = checkpoint_architecture(checkpoint_dir)
    family = _lookup(arch, Path(checkpoint_dir))
    if family is None:
        raise CheckpointError(
            f"{Path(checkpoint_dir) / 'config.json'}: unsupported architecture {arch!r}; "
            f"supported: {supported_architectures()}"
        )
    return family


def checkpoint_kind(checkpoint_dir: Path) -> str | None:
    """DECODER or ENCODER for a supported checkpoint; None when unreadable or unsupported
    (model.yaml validation uses it; the build then reports the problem in full)."""
    try:
        family = _lookup(checkpoint_architecture(checkpoint_dir), Path(checkpoint_dir))
    except CheckpointError:
        return None
    return family.kind if family else None


def manifest_kind(manifest: dict) -> str:
    """A bundle's model kind; bundles written before format 3 are decoders."""
    return manifest["model"].get("kind", DECODER)


def family_for_manifest(manifest: dict, where: Path | str) -> ModelFamily:
    """The family that loads a bundle, by the architecture and kind its manifest records."""
    arch, kind = manifest["model"].get("architecture"), manifest_kind(manifest)
    family = next((f for f in FAMILIES if arch in f.architectures and f.kind == kind), None)
    if family is None:
        raise BundleError(
            f"{where}: model architecture {arch!r} ({kind}) is not one this "
            f"aotlm serves ({supported_architectures()}): upgrade aotlm or rebuild the bundle"
        )
    return family
