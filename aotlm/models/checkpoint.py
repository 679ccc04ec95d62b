"""HF safetensors checkpoint -> params pytree (numpy, serving dtype), and the flat names bundles use.

The loader is strict on purpose: a missing tensor, a wrong shape or a tensor it does not know
is an error naming the tensor and the file, because silently serving a half-loaded model is worse
than failing the build. HF stores linear weights [out, in]; we store [in, out] and stack layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

import aotlm.models.compressed_tensors as ct
from aotlm.errors import CheckpointError, ConfigError
from aotlm.models.config import ModelConfig
from aotlm.models.llama import Params, layer_shapes
from aotlm.models.quantize import QUANTIZED_KEYS, STORAGE, quantize_weight
from aotlm.safetensors_io import SafetensorsFile

SERVING_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_FLOAT_SOURCES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}

# our stacked layer name -> (HF name inside model.layers.{i}., stored transposed)
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "wo": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}
# Gemma 3 names its four norms per layer differently (its post_attention_layernorm is not the
# MLP's input norm).
_GEMMA_TENSORS = {
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
}
# Experts: "{e}" is the expert index; routers are stored [E, H] and we keep [H, E].
_QWEN_MOE_TENSORS = {
    "router": ("mlp.gate.weight", True),
    "we_gate": ("mlp.experts.{e}.gate_proj.weight", True),
    "we_up": ("mlp.experts.{e}.up_proj.weight", True),
    "we_down": ("mlp.experts.{e}.down_proj.weight", True),
    "ws_router": ("mlp.shared_expert_gate.weight", True),
    "ws_gate": ("mlp.shared_expert.gate_proj.weight", True),
    "ws_up": ("mlp.shared_expert.up_proj.weight", True),
    "ws_down": ("mlp.shared_expert.down_proj.weight", True),
}
_MIXTRAL_TENSORS = {
    "router": ("block_sparse_moe.gate.weight", True),
    "we_gate": ("block_sparse_moe.experts.{e}.w1.weight", True),
    "we_up": ("block_sparse_moe.experts.{e}.w3.weight", True),
    "we_down": ("block_sparse_moe.experts.{e}.w2.weight", True),
}
TOP_TENSORS = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
LM_HEAD = "lm_head.weight"
# Where a multimodal checkpoint keeps its language model (transformers >= 5, then < 5); the
# other tensors (vision tower, projector) are not read.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
_IGNORED_SUFFIX = "rotary_emb.inv_freq"  # a non-persistent buffer some old exports contain


def serving_dtype(dtype: str) -> np.dtype:
    """numpy dtype for a model.yaml ``dtype`` string."""
    if dtype not in SERVING_DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")
    return SERVING_DTYPES[dtype]


def open_checkpoint_files(checkpoint_dir: Path) -> dict[str, SafetensorsFile]:
    """Tensor name -> the validated file holding it (single file or sharded index)."""
    index_path = checkpoint_dir / "model.safetensors.index.json"
    single = checkpoint_dir / "model.safetensors"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: cannot read weight_map ({e})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values()
        ):
            raise CheckpointError(f"{index_path}: weight_map must map names to shard file names")
        shards = {f: SafetensorsFile(checkpoint_dir / f) for f in sorted(set(weight_map.values()))}
        files = {}
        for name, shard in weight_map.items():
            if name not in shards[shard]:
                raise CheckpointError(f"{checkpoint_dir / shard}: missing tensor {name!r}")
            files[name] = shards[shard]
        return files
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f}
    raise CheckpointError(
        f"{checkpoint_dir}: no model.safetensors or model.safetensors.index.json "
        "(only safetensors checkpoints are supported)"
    )


def layer_tensors(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our stacked layer name -> (HF name inside the layer, stored transposed) for cfg's family."""
    names = dict(LAYER_TENSORS)
    if cfg.is_gemma:
        names |= _GEMMA_TENSORS
    if cfg.is_moe:
        names |= _MIXTRAL_TENSORS if cfg.family == "mixtral" else _QWEN_MOE_TENSORS
    return names


def per_layer_tensors(cfg: ModelConfig, key: str, shape: tuple[int, ...], prefix: str = "model."):
    """[(layer, expert or None, HF name, HF shape, transposed)] for one stacked tensor."""
    hf_name, transposed = layer_tensors(cfg)[key]
    inner = shape[2:] if "{e}" in hf_name else shape[1:]
    hf_shape = inner[::-1] if transposed else inner
    experts = range(cfg.num_experts) if "{e}" in hf_name else [None]
    return [
        (i, e, f"{prefix}layers.{i}." + hf_name.format(e=e), hf_shape, transposed)
        for i in range(cfg.num_layers)
        for e in experts
    ]


def _prefix(cfg: ModelConfig, names) -> str:
    """The language model's tensor prefix: "model." or a multimodal checkpoint's."""
    if cfg.architecture != "Gemma3ForConditionalGeneration":
        return "model."
    for prefix in _TEXT_PREFIXES:
        if prefix + "embed_tokens.weight" in names:
            return prefix
    return _TEXT_PREFIXES[0]


def expected_hf_shapes(cfg: ModelConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape, for every tensor the checkpoint must hold."""
    vh = (cfg.vocab_size, cfg.hidden_size)
    out = {prefix + "embed_tokens.weight": vh, prefix + "norm.weight": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        out[LM_HEAD] = vh
    for key, shape in layer_shapes(cfg).items():
        for _, _, name, hf_shape, _ in per_layer_tensors(cfg, key, shape, prefix):
            out[name] = hf_shape
    return out


def checked_tensor(
    files: dict[str, SafetensorsFile],
    name: str,
    shape: tuple[int, ...],
    pq: ct.PreQuantized | None = None,
) -> np.ndarray:
    """A float tensor; with ``pq``, a quantized one comes back dequantized (f32)."""
    f = files[name]
    if f.shape(name) != shape:
        raise CheckpointError(f"{f.path}: tensor {name!r} has shape {f.shape(name)}, want {shape}")
    if pq is not None and f.dtype(name) not in _FLOAT_SOURCES:
        return ct.dequantized(*ct.read_quantized(files, name, shape, pq))
    if f.dtype(name) not in _FLOAT_SOURCES:
        raise CheckpointError(f"{f.path}: tensor {name!r} has unsupported dtype {f.dtype(name)}")
    return f.get(name)


def to_serving_dtype(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    """Cast to the serving dtype; float16 -> bfloat16 goes through float32 (exact, then RNE)."""
    if x.dtype == dt:
        return x
    return x.astype(np.float32).astype(dt) if x.dtype != np.float32 else x.astype(dt)


def load_checkpoint(checkpoint_dir: str | Path, cfg: ModelConfig, dtype: str) -> Params:
    """Read an HF checkpoint into a params pytree of numpy arrays matching ``abstract_params``.

    ``dtype`` is "float32" or "bfloat16" (``ml_dtypes.bfloat16`` arrays).
    """
    checkpoint_dir = Path(checkpoint_dir)
    dt = serving_dtype(dtype)
    files = open_checkpoint_files(checkpoint_dir)
    pq = ct.read_prequantized(checkpoint_dir)
    prefix = _prefix(cfg, files)
    expected = expected_hf_shapes(cfg, prefix)
    for name, f in sorted(files.items()):
        tolerated = name.endswith(_IGNORED_SUFFIX) or (name == LM_HEAD and cfg.tie_word_embeddings)
        if pq is not None and (ct.tolerated(name) or ct.is_scale(name)):
            tolerated = True  # a scale is read with its weight, or refused there as missing
        if prefix != "model." and not name.startswith(prefix) and name != LM_HEAD:
            continue  # a multimodal checkpoint's vision tower and projector
        if name not in expected and not tolerated:
            raise CheckpointError(
                f"{f.path}: unexpected tensor {name!r} for {cfg.architecture} with "
                f"{cfg.num_layers} layers (wrong config.json or unsupported variant?)"
            )
    for name in expected:
        if name not in files:
            where = sorted({str(f.path.name) for f in files.values()})
            raise CheckpointError(f"{checkpoint_dir}: missing tensor {name!r} (in {where})")

    def top(name: str) -> np.ndarray:
        out = np.empty(expected[name], dt)  # owned memory, not a view of the mapped file
        out[...] = to_serving_dtype(checked_tensor(files, name, expected[name], pq), dt)
        return out

    params: Params = {key: top(prefix + hf[len("model.") :]) for key, hf in TOP_TENSORS.items()}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = top(LM_HEAD)
    layers: dict[str, Any] = {}
    for key, shape in layer_shapes(cfg).items():
        if pq is not None and key in QUANTIZED_KEYS:
            layers[key] = _prequantized_layers(files, cfg, key, shape, prefix, pq)
            continue
        out = np.empty(shape, dt)
        for i, e, name, hf_shape, transposed in per_layer_tensors(cfg, key, shape, prefix):
            x = checked_tensor(files, name, hf_shape, pq)
            x = to_serving_dtype(x.T if transposed else x, dt)
            if e is None:
                out[i] = x
            else:
                out[i, e] = x
        layers[key] = out
    params["layers"] = layers
    for f in set(files.values()):
        f.close()
    return params


def _prequantized_layers(files, cfg, key, shape, prefix, pq: ct.PreQuantized) -> dict:
    """One stacked projection of a compressed-tensors checkpoint as aotlm's {"weight",
    "scale"}, read as stored; a layer the checkpoint left unquantized is quantized here with
    its scheme, so every layer of the stack has one layout."""
    weight = np.empty(shape, STORAGE[pq.scheme])
    scale = np.empty((*shape[:-2], shape[-1]), np.float32)
    for i, e, name, hf_shape, _ in per_layer_tensors(cfg, key, shape, prefix):
        at = i if e is None else (i, e)
        got = ct.read_quantized(files, name, hf_shape, pq)
        if got is None:
            w = quantize_weight(checked_tensor(files, name, hf_shape).T, pq.scheme)
            weight[at], scale[at] = w["weight"], w["scale"]
        else:
            weight[at], scale[at] = ct.stored_bits(got[0]).T, got[1]
    return {"weight": weight, "scale": scale}


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Nested dict -> {"embed": .., "layers.wq": ..} (leaves unchanged; also works on avals)."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in flatten_params(value).items()})
        else:
            flat[key] = value
    return flat


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_params``."""
    params: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"param name {name!r} clashes with a tensor named {p!r}")
        if leaf in node:
            raise CheckpointError(f"param name {name!r} clashes with another entry")
        node[leaf] = value
    return params
