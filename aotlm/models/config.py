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
}
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

    @property
    def family(self) -> str:
        """The family name: llama, mistral, qwen2 or qwen3."""
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-friendly dict (for the bundle manifest); inverse of ``from_dict``."""
        out = dataclasses.asdict(self)
        out["rope_scaling"] = self.rope_scaling_dict
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Accepts ``to_dict()`` output and ``dataclasses.asdict`` output after a JSON/msgpack
        roundtrip (rope_scaling as a dict or a list of [key, value] pairs; lists for tuples)."""
        d = dict(d)
        rs = d.get("rope_scaling")
        d["rope_scaling"] = None if rs is None else tuple(sorted(dict(rs).items()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
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

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def fail(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {key}: {what}")

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


def _rope(r: _Reader) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """(rope_theta, rope_scaling items) from ``rope_parameters`` (new) or ``rope_scaling`` (old)."""
    params = r.data.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = r.data.get("rope_scaling"), "rope_scaling"
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
    if rope_type != "llama3":
        raise r.fail(
            f"{key}.rope_type", f"unsupported rope type {rope_type!r}; supported: default, llama3"
        )
    items: dict[str, Any] = {"rope_type": "llama3"}
    for name in _LLAMA3_ROPE_KEYS:
        items[name] = r.get_float(f"{key}.{name}", params.get(name))
    items["original_max_position_embeddings"] = int(items["original_max_position_embeddings"])
    if items["high_freq_factor"] <= items["low_freq_factor"]:
        raise r.fail(f"{key}.high_freq_factor", "must be larger than low_freq_factor")
    return theta, tuple(sorted(items.items()))


def _sliding_window(r: _Reader, family: str) -> int | None:
    if family == "llama" or (family in ("qwen2", "qwen3") and not r.data.get("use_sliding_window")):
        return None
    return None if r.data.get("sliding_window") is None else r.get_int("sliding_window")


def read_hf_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` (and stop tokens from ``generation_config.json`` if present).

    Raises CheckpointError naming the file and key for anything unsupported or malformed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "config.json"
    r = _Reader(path, load_json_object(path))
    arch = _architecture(r)
    family = SUPPORTED_ARCHITECTURES[arch]
    hidden, heads = r.get_int("hidden_size"), r.get_int("num_attention_heads")
    kv_heads = r.get_int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise r.fail("num_key_value_heads", f"{kv_heads} does not divide {heads} heads")
    if r.data.get("head_dim") is None and hidden % heads:
        raise r.fail("head_dim", f"absent and hidden_size {hidden} is not a multiple of {heads}")
    head_dim = r.get_int("head_dim", default=hidden // heads)
    if head_dim % 2:
        raise r.fail("head_dim", f"RoPE needs an even head_dim, got {head_dim}")
    act = r.data.get("hidden_act", "silu")
    if act != "silu":
        raise r.fail("hidden_act", f"only silu is supported, got {act!r}")
    if r.data.get("mlp_bias"):
        raise r.fail("mlp_bias", "MLP biases are not supported")
    # Qwen2 always has q/k/v biases (and none on o_proj); elsewhere the key would also add an
    # o_proj bias, which the params layout does not have.
    attention_bias = family == "qwen2"
    if family != "qwen2" and r.get_bool("attention_bias", False):
        raise r.fail("attention_bias", f"attention biases are not supported for {arch}")
    theta, rope_scaling = _rope(r)
    dtype = r.data.get("dtype", r.data.get("torch_dtype")) or "float32"
    eos = r.token_ids("eos_token_id")
    gen_path = checkpoint_dir / "generation_config.json"
    if gen_path.exists():
        gen_eos = _Reader(gen_path, load_json_object(gen_path)).token_ids("eos_token_id")
        eos += tuple(t for t in gen_eos if t not in eos)
    bos = r.token_ids("bos_token_id")
    return ModelConfig(
        vocab_size=r.get_int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.get_int("intermediate_size"),
        num_layers=r.get_int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=r.get_float("rms_norm_eps", r.data.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        attention_bias=attention_bias,
        qk_norm=family == "qwen3",
        max_position_embeddings=r.get_int("max_position_embeddings", default=2048),
        architecture=arch,
        torch_dtype=str(dtype),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=eos,
        sliding_window=_sliding_window(r, family),
    )
