"""The models aotlm supports, by kind and HF architecture: what a checkpoint is, what a bundle holds.

The serve side needs only this from a family: which config class reads the manifest's
`model.config`. model.yaml validation needs only a checkpoint's kind. The build side's family
table (aotlm/build/families.py: readers, checkpoint loaders, step functions) holds one of these
per family, so the sides cannot disagree about what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aotlm.bundle.manifest import DECODER, ENCODER, ModelInfo
from aotlm.errors import BundleError, CheckpointError
from aotlm.models.bert import EncoderConfig
from aotlm.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, load_json_object


@dataclass(frozen=True)
class Served:
    kind: str  # DECODER or ENCODER
    architectures: tuple[str, ...]
    config_from_dict: Callable[[dict], Any]  # manifest model.config -> the family's config
    # Claims a checkpoint whose architecture another entry also lists (a Qwen3ForCausalLM
    # exported by sentence-transformers with last-token pooling is an embedding model); the
    # entry without `detect` takes the rest.
    detect: Callable[[Path], bool] | None = None


DECODER_MODELS = Served(DECODER, tuple(SUPPORTED_ARCHITECTURES), ModelConfig.from_dict)
ENCODER_MODELS = Served(ENCODER, ("BertModel",), EncoderConfig.from_dict)
CATALOG = (DECODER_MODELS, ENCODER_MODELS)
# config.json without `architectures`: its model_type names the architecture.
_BY_MODEL_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()} | {
    "bert": "BertModel"
}


def supported_architectures() -> str:
    """'LlamaForCausalLM, ... (decoder); BertModel (encoder)' for error messages and docs."""
    return "; ".join(f"{', '.join(s.architectures)} ({s.kind})" for s in CATALOG)


def model_config(model: ModelInfo, where: Path | str) -> ModelConfig | EncoderConfig:
    """The config of the model a bundle holds; BundleError when this aotlm does not serve it."""
    served = next(
        (s for s in CATALOG if s.kind == model.kind and model.architecture in s.architectures),
        None,
    )
    if served is None:
        raise BundleError(
            f"{where}: model architecture {model.architecture!r} ({model.kind}) is not one this "
            f"aotlm serves ({supported_architectures()}): upgrade aotlm or rebuild the bundle"
        )
    return served.config_from_dict(dict(model.config))


def checkpoint_architecture(checkpoint_dir: Path) -> str | None:
    """The architecture named by a checkpoint's config.json (None when it names none)."""
    data = load_json_object(Path(checkpoint_dir) / "config.json")
    archs = data.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return _BY_MODEL_TYPE.get(data.get("model_type"))  # type: ignore[arg-type]


def served_for_checkpoint(arch: str | None, checkpoint_dir: Path) -> Served | None:
    """The entry for `arch`: one whose `detect` claims the checkpoint, else the plain one."""
    matches = [s for s in CATALOG if arch in s.architectures]
    claimed = [s for s in matches if s.detect is not None and s.detect(checkpoint_dir)]
    plain = [s for s in matches if s.detect is None]
    return (claimed or plain or [None])[0]


def checkpoint_kind(checkpoint_dir: Path) -> str | None:
    """DECODER or ENCODER for a supported checkpoint; None when unreadable or unsupported
    (model.yaml validation uses it; the build then reports the problem in full)."""
    try:
        served = served_for_checkpoint(checkpoint_architecture(checkpoint_dir), checkpoint_dir)
    except CheckpointError:
        return None
    return served.kind if served else None
