"""Abstract inputs of the encoder step `embed[S,B]`: one graph per (sequence length, batch) bucket.

For encoders the model.yaml ladders mean: `buckets.tokens` = sequence lengths S (the largest is
max_seq_len: a sequence is never split), `buckets.requests` = batch sizes B. The bucket is written
`{"tokens": S, "requests": B}` like the decoders' logits[T,R], so files are `embed_t<S>_r<B>`.

    embed(params, input_ids i32[B,S], attention_mask i32[B,S], token_type_ids i32[B,S]) -> f32[B,H]

Compile count = |S|·|B| graphs; there is no KV cache, nothing is donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from aotlm.build.model_yaml import BuildConfig
from aotlm.build.signatures import StepSpec

EMBED = "embed"


def embed_step_specs(
    abstract_params: Callable[..., dict], cfg: Any, build: BuildConfig
) -> list[StepSpec]:
    """embed per (sequence-length bucket, batch bucket)."""
    params = abstract_params(cfg, build.dtype, build.weights_quant)
    specs = []
    for s in build.token_buckets:
        for b in build.request_buckets:
            ids = jax.ShapeDtypeStruct((b, s), jnp.int32)
            specs.append(StepSpec(EMBED, {"tokens": s, "requests": b}, (params, ids, ids, ids)))
    return specs
