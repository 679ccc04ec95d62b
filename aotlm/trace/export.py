"""Export step functions with jax.export: portable StableHLO, serialized without pickle."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import export as jax_export

from aotlm.trace.signatures import StepSpec
from aotlm.trace.steps import DONATE_ARGNUMS


def target_platforms(targets: tuple[str, ...]) -> tuple[str, ...]:
    """Platforms to lower for: `tpu:v5e:2x2` -> `tpu`; order kept, duplicates dropped."""
    platforms = [t.split(":", 1)[0] for t in targets]
    return tuple(dict.fromkeys(platforms))


def export_step(fn: Callable, spec: StepSpec, platforms: tuple[str, ...]) -> jax_export.Exported:
    jitted = jax.jit(fn, donate_argnums=DONATE_ARGNUMS[spec.name])
    return jax_export.export(jitted, platforms=platforms)(*spec.args)


def aval_list(avals) -> list[list]:
    """[[shape, dtype], ...] for the manifest (readable without deserializing the export)."""
    return [[list(a.shape), str(a.dtype)] for a in avals]
