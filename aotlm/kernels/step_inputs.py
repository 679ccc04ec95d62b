"""The per-row inputs of the sampler and decode graphs, as named pytrees: one line per field.

Each field line says its name, dtype and the value a padding row gets. From it come the traced
signature (`avals`), the host packing (`pack`, which reads the same-named attribute of every row:
`ChunkInput`'s), and the exported calling convention: the classes are registered with
`jax.export`, so the names travel with the graphs and a loader calls them with the same objects.
A new per-row input (a grammar's token bitmask, a LoRA slot) is one more field here and a use of
it in the kernel; nothing in between counts argument positions.

Changing a field changes the graphs' calling convention: bump the bundle format
(aotlm/bundle/format.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax import export


def _column(dtype: type, pad: float | int, width: str | None = None) -> Any:
    """A field of one value per row, or with `width` (a named length) `width` values per row."""
    return dataclasses.field(metadata={"dtype": np.dtype(dtype), "pad": pad, "width": width})


class _Rows:
    """What the per-row input classes share: their abstract values and their host packing."""

    @classmethod
    def avals(cls, rows: int, **widths: int):
        """The abstract inputs of a graph with `rows` rows (what the build traces)."""
        return cls(*(jax.ShapeDtypeStruct(_shape(f, rows, widths), f.metadata["dtype"])
                     for f in dataclasses.fields(cls)))  # fmt: skip

    @classmethod
    def pack(cls, picked: Sequence[Any], rows: int, **widths: int):
        """The fields of `picked` (objects with same-named attributes, or dicts), padded to
        `rows` rows of the field's pad value."""
        return cls(*(_packed(f, picked, rows, widths) for f in dataclasses.fields(cls)))


def _shape(f: dataclasses.Field, rows: int, widths: dict[str, int]) -> tuple[int, ...]:
    width = f.metadata["width"]
    return (rows,) if width is None else (rows, widths[width])


def _packed(f: dataclasses.Field, picked: Sequence[Any], rows: int, widths: dict) -> np.ndarray:
    dtype, pad = f.metadata["dtype"], f.metadata["pad"]
    values = [p[f.name] if isinstance(p, dict) else getattr(p, f.name) for p in picked]
    if f.metadata["width"] is None:
        if dtype == np.uint32:  # seeds: any Python int, taken modulo 2**32
            values = [v & 0xFFFFFFFF for v in values]
        return np.asarray(values + [pad] * (rows - len(values)), dtype)
    out = np.full(_shape(f, rows, widths), pad, dtype)
    for i, v in enumerate(values):
        if len(v) > out.shape[1]:
            raise ValueError(
                f"{f.name}: {len(v)} values exceed {f.metadata['width']}={out.shape[1]}"
            )
        out[i, : len(v)] = v
    return out


def _register(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    jax.tree_util.register_dataclass(cls)
    export.register_pytree_node_serialization(
        cls,
        serialized_name=f"aotlm.{cls.__name__}",
        serialize_auxdata=lambda aux: b"",
        deserialize_auxdata=lambda data: (),
    )
    return cls


@_register
class Sampling(_Rows):
    """How each row picks its token (sample, sample_penalized and decode take it)."""

    temperature: jax.Array = _column(np.float32, 0.0)  # 0: greedy
    top_k: jax.Array = _column(np.int32, 0)  # <= 0: off
    top_p: jax.Array = _column(np.float32, 1.0)
    min_p: jax.Array = _column(np.float32, 0.0)
    seed: jax.Array = _column(np.uint32, 0)
    step: jax.Array = _column(np.int32, 0)  # tokens the row generated so far: keys its draws
    want_logprobs: jax.Array = _column(np.int32, 0)  # 1: the row's request asked for logprobs


@_register
class Penalties(_Rows):
    """Presence / frequency / repetition penalties (sample_penalized); padding rows neutral."""

    history: jax.Array = _column(np.int32, -1, "max_seq_len")  # prompt then output; -1: none
    prompt_len: jax.Array = _column(np.int32, 0)  # history[:prompt_len] is the prompt
    presence_penalty: jax.Array = _column(np.float32, 0.0)
    frequency_penalty: jax.Array = _column(np.float32, 0.0)
    repetition_penalty: jax.Array = _column(np.float32, 1.0)


@_register
class DecodeRows(_Rows):
    """Where each row of a decode[R] call stands (its sampling comes as `Sampling`)."""

    token: jax.Array = _column(np.int32, 0)  # the row's last token, not yet in the KV cache
    position: jax.Array = _column(np.int32, 0)  # that token's position
    limit: jax.Array = _column(np.int32, -1)  # the last position it may write; padding: never
    block_table: jax.Array = _column(np.int32, 0, "pages_per_seq")


@_register
class TokenMask(_Rows):
    """The tokens each row may take next (sample_masked), as a grammar engine writes them: bit
    ``t % 32`` of word ``t // 32`` is token t. Padding rows and rows without a grammar: all bits
    set (-1), nothing forbidden."""

    bitmask: jax.Array = _column(np.int32, -1, "mask_words")
