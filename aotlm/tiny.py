"""The embedded default model: a tiny random-weight Llama, created locally and reproducibly.

``family=`` makes the same kind of checkpoint for the other families (``FAMILIES``): Gemma 3
with local and global layers, Qwen3-MoE and Mixtral with 8 experts, top-2.

It exists so that build, serve and every test run end to end with no network and no download:
``python -m aotlm.tiny checkpoints/tiny-llama`` writes a standard Hugging Face checkpoint
directory (config.json, model.safetensors, tokenizer files) that transformers loads as is.
The weights are random, so the text is nonsense, but it is deterministic nonsense: the same seed
gives the same bytes on every machine, which lets tests compare outputs across runs and backends.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD, "<|user|>", "<|assistant|>", "<|system|>")
VOCAB_TARGET = 1000
MAX_POSITIONS = 2048
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 512, 2, 4, 2, 64
# Large enough that logits differ by more than float noise (greedy output varies with the
# prompt and is stable across batch sizes), small enough that activations stay finite.
WEIGHT_STD = 0.08

# Roles are rendered as special tokens, and each turn ends with EOS, so generation stops at the
# end of the assistant's turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    # Tools the Qwen/Hermes way: their JSON signatures up front, calls as <tool_call> JSON.
    "{% if tools %}"
    "{{ '<|system|>\\nYou may call these functions:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{% endfor %}"
    '{{ \'</tools>\\nTo call one, answer <tool_call>{"name": ..., "arguments": ...}'
    "</tool_call>' + eos_token + '\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('role must be system, user, assistant or tool, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set args = call['function']['arguments'] %}"
    "{{ '<tool_call>{\"name\": ' + call['function']['name'] | tojson + ', \"arguments\": ' }}"
    "{{ (args if args is string else args | tojson) + '}</tool_call>' }}"
    "{% endfor %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def make_tiny_checkpoint(out_dir: Path, *, seed: int = 0, family: str = "llama") -> Path:
    """Write the tiny checkpoint of ``family`` into ``out_dir`` (created if needed), return it."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    return write_checkpoint(out_dir, FAMILIES[family], seed=seed)


def write_checkpoint(out_dir: Path, overrides: dict[str, Any], *, seed: int = 0) -> Path:
    """A checkpoint with the tiny tokenizer whose config.json is the tiny Llama's keys updated
    by ``overrides`` (a None value removes the key): any supported architecture and size, with
    random weights for every tensor its loader expects (benchmarks make larger models so)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in (BOS, EOS, PAD)}
    config = _model_config(tokenizer.get_vocab_size(), ids) | overrides
    config = {k: v for k, v in config.items() if v is not None or k not in overrides}
    _write_json(out_dir / "config.json", config)
    weights = random_weights(config, seed) if not overrides else _family_weights(out_dir, seed)
    save_file(weights, str(out_dir / "model.safetensors"), {"format": "pt"})
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[PAD]},
    )
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": MAX_POSITIONS,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return out_dir


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on the embedded corpus: any text round-trips, no unknown tokens.

    BPE training is deterministic (merges are chosen by count, ties broken by pair ids), so the
    serialized tokenizer is the same bytes on every run.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_TARGET,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("aotlm").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    # Like Llama: encoding a prompt prepends BOS; the chat template writes BOS itself.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return tokenizer


# config.json keys over the tiny Llama's, per family.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "hidden_activation": "gelu_pytorch_tanh",
        "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
        "sliding_window": 64,
        "query_pre_attn_scalar": HEAD_DIM,
        "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        "rope_theta": None,  # None: the key is left out
        "rope_scaling": None,
        "hidden_act": None,
        "tie_word_embeddings": True,
    },
    "qwen3-moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 128,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "mixtral": {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "intermediate_size": 128,
    },
}


def _model_config(vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
    }


def random_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """HF Llama tensors ([out, in] linears), drawn in a fixed order so a seed fixes every byte."""
    rng = np.random.default_rng(seed)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * config["head_dim"]
    kv_dim = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * WEIGHT_STD).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.self_attn.q_proj.weight": normal(q_dim, h),
            f"{p}.self_attn.k_proj.weight": normal(kv_dim, h),
            f"{p}.self_attn.v_proj.weight": normal(kv_dim, h),
            f"{p}.self_attn.o_proj.weight": normal(h, q_dim),
            f"{p}.mlp.gate_proj.weight": normal(inter, h),
            f"{p}.mlp.up_proj.weight": normal(inter, h),
            f"{p}.mlp.down_proj.weight": normal(h, inter),
            f"{p}.input_layernorm.weight": np.ones(h, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
        }
    weights["model.norm.weight"] = np.ones(h, np.float32)
    lm_head = normal(vocab, h)
    # A zero EOS row gives EOS logit 0, far below the best of ~1000 random logits, so greedy
    # generation runs to max_tokens instead of stopping at a random first token; sampling can
    # still end a sequence.
    lm_head[config["eos_token_id"]] = 0.0
    weights["lm_head.weight"] = lm_head
    return weights


def _family_weights(checkpoint: Path, seed: int) -> dict[str, np.ndarray]:
    """Every tensor the family's loader expects for the config.json in ``checkpoint``, drawn in
    name order. Norms are the identity (ones; zeros for Gemma's 1 + w); routers are drawn wider
    so tokens spread over the experts; EOS's output row is zero, as for the tiny Llama."""
    from aotlm.models.checkpoint import expected_hf_shapes
    from aotlm.models.config import read_hf_config

    cfg = read_hf_config(checkpoint)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted(expected_hf_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            weights[name] = np.full(shape, 0.0 if cfg.is_gemma else 1.0, np.float32)
            continue
        std = (
            1.0
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))
            else WEIGHT_STD
        )
        weights[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    for eos in cfg.eos_token_ids:
        weights[head][eos] = 0.0
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aotlm.tiny", description="Create the tiny random-weight Llama checkpoint."
    )
    parser.add_argument("out_dir", type=Path, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    parser.add_argument("--family", choices=list(FAMILIES), default="llama")
    args = parser.parse_args(argv)
    print(make_tiny_checkpoint(args.out_dir, seed=args.seed, family=args.family))


if __name__ == "__main__":
    main()
