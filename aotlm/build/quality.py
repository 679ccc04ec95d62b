"""The quality gate: what quantization cost, measured when the bundle is built.

The build runs the unquantized and the quantized model (same serving dtype, same attention, the
KV cache as each would serve it) over one evaluation text, the first ``max_tokens`` tokens of
``quality.text`` or of aotlm/data/eval_text.txt, as one sequence, and compares the next-token
distributions at every position:

- ``mean_kl``: mean over positions of KL(p_unquantized || p_quantized), in nats;
- ``top1_agreement``: the fraction of positions whose argmax token is the same;
- ``perplexity`` / ``perplexity_unquantized``: exp of the mean negative log-likelihood of the
  text's own next tokens under each.

An encoder (embedding model) is measured by the cosine similarity of its sentence embeddings
(``mean_cosine``, ``min_cosine`` over the text's sentences), recorded and not gated.

The figures go into the manifest's ``quantization.quality``; ``quality: {max_kl: X}`` fails the
build with them when the KL is larger, before any graph is exported or a file written.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from aotlm.build.model_yaml import BuildConfig
from aotlm.errors import ConfigError
from aotlm.kernels import kv_quant
from aotlm.models import ModelConfig, final_logits, forward, lm_head

SHIPPED_TEXT = "eval_text.txt"


def evaluation_text(build: BuildConfig) -> tuple[str, str]:
    """(the text, where it came from)."""
    if build.quality_text is not None:
        return Path(build.quality_text).read_text(encoding="utf-8"), str(build.quality_text)
    text = resources.files("aotlm.data").joinpath(SHIPPED_TEXT).read_text(encoding="utf-8")
    return text, f"aotlm/data/{SHIPPED_TEXT}"


def evaluation_tokens(tokenizer_json: bytes, text: str, max_tokens: int) -> np.ndarray:
    ids = Tokenizer.from_str(tokenizer_json.decode()).encode(text).ids[:max_tokens]
    return np.asarray(ids, np.int32)


def sequence_logits(
    cfg: ModelConfig, build: BuildConfig, params, tokens: np.ndarray, kv_dtype
) -> np.ndarray:
    """f32 [T, V] logits of one sequence through the model's forward (one prefill)."""
    return _sequence(cfg, build, params, tokens, kv_dtype)[0]


def kv_scales(cfg: ModelConfig, build: BuildConfig, params, tokens: np.ndarray) -> np.ndarray:
    """The fp8 cache's f32 [L, 2] scales (aotlm/kernels/kv_quant.py): each layer's largest
    |key| and |value| over the evaluation text, as the model serves it (``params``, pages in
    the serving dtype), over e4m3's largest value; 1 for a layer whose keys are all 0."""
    _, k_pages, v_pages = _sequence(cfg, build, params, tokens, jnp.dtype(build.dtype))
    amax = np.stack(
        [np.abs(p.astype(np.float32)).max(axis=(1, 2, 3, 4)) for p in (k_pages, v_pages)], -1
    )
    return np.where(amax > 0, amax / kv_quant.E4M3_MAX, 1.0).astype(np.float32)


def _sequence(cfg: ModelConfig, build: BuildConfig, params, tokens: np.ndarray, kv_dtype):
    """(f32 [T, V] logits, k_pages, v_pages) of one sequence (one prefill) as numpy."""
    t, size = len(tokens), build.page_size
    pages = -(-t // size)
    shape = (cfg.num_layers, pages + 1, size, cfg.num_kv_heads, cfg.head_dim)
    positions = np.arange(t, dtype=np.int32)
    slots = positions + size  # pages 1..pages in order; page 0 is the trash page
    tables = np.arange(1, pages + 1, dtype=np.int32)[None]

    def run(params, k_pages, v_pages):
        hidden, k_pages, v_pages = forward(
            cfg, params, k_pages, v_pages, jnp.asarray(tokens), positions, slots,
            jnp.zeros(t, jnp.int32), tables, cpu_attention=build.attention_cpu,
        )  # fmt: skip
        return final_logits(cfg, hidden, lm_head(cfg, params)), k_pages, v_pages

    zeros = np.zeros(shape, kv_dtype)
    return tuple(np.asarray(a) for a in jax.jit(run)(params, zeros, zeros))


def compare(reference: np.ndarray, quantized: np.ndarray, tokens: np.ndarray) -> dict:
    """The gate's figures from two [T, V] logit arrays over the same tokens."""
    log_p = jax.nn.log_softmax(jnp.asarray(reference, jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(jnp.asarray(quantized, jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    agree = jnp.argmax(log_p, axis=-1) == jnp.argmax(log_q, axis=-1)
    nxt = jnp.asarray(tokens[1:])[:, None]

    def ppl(logp):
        return math.exp(float(-jnp.mean(jnp.take_along_axis(logp[:-1], nxt, axis=-1))))

    return {
        "mean_kl": float(jnp.mean(kl)),
        "max_kl": float(jnp.max(kl)),
        "top1_agreement": float(jnp.mean(agree)),
        "perplexity": ppl(log_q),
        "perplexity_unquantized": ppl(log_p),
        "tokens": len(tokens),
    }


def measure(
    cfg: ModelConfig,
    build: BuildConfig,
    reference,
    quantized,
    tokenizer_json: bytes,
    kv_dtypes: tuple,
) -> dict:
    """Run both models over the evaluation text; ``kv_dtypes``: (unquantized, quantized)."""
    tokens, source = gate_tokens(build, tokenizer_json)
    ref = sequence_logits(cfg, build, reference, tokens, kv_dtypes[0])
    out = sequence_logits(cfg, build, quantized, tokens, kv_dtypes[1])
    return compare(ref, out, tokens) | {"text": source}


def gate_tokens(build: BuildConfig, tokenizer_json: bytes) -> tuple[np.ndarray, str]:
    """(the evaluation text's first tokens, where the text came from)."""
    text, source = evaluation_text(build)
    max_tokens = min(build.quality_tokens, build.max_seq_len)
    tokens = evaluation_tokens(tokenizer_json, text, max_tokens)
    if len(tokens) < 2:
        raise ConfigError(f"{build.source.name}: quality.text: {source} has fewer than 2 tokens")
    return tokens, source


def measure_encoder(family, cfg, build: BuildConfig, reference, quantized, tokenizer_json: bytes):
    """An encoder's figures: the cosine similarity of each sentence's embedding (the evaluation
    text split into sentences, one padded batch) between the unquantized and quantized model."""
    text, source = evaluation_text(build)
    tokenizer = Tokenizer.from_str(tokenizer_json.decode())
    sentences = [s.strip() for s in text.replace("\n", " ").split(". ") if s.strip()]
    ids = [tokenizer.encode(s).ids[: build.max_seq_len] for s in sentences]
    width = max(len(i) for i in ids)
    input_ids = np.zeros((len(ids), width), np.int32)
    mask = np.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    embed = jax.jit(family.step_functions(cfg)["embed"])
    a, b = (
        np.asarray(embed(p, input_ids, mask, np.zeros_like(mask))) for p in (reference, quantized)
    )
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "sentences": len(ids),
        "text": source,
    }


def check(build: BuildConfig, figures: dict) -> None:
    """Fail the build when the measured KL is past ``quality.max_kl``."""
    bound = build.quality_max_kl
    if bound is None or figures["mean_kl"] <= bound:
        return
    raise ConfigError(
        f"{build.source.name}: quality.max_kl: the quantized model's mean KL divergence from "
        f"the unquantized one is {figures['mean_kl']:.6f} nats, above max_kl {bound:g} "
        f"(top-1 agreement {figures['top1_agreement']:.4f}, perplexity "
        f"{figures['perplexity']:.3f} vs {figures['perplexity_unquantized']:.3f} unquantized, "
        f"over {figures['tokens']} tokens of {figures['text']}); nothing was written"
    )
