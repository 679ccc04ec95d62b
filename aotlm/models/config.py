"""The model's shape and numerics, read once from an HF checkpoint's config.json.

``ModelConfig`` is frozen and hashable because it is a static argument of the traced step
functions; every field the math depends on lives here, nothing is read from the checkpoint later.
Both spellings of HF config keys are accepted: transformers < 5 (``torch_dtype``, ``rope_theta``,
``rope_scaling``) and >= 5 (``dtype``, ``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from aotlm.errors import CheckpointError

# architecture -> family; the family picks the few per-family switches below.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Gemma3ForCausalLM": "gemma3_text",
    # The text part of a multimodal checkpoint: config.json's text_config, the language model's
    # tensors; the vision tower is not read.
    "Gemma3ForConditionalGeneration": "gemma3",
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")
GEMMA_FAMILIES = ("gemma3_text", "gemma3")
_ARCH_BY_MODEL_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
_LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only Llama-family transformer. ``rope_scaling`` is None for plain RoPE or a sorted
    tuple of (key, value) items (``rope_type`` included) so the config stays hashable."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int
    architecture: str
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None
    # Mixture of experts in every layer's MLP (0 experts: dense); ``intermediate_size`` is then
    # each expert's.
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False  # renormalise the chosen experts' probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a sigmoid-gated shared expert
    # Gemma 3: which layers are "sliding_attention" (window ``sliding_window``, rope
    # ``rope_local_theta``) and which "full_attention"; () means every layer alike.
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0
    query_pre_attn_scalar: float = 0.0  # attention scale is its -1/2 power (0: head_dim's)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    @property
    def family(self) -> str:
        """The family name (SUPPORTED_ARCHITECTURES' values)."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_gemma(self) -> bool:
        return self.family in GEMMA_FAMILIES

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def sliding_layer(self, i: int) -> bool:
        """Whether layer i attends over a sliding window (every layer, when ``sliding_window``
        is set and ``layer_types`` is empty)."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[i] == "sliding_attention"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-friendly dict (for the bundle manifest); inverse of ``from_dict``."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling_dict
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Accepts ``to_dict()`` output and ``dataclasses.asdict`` output after a JSON/msgpack
        roundtrip (rope_scaling as a dict or a list of [key, value] pairs; lists for tuples)."""
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = None if rs is None else tuple(sorted(dict(rs).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_types"] = tuple(d.get("layer_types", ()))
        return cls(**d)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """``ModelConfig.from_dict`` as a function (the bundle loader's entry point)."""
    return ModelConfig.from_dict(d)


def load_json_object(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, generation_config.json) as a dict; CheckpointError
    naming the file when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found; is this an HF checkpoint directory?") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class _Reader:
    """Typed access to config.json keys; every error names the file and the key."""

    def __init__(self, path: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {self.prefix}{key}: {what}")

    def refuse_unless(self, key: str, default: Any, allowed: tuple[Any, ...], why: str) -> None:
        """A key whose other values this aotlm cannot honour: refused, naming it."""
        value = self.data.get(key, default)
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not supported ({why})")

    def get_int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.data.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def get_float(self, key: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise self.fail(key, f"expected a positive number, got {value!r}")
        return float(value)

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected true or false, got {value!r}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value = self.data.get(key)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise self.fail(key, f"expected a token id or a list of them, got {value!r}")
        return tuple(values)


def _architecture(r: _Reader) -> str:
    archs = r.data.get("architectures")
    if archs is None:
        arch = _ARCH_BY_MODEL_TYPE.get(r.data.get("model_type"), r.data.get("model_type"))
    elif isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str):
        arch = archs[0]
    else:
        raise r.fail("architectures", f"expected a list with one name, got {archs!r}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise r.fail(
            "architectures",
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    return arch


def _rope_params(
    r: _Reader, params: Any, key: str
) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling items) from one rope parameters object (``key`` names it)."""
    if params is not None and not isinstance(params, dict):
        raise r.fail(key, f"expected an object, got {params!r}")
    params = dict(params or {})
    theta = r.get_float("rope_theta", params.pop("rope_theta", r.data.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", r.data.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise r.fail("partial_rotary_factor", f"only 1.0 is supported, got {partial!r}")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        return theta, (("factor", r.get_float(f"{key}.factor", params.get("factor"))),
                       ("rope_type", "linear"))  # fmt: skip
    if rope_type != "llama3":
        raise r.fail(
            f"{key}.rope_type",
            f"unsupported rope type {rope_type!r}; supported: default, linear, llama3",
        )
    items: dict[str, Any] = {"rope_type": "llama3"}
    for name in _LLAMA3_ROPE_KEYS:
        items[name] = r.get_float(f"{key}.{name}", params.get(name))
    items["original_max_position_embeddings"] = int(items["original_max_position_embeddings"])
    if items["high_freq_factor"] <= items["low_freq_factor"]:
        raise r.fail(f"{key}.high_freq_factor", "must be larger than low_freq_factor")
    return theta, tuple(sorted(items.items()))


def _rope(r: _Reader) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling items) from ``rope_parameters`` (new) or ``rope_scaling`` (old)."""
    if r.data.get("rope_parameters") is not None:
        return _rope_params(r, r.data["rope_parameters"], "rope_parameters")
    return _rope_params(r, r.data.get("rope_scaling"), "rope_scaling")


def _sliding_window(r: _Reader, family: str) -> int | None:
    if family == "llama" or (family in ("qwen2", "qwen3") and not r.data.get("use_sliding_window")):
        return None
    if family in ("qwen2_moe", "qwen3_moe"):
        r.refuse_unless("use_sliding_window", False, (False, None), "MoE layers attend in full")
        return None
    return None if r.data.get("sliding_window") is None else r.get_int("sliding_window")


def _experts(r: _Reader, family: str) -> dict[str, Any]:
    """The MoE fields of ModelConfig (none for a dense family)."""
    if family not in MOE_FAMILIES:
        return {}
    n = r.get_int("num_local_experts" if "num_local_experts" in r.data else "num_experts")
    k = r.get_int("num_experts_per_tok")
    if k > n:
        raise r.fail("num_experts_per_tok", f"{k} is more than the {n} experts")
    out: dict[str, Any] = {"num_experts": n, "experts_per_token": k, "norm_topk_prob": True}
    if family == "mixtral":  # top-k probabilities always renormalised; intermediate_size as is
        return out
    # Every layer sparse: the stacked layers share one layout.
    r.refuse_unless("decoder_sparse_step", 1, (1,), "every layer must be a MoE layer")
    r.refuse_unless("mlp_only_layers", [], ([], None), "every layer must be a MoE layer")
    out["norm_topk_prob"] = r.get_bool("norm_topk_prob", False)
    out["intermediate_size"] = r.get_int("moe_intermediate_size")
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = r.get_int("shared_expert_intermediate_size")
    return out


def _gemma(r: _Reader, num_layers: int) -> dict[str, Any]:
    """Gemma 3's fields: layer pattern, both rope bases, scaling and soft-capping."""
    r.refuse_unless("attn_logit_softcapping", None, (None,), "attention soft-capping")
    r.refuse_unless("use_bidirectional_attention", False, (False, None), "causal LM only")
    act = r.data.get("hidden_activation", r.data.get("hidden_act", "gelu_pytorch_tanh"))
    if act != "gelu_pytorch_tanh":
        raise r.fail("hidden_activation", f"only gelu_pytorch_tanh is supported, got {act!r}")
    types = r.data.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = r.get_int("sliding_window_pattern", default=6)
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(num_layers)]  # fmt: skip
    kinds = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != num_layers or not set(types) <= set(kinds):
        raise r.fail("layer_types", f"expected {num_layers} of {' / '.join(kinds)}, got {types!r}")
    params = r.data.get("rope_parameters")
    if isinstance(params, dict) and set(params) <= set(kinds) and params:
        theta, scaling = _rope_params(
            r, params.get("full_attention"), "rope_parameters.full_attention"
        )
        local, local_scaling = _rope_params(
            r, params.get("sliding_attention"), "rope_parameters.sliding_attention"
        )
        if local_scaling is not None:
            raise r.fail("rope_parameters.sliding_attention", "local rope scaling is not supported")
    else:
        theta, scaling = _rope(r)
        local = r.get_float("rope_local_base_freq", r.data.get("rope_local_base_freq", 10000.0))
    cap = r.data.get("final_logit_softcapping")
    return {
        "layer_types": tuple(types),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_local_theta": local,
        "query_pre_attn_scalar": r.get_float(
            "query_pre_attn_scalar", r.data.get("query_pre_attn_scalar", 256)
        ),
        "final_logit_softcapping": None
        if cap is None
        else r.get_float("final_logit_softcapping", cap),
    }


def _text_reader(r: _Reader, arch: str) -> _Reader:
    """The reader of the language model's keys (a multimodal config nests them)."""
    if arch != "Gemma3ForConditionalGeneration":
        return r
    text = r.data.get("text_config")
    if not isinstance(text, dict):
        raise r.fail("text_config", f"expected an object, got {text!r}")
    return _Reader(r.path, text, prefix="text_config.")


def read_hf_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (and stop tokens from ``generation_config.json`` if present).

    Raises CheckpointError naming the file and key for anything unsupported or malformed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "config.json"
    top = _Reader(path, load_json_object(path))
    arch = _architecture(top)
    family = SUPPORTED_ARCHITECTURES[arch]
    r = _text_reader(top, arch)
    gemma = family in GEMMA_FAMILIES
    hidden, heads = r.get_int("hidden_size"), r.get_int("num_attention_heads")
    kv_heads = r.get_int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise r.fail("num_key_value_heads", f"{kv_heads} does not divide {heads} heads")
    if r.data.get("head_dim") is None and hidden % heads:
        raise r.fail("head_dim", f"absent and hidden_size {hidden} is not a multiple of {heads}")
    head_dim = r.get_int("head_dim", default=hidden // heads)
    if head_dim % 2:
        raise r.fail("head_dim", f"RoPE needs an even head_dim, got {head_dim}")
    if not gemma:
        act = r.data.get("hidden_act", "silu")
        if act != "silu":
            raise r.fail("hidden_act", f"only silu is supported, got {act!r}")
    if r.data.get("mlp_bias"):
        raise r.fail("mlp_bias", "MLP biases are not supported")
    # Qwen2 always has q/k/v biases (and none on o_proj), Qwen2-MoE as `qkv_bias` says;
    # elsewhere the key would also add an o_proj bias, which the params layout does not have.
    attention_bias = family == "qwen2" or (family == "qwen2_moe" and r.get_bool("qkv_bias", True))
    if family not in ("qwen2", "qwen2_moe") and r.get_bool("attention_bias", False):
        raise r.fail("attention_bias", f"attention biases are not supported for {arch}")
    theta, rope_scaling = _rope(r) if not gemma else (0.0, None)
    dtype = r.data.get("dtype", r.data.get("torch_dtype")) or top.data.get("dtype") or "float32"
    eos = r.token_ids("eos_token_id") or top.token_ids("eos_token_id")
    gen_path = checkpoint_dir / "generation_config.json"
    if gen_path.exists():
        gen_eos = _Reader(gen_path, load_json_object(gen_path)).token_ids("eos_token_id")
        eos += tuple(t for t in gen_eos if t not in eos)
    bos = r.token_ids("bos_token_id") or top.token_ids("bos_token_id")
    num_layers = r.get_int("num_hidden_layers")
    fields: dict[str, Any] = dict(
        vocab_size=r.get_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.get_int("intermediate_size"),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.get_float("rms_norm_eps", r.data.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        # A multimodal config may say it at the top or in text_config.
        tie_word_embeddings=top.get_bool(
            "tie_word_embeddings", r.get_bool("tie_word_embeddings", gemma)
        ),
        attention_bias=attention_bias,
        qk_norm=family in ("qwen3", "qwen3_moe") or gemma,
        max_position_embeddings=r.get_int("max_position_embeddings", default=2048),
        architecture=arch,
        torch_dtype=str(dtype),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        sliding_window=_sliding_window(r, family),
    )
    fields |= _experts(r, family)
    if gemma:
        fields |= _gemma(r, num_layers)
    return ModelConfig(**fields)
