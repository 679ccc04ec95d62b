"""Which code builds and serves a checkpoint: one small registry keyed by HF architecture name.

A family says what *kind* of model it is and hands the build and the loader everything they need
without either of them knowing the family:

- kind ``decoder``: text generation over a paged KV cache; step functions ``forward[T]``,
  ``logits[T,R]``, ``sample[R]`` (aotlm/build/steps.py, signatures.py).
- kind ``encoder``: the embedding path; one step function ``embed[S,B]``, a whole padded batch of
  B sequences of S tokens in one graph, no KV cache (aotlm/build/embed_steps.py). Its signature,
  ``embed(params, input_ids i32[B,S], attention_mask i32[B,S], token_type_ids i32[B,S]) ->
  f32[B,H]``, does not depend on the network inside: a decoder-based embedding model (e.g.
  Qwen3-Embedding, causal attention + last-token pooling) is one more family of this kind with
  its own config reader, checkpoint loader, abstract params and ``embed`` function.

``family_for_checkpoint`` is the only lookup; an unsupported architecture is an error that lists
every supported one. This is build glue: the serve side reads a bundle through
aotlm/models/catalog.py, which this table takes its architectures and config classes from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotlm.build import embed_steps
from aotlm.build.memory_plan import nbytes
from aotlm.build.model_yaml import BuildConfig
from aotlm.build.signatures import StepSpec, kv_pages_aval, step_specs
from aotlm.build.steps import step_functions
from aotlm.bundle.manifest import DECODER, ENCODER
from aotlm.errors import CheckpointError
from aotlm.models import bert, bert_checkpoint, checkpoint, llama
from aotlm.models.catalog import (
    DECODER_MODELS,
    ENCODER_MODELS,
    Served,
    checkpoint_architecture,
    checkpoint_kind,
    served_for_checkpoint,
    supported_architectures,
)
from aotlm.models.config import (
    ModelConfig,
    read_hf_config,
)

__all__ = [
    "DECODER",
    "ENCODER",
    "ModelFamily",
    "checkpoint_kind",
    "family_for_checkpoint",
    "supported_architectures",
]


@dataclass(frozen=True)
class ModelFamily:
    """Everything the build needs for one family of checkpoints (configs are frozen
    dataclasses with ``architecture``, ``max_position_embeddings`` and ``to_dict``)."""

    name: str
    served: Served  # kind, architectures, config class: what serving knows of the family
    read_config: Callable[[Path], Any]  # checkpoint dir -> config
    load_checkpoint: Callable[[Path, Any, str], dict]  # (dir, config, dtype) -> numpy params
    # (config, dtype, weight quantization scheme or None, kv_cache_dtype or None)
    # -> ShapeDtypeStructs
    abstract_params: Callable[[Any, str, str | None, str | None], dict]
    step_functions: Callable[[Any], dict[str, Callable]]  # config -> {name: pure function}
    step_specs: Callable[[Any, BuildConfig], list[StepSpec]]  # every (function, bucket)
    kv_pool_bytes: Callable[[Any, BuildConfig], int]  # device bytes of the KV cache
    manifest_extra: Callable[[Any], dict] = field(default=lambda cfg: {})  # into model.*
    # (config, tp, ep) -> step functions for a mesh of tp * ep devices (model.yaml
    # `mesh: {tp: N, ep: M}`, aotlm/models/sharding.py); None: the family runs on one device.
    sharded_step_functions: Callable[[Any, int, int], dict[str, Callable]] | None = None

    @property
    def kind(self) -> str:
        return self.served.kind

    @property
    def architectures(self) -> tuple[str, ...]:
        return self.served.architectures


def _decoder_kv_bytes(cfg: ModelConfig, build: BuildConfig) -> int:
    return 2 * nbytes(kv_pages_aval(cfg, build))


DECODERS = ModelFamily(
    name="llama",
    served=DECODER_MODELS,
    read_config=read_hf_config,
    load_checkpoint=checkpoint.load_checkpoint,
    abstract_params=llama.abstract_params,
    step_functions=step_functions,
    step_specs=step_specs,
    kv_pool_bytes=_decoder_kv_bytes,
    sharded_step_functions=step_functions,
)

BERT = ModelFamily(
    name="bert",
    served=ENCODER_MODELS,
    read_config=bert.read_encoder_config,
    load_checkpoint=bert_checkpoint.load_encoder_checkpoint,
    abstract_params=bert.abstract_params,
    step_functions=lambda cfg: {"embed": functools.partial(bert.embed, cfg)},
    step_specs=functools.partial(embed_steps.embed_step_specs, bert.abstract_params),
    kv_pool_bytes=lambda cfg, build: 0,
    manifest_extra=lambda cfg: {"pooling": cfg.pooling, "normalize": cfg.normalize},
)

FAMILIES: tuple[ModelFamily, ...] = (DECODERS, BERT)


def family_for_checkpoint(checkpoint_dir: Path) -> ModelFamily:
    """The family that builds `checkpoint_dir` (CheckpointError listing all when none does)."""
    arch = checkpoint_architecture(checkpoint_dir)
    served = served_for_checkpoint(arch, Path(checkpoint_dir))
    family = next((f for f in FAMILIES if f.served is served), None)
    if family is None:
        raise CheckpointError(
            f"{Path(checkpoint_dir) / 'config.json'}: unsupported architecture {arch!r}; "
            f"supported: {supported_architectures()}"
        )
    return family
