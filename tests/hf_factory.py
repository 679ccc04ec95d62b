"""Tiny random HF checkpoints (config.json + safetensors) built with transformers, for tests.

The init std is large (0.2) so logits are spread out and greedy tokens are meaningful rather than
near-ties decided by float noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen3", "qwen2", "mistral", "qwen3_moe", "qwen2_moe", "mixtral", "gemma3")


def make_hf_config(
    family: str = "llama",
    *,
    head_dim: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie: bool = False,
    num_layers: int = 2,
    vocab_size: int = 256,
    hidden_size: int | None = None,
    intermediate_size: int = 128,
    rope_scaling: dict[str, Any] | None = None,
    **family_kwargs: Any,
):
    """The transformers config object for ``make_hf_checkpoint``. ``family_kwargs``: the
    family's own config fields (num_experts, num_experts_per_tok, layer_types, ...)."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "mixtral": transformers.MixtralConfig,
        "gemma3": transformers.Gemma3TextConfig,
    }
    if family not in classes:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size or 128,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        initializer_range=0.2,
        rms_norm_eps=1e-6,
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = {"rope_theta": 10000.0, **rope_scaling}
    if family in ("qwen3_moe", "qwen2_moe"):
        kwargs["moe_intermediate_size"] = intermediate_size
    return classes[family](**kwargs | family_kwargs)


def make_hf_checkpoint(
    out_dir: str | Path,
    family: str = "llama",
    *,
    head_dim: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie: bool = False,
    num_layers: int = 2,
    vocab_size: int = 256,
    hidden_size: int | None = None,
    intermediate_size: int = 128,
    seed: int = 0,
    rope_scaling: dict[str, Any] | None = None,
    sharded: bool = False,
    **family_kwargs: Any,
) -> Path:
    """Build a random float32 ``{family}ForCausalLM``, ``save_pretrained`` it, return the dir.

    ``hidden_size`` defaults to 128 (independent of ``num_heads * head_dim``, which HF allows).
    ``sharded=True`` writes several shards and ``model.safetensors.index.json``.
    """
    import torch
    import transformers

    config = make_hf_config(
        family,
        head_dim=head_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tie=tie,
        num_layers=num_layers,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        rope_scaling=rope_scaling,
        **family_kwargs,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norm weights init to 1 and biases to 0; perturb them so the loader's mapping is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("gate.weight") and "proj" not in name:  # routers: spread choices
                p.normal_(0.0, 1.0)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, max_shard_size="100KB" if sharded else "50GB")
    return out_dir


def load_hf_model(checkpoint_dir: str | Path):
    """The float32 transformers model saved in ``checkpoint_dir``, in eval mode."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32)
    return model.eval()
