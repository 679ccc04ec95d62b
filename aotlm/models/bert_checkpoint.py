"""HF BERT checkpoint (BertModel safetensors, with or without the `bert.` prefix) -> encoder params."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aotlm.errors import CheckpointError
from aotlm.models.bert import EncoderConfig, Params, layer_shapes
from aotlm.models.checkpoint import (
    checked_tensor,
    open_checkpoint_files,
    serving_dtype,
    to_serving_dtype,
)

# our name -> (HF name inside encoder.layer.{i}., stored transposed)
LAYER_TENSORS: dict[str, tuple[str, bool]] = {
    "wq": ("attention.self.query.weight", True),
    "bq": ("attention.self.query.bias", False),
    "wk": ("attention.self.key.weight", True),
    "bk": ("attention.self.key.bias", False),
    "wv": ("attention.self.value.weight", True),
    "bv": ("attention.self.value.bias", False),
    "wo": ("attention.output.dense.weight", True),
    "bo": ("attention.output.dense.bias", False),
    "attn_ln_w": ("attention.output.LayerNorm.weight", False),
    "attn_ln_b": ("attention.output.LayerNorm.bias", False),
    "w_in": ("intermediate.dense.weight", True),
    "b_in": ("intermediate.dense.bias", False),
    "w_out": ("output.dense.weight", True),
    "b_out": ("output.dense.bias", False),
    "mlp_ln_w": ("output.LayerNorm.weight", False),
    "mlp_ln_b": ("output.LayerNorm.bias", False),
}
TOP_TENSORS = {
    "word_emb": "embeddings.word_embeddings.weight",
    "pos_emb": "embeddings.position_embeddings.weight",
    "type_emb": "embeddings.token_type_embeddings.weight",
    "emb_ln_w": "embeddings.LayerNorm.weight",
    "emb_ln_b": "embeddings.LayerNorm.bias",
}


def load_encoder_checkpoint(checkpoint_dir: str | Path, cfg: EncoderConfig, dtype: str) -> Params:
    checkpoint_dir = Path(checkpoint_dir)
    files = open_checkpoint_files(checkpoint_dir)
    prefix = "bert." if f"bert.{TOP_TENSORS['word_emb']}" in files else ""
    dt = serving_dtype(dtype)
    H = cfg.hidden_size

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = prefix + name
        if full not in files:
            raise CheckpointError(f"{checkpoint_dir}: missing tensor {full!r}")
        return checked_tensor(files, full, shape)

    top_shapes = {
        "word_emb": (cfg.vocab_size, H),
        "pos_emb": (cfg.max_position_embeddings, H),
        "type_emb": (cfg.type_vocab_size, H),
        "emb_ln_w": (H,),
        "emb_ln_b": (H,),
    }
    params: Params = {
        k: to_serving_dtype(get(TOP_TENSORS[k], s), dt) for k, s in top_shapes.items()
    }
    layers = {}
    for key, shape in layer_shapes(cfg).items():
        hf_name, transposed = LAYER_TENSORS[key]
        out = np.empty((cfg.num_layers, *shape), dt)
        for i in range(cfg.num_layers):
            x = get(f"encoder.layer.{i}.{hf_name}", shape[::-1] if transposed else shape)
            out[i] = to_serving_dtype(x.T if transposed else x, dt)
        layers[key] = out
    params["layers"] = layers
    return params
