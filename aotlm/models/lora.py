"""LoRA adapters as data: N slots of low-rank updates per target weight, one slot per token.

model.yaml ``lora: {max_loras: N, max_rank: R, targets: [...]}`` fixes N, R and the targets at
build time; the graphs take the slots as part of the params pytree (``params["lora"]``) and a slot
index per token (0: the base model), so loading an adapter writes numbers into a slot and
compiles nothing.

Layout, per target weight W ``[L, in, out]``: ``a [L, in, N*R]`` and ``b [L, N*R, out]``, slot s
(1..N) in columns / rows ``(s-1)*R .. s*R`` — its A transposed, and its B transposed times the
adapter's scaling (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA), zero past its rank. A token
of slot s adds ``((x @ a) * keep_s) @ b``, ``keep_s`` zeroing the other slots' columns. Why this
rather than gathering each token's A and B (``a[slot]``: ``[T, in, R]`` per target, then a batched
matmul): two plain dots over all slots cost ``T * (in + out) * N * R`` multiply-adds, ~N*R / in of
the base projection (8 slots of rank 16 on a 1024-wide model: 1/8 of it), with no gather of
``T * in * R`` weights (and they would shard like the base weight: a column-parallel W's ``b``
split on its output, a row-parallel W's ``a`` on its input). Past N*R ~ in / 2 a grouped (ragged) matmul
over slots is the better kernel; model.yaml bounds N*R (``MAX_SLOT_COLUMNS``) for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aotlm.kernels.quant_matmul import dense_f32

# PEFT's module names -> the params layout's (aotlm/models/llama.py:layer_shapes).
TARGETS: dict[str, str] = {
    "q_proj": "wq",
    "k_proj": "wk",
    "v_proj": "wv",
    "o_proj": "wo",
    "gate_proj": "w_gate",
    "up_proj": "w_up",
    "down_proj": "w_down",
}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# The most columns (max_loras * max_rank) the slots may take: past it the all-slots dots cost
# more than a grouped matmul would (see the module note).
MAX_SLOT_COLUMNS = 512
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """model.yaml ``lora:``: slots, the largest rank a slot holds, the PEFT modules adapted."""

    max_loras: int
    max_rank: int
    targets: tuple[str, ...]

    @property
    def width(self) -> int:
        """Columns of every ``a`` (rows of every ``b``): all slots side by side."""
        return self.max_loras * self.max_rank

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_loras": self.max_loras,
            "max_rank": self.max_rank,
            "targets": list(self.targets),
        }


def lora_config(record: dict[str, Any]) -> LoraConfig:
    """The manifest's ``serving.lora`` record as a LoraConfig."""
    return LoraConfig(record["max_loras"], record["max_rank"], tuple(record["targets"]))


def target_shapes(shapes: dict[str, tuple[int, ...]], lora: LoraConfig) -> dict[str, tuple]:
    """params name -> ((L, in, N*R), (L, N*R, out)) for each target, from the layer shapes."""
    out = {}
    for module in lora.targets:
        n, d_in, d_out = shapes[TARGETS[module]]
        out[TARGETS[module]] = ((n, d_in, lora.width), (n, lora.width, d_out))
    return out


def abstract_lora(shapes: dict[str, tuple[int, ...]], lora: LoraConfig, dtype) -> dict:
    """``params["lora"]`` as ShapeDtypeStructs: {name: {"a": ..., "b": ...}}."""
    dt = jnp.dtype(dtype)
    return {
        name: {"a": jax.ShapeDtypeStruct(a, dt), "b": jax.ShapeDtypeStruct(b, dt)}
        for name, (a, b) in target_shapes(shapes, lora).items()
    }


def empty_lora(shapes: dict[str, tuple[int, ...]], lora: LoraConfig, dtype) -> dict:
    """Every slot empty (zeros): host arrays in ``abstract_lora``'s structure."""
    return {
        name: {"a": np.zeros(a, dtype), "b": np.zeros(b, dtype)}
        for name, (a, b) in target_shapes(shapes, lora).items()
    }


def keep_mask(adapters: jax.Array, width: int, rank: int, dtype) -> jax.Array:
    """[T, width] in ``dtype``: 1 on the ``rank`` columns of each token's slot (none for 0)."""
    column_slot = jnp.arange(width, dtype=jnp.int32) // rank + 1
    return (adapters.astype(jnp.int32)[:, None] == column_slot[None, :]).astype(dtype)


def delta(x: jax.Array, ab: dict[str, jax.Array], keep: jax.Array) -> jax.Array:
    """x [T, in], one layer's ``{"a": [in, N*R], "b": [N*R, out]}``, keep [T, N*R] -> [T, out]
    in x's dtype: each token's own slot's update (zero for slot 0). f32 accumulation, through
    the base projections' ``dense_f32``."""
    low = dense_f32(x, ab["a"]) * keep.astype(jnp.float32)
    return dense_f32(low.astype(x.dtype), ab["b"]).astype(x.dtype)


def write_slot(stacks: dict, slot: int, updates: dict, lora: LoraConfig) -> None:
    """Put one adapter into ``slot`` (1..N) of host ``stacks`` (``empty_lora``'s structure), in
    place. updates: params name -> (A [L, r, in], B [L, out, r] already times the scaling), f32;
    targets the adapter lacks are zeroed in the slot."""
    if not 1 <= slot <= lora.max_loras:
        raise ValueError(f"slot {slot} outside 1..{lora.max_loras}")
    cols = slice((slot - 1) * lora.max_rank, slot * lora.max_rank)
    for name, ab in stacks.items():
        ab["a"][:, :, cols] = 0
        ab["b"][:, cols, :] = 0
        if name not in updates:
            continue
        a, b = updates[name]
        r = a.shape[1]
        first = cols.start
        ab["a"][:, :, first : first + r] = np.swapaxes(a, 1, 2).astype(ab["a"].dtype)
        ab["b"][:, first : first + r, :] = np.swapaxes(b, 1, 2).astype(ab["b"].dtype)


def clear_slot(stacks: dict, slot: int, lora: LoraConfig) -> None:
    """Empty ``slot`` of host ``stacks`` in place."""
    write_slot(stacks, slot, {}, lora)


__all__ = [
    "ATTENTION_TARGETS",
    "MAX_SLOT_COLUMNS",
    "MLP_TARGETS",
    "TARGETS",
    "LoraConfig",
    "abstract_lora",
    "clear_slot",
    "delta",
    "empty_lora",
    "keep_mask",
    "lora_config",
    "target_shapes",
    "write_slot",
]
