"""The XLA:CPU paged-attention kernel: a C++ XLA FFI custom call (cpu/paged_attention.cc).

Why: on XLA:CPU the blocked jnp path spends most of a decode step gathering KV pages and in loop
overhead; the kernel walks each request's pages in place. Its twin and oracle is
``attention.paged_attention_ref`` (same contract, tests compare them).

The library is compiled when aotlm is installed (setup.py, against jaxlib's FFI headers) and
registered with XLA on first use: when a graph lowers the kernel, and by the loader before it
deserializes a bundle whose manifest lists ``TARGET`` (a compiled or StableHLO graph that calls
it resolves the target only when XLA compiles or loads it). The
target name carries a version: a change to the kernel's contract gets a new name, so a bundle
never runs against a kernel that computes something else.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "aotlm_paged_attention_cpu_v1"
_SYMBOL = "AotlmPagedAttentionCpuV1"
_LIBRARY_STEM = "_cpu_attention"
_LOADED: list[ctypes.CDLL] = []


class KernelUnavailable(RuntimeError):
    """The compiled library is missing (aotlm was not installed with its extension built)."""


def library_path() -> Path | None:
    """The built shared library next to this file, or None."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"{_LIBRARY_STEM}{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def _register() -> str | None:
    """Load and register the kernel once; None when it loaded, else why not."""
    path = library_path()
    if path is None:
        return (
            f"{Path(__file__).parent / _LIBRARY_STEM}*.so is not built: reinstall aotlm "
            "(`pip install -e .` or scripts/venv.sh, which compile it with the C++ compiler)"
        )
    try:
        library = ctypes.CDLL(str(path))
        handler = getattr(library, _SYMBOL)
    except (OSError, AttributeError) as e:
        return f"{path} cannot be loaded ({e}): reinstall aotlm to rebuild it"
    _LOADED.append(library)  # XLA keeps calling into it: never let it be collected
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return None


def require() -> None:
    """Register the kernel or raise KernelUnavailable saying how to get it."""
    why = _register()
    if why is not None:
        raise KernelUnavailable(f"aotlm's CPU attention kernel ({TARGET}): {why}")


def paged_attention_cpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    positions: jax.Array,
    token_req: jax.Array,
    block_tables: jax.Array,
    layer: jax.Array | int,
    scale: float,
    window: int | None = None,
) -> jax.Array:
    """``paged_attention_ref``'s contract, as the custom call (XLA:CPU only).

    k_pages, v_pages: ``[L, num_pages, S, KV, D]`` (with ``layer``) or one layer
    ``[num_pages, S, KV, D]``; dtypes float32, bfloat16 or float16; head_dim a multiple of 8.
    """
    require()
    if k_pages.ndim == 4:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype))
    return call(
        q,
        k_pages,
        v_pages,
        positions.astype(jnp.int32),
        token_req.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        jnp.asarray(layer, jnp.int32),
        scale=np.float32(scale),
        window=np.int32(window or 0),
    )
