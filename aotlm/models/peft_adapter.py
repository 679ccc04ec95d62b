"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for a bundle's slots.

Checked before anything is loaded, each failure naming the file and the field: the config's
``peft_type`` is LORA, its rank fits ``max_rank``, its target modules are among the bundle's
``lora.targets``, nothing it needs is unsupported (DoRA, per-module rank or alpha patterns,
trained biases, ``modules_to_save``, fan-in-fan-out weights), and every tensor has the shape the
bundle's model gives that module (an adapter made for another base fails here). The weights are
returned per params name as (A ``[L, r, in]``, B ``[L, out, r]`` times the scaling) float32, a
layer the adapter leaves out (PEFT's ``layers_to_transform``) as zeros.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aotlm.errors import AdapterError, CheckpointError
from aotlm.models.lora import TARGETS, LoraConfig
from aotlm.safetensors_io import read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(
    r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# Config keys whose non-default values change what the adapter computes beyond A, B and alpha.
_UNSUPPORTED = {
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "modules_to_save": None,
    "fan_in_fan_out": False,
    "bias": "none",
}


@dataclass(frozen=True)
class Adapter:
    """One PEFT LoRA adapter, as the slots take it."""

    path: Path
    rank: int
    scaling: float
    base_model: str | None  # adapter_config's base_model_name_or_path, as written
    updates: dict[str, tuple[np.ndarray, np.ndarray]]  # params name -> (A, B * scaling)


def _fail(path: Path, what: str) -> AdapterError:
    return AdapterError(f"{path}: {what}")


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _fail(path, "missing (a PEFT adapter directory holds adapter_config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(path, "expected a JSON object")
    return config


def _targets(path: Path, config: dict) -> tuple[str, ...]:
    targets = config.get("target_modules")
    if targets == "all-linear":
        return tuple(TARGETS)
    if isinstance(targets, str) or not targets:
        raise _fail(path, f"target_modules: expected a list of module names, got {targets!r}")
    return tuple(str(t) for t in targets)


def read_adapter(
    directory: str | Path, layer_shapes: dict[str, tuple[int, ...]], lora: LoraConfig
) -> Adapter:
    """The adapter in ``directory`` for a model of ``layer_shapes`` (llama.layer_shapes) under the
    bundle's ``lora`` config; AdapterError naming the file and field when it does not fit."""
    directory = Path(directory)
    config = read_config(directory)
    cpath = directory / CONFIG_FILE
    if config.get("peft_type") != "LORA":
        raise _fail(cpath, f"peft_type: expected LORA, got {config.get('peft_type')!r}")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, [], {}):
            raise _fail(cpath, f"{key}: {config[key]!r} is not supported")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise _fail(cpath, f"r: expected a positive integer, got {rank!r}")
    if rank > lora.max_rank:
        raise _fail(cpath, f"r: {rank} exceeds the bundle's lora.max_rank {lora.max_rank}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise _fail(cpath, f"lora_alpha: expected a number, got {alpha!r}")
    targets = _targets(cpath, config)
    outside = [t for t in targets if t not in lora.targets]
    if outside:
        raise _fail(
            cpath,
            f"target_modules: {', '.join(outside)} not among the bundle's lora.targets "
            f"({', '.join(lora.targets)})",
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    wpath = directory / WEIGHTS_FILE
    if not wpath.is_file():
        raise _fail(wpath, "missing (PEFT's save_pretrained writes adapter_model.safetensors)")
    try:
        tensors = read_safetensors(wpath)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    updates = _updates(wpath, tensors, targets, rank, scaling, layer_shapes)
    return Adapter(directory, rank, scaling, config.get("base_model_name_or_path"), updates)


def _updates(path, tensors, targets, rank, scaling, layer_shapes) -> dict:
    layers = next(iter(layer_shapes.values()))[0]
    want = {}
    for module in targets:
        _, d_in, d_out = layer_shapes[TARGETS[module]]
        want[module] = {"A": (rank, d_in), "B": (d_out, rank)}
    out = {
        TARGETS[m]: (np.zeros((layers, rank, want[m]["A"][1]), np.float32),
                     np.zeros((layers, want[m]["B"][0], rank), np.float32))
        for m in targets
    }  # fmt: skip
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _fail(path, f"{key}: not a LoRA weight of a decoder layer's projection")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in want:
            raise _fail(path, f"{key}: module {module} is not in adapter_config's target_modules")
        if layer >= layers:
            raise _fail(path, f"{key}: layer {layer}, the base model has {layers}")
        if value.shape != want[module][which]:
            raise _fail(
                path,
                f"{key}: shape {list(value.shape)}, the base model needs "
                f"{list(want[module][which])} (an adapter for another base model?)",
            )
        a, b = out[TARGETS[module]]
        if which == "A":
            a[layer] = value.astype(np.float32)
        else:
            b[layer] = value.astype(np.float32) * np.float32(scaling)
    return out
