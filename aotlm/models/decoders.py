"""The decoder families behind one entry point: ``forward`` picks the family's pure function,
``final_logits`` makes logits from hidden states the way the family does (Gemma 3's
soft-capping included). Every step function (aotlm/build/steps.py) goes through these."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from aotlm.kernels.quant_matmul import dense_f32
from aotlm.models.config import ModelConfig
from aotlm.models.gemma3 import forward as gemma3_forward
from aotlm.models.llama import forward as llama_forward


def forward(cfg: ModelConfig, *args, **kwargs):
    """``aotlm.models.llama.forward``'s contract, for every decoder family."""
    return (gemma3_forward if cfg.is_gemma else llama_forward)(cfg, *args, **kwargs)


def final_logits(cfg: ModelConfig, hidden: jax.Array, head: jax.Array) -> jax.Array:
    """hidden [R, H], head [V, H] -> f32 [R, V]; soft-capped when the config says so."""
    logits = dense_f32(hidden, head, transposed=True)
    if cfg.final_logit_softcapping is not None:
        cap = cfg.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits
