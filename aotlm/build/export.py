"""Export step functions with jax.export: portable StableHLO, serialized without pickle."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import export as jax_export

from aotlm.build.signatures import StepSpec
from aotlm.build.steps import DONATE_ARGNUMS
from aotlm.kernels.cpu_attention import TARGET as CPU_ATTENTION


def target_platforms(targets: tuple[str, ...]) -> tuple[str, ...]:
    """Platforms to lower for: `tpu:v5e:2x2` -> `tpu`; order kept, duplicates dropped."""
    platforms = [t.split(":", 1)[0] for t in targets]
    return tuple(dict.fromkeys(platforms))


# aotlm's own CPU kernel is not on jax.export's list of custom calls with a compatibility
# guarantee; its stability is ours (a versioned target name, which the loader checks).
DISABLED_CHECKS = (jax_export.DisabledSafetyCheck.custom_call(CPU_ATTENTION),)


def export_step(fn: Callable, spec: StepSpec, platforms: tuple[str, ...]) -> jax_export.Exported:
    """On a mesh, the export carries its input shardings (from ``spec.args``) and outputs'
    (``spec.out_shardings``); it is traced against an abstract mesh, so no devices are needed."""
    kwargs = {} if spec.out_shardings is None else {"out_shardings": spec.out_shardings}
    jitted = jax.jit(fn, donate_argnums=DONATE_ARGNUMS[spec.name], **kwargs)
    return jax_export.export(jitted, platforms=platforms, disabled_checks=DISABLED_CHECKS)(
        *spec.args
    )


def aval_list(avals) -> tuple[tuple[tuple[int, ...], str], ...]:
    """((shape, dtype), ...) for the manifest (readable without deserializing the export)."""
    return tuple((tuple(a.shape), str(a.dtype)) for a in avals)


def shardings_entry(exp: jax_export.Exported) -> dict:
    """A sharded export's device count and per-argument HLO shardings, for the manifest
    (`{devices=[1,1,4]<=[4]}`: split 4 ways on the last axis); {} for one device."""
    if exp.nr_devices == 1:
        return {}
    return {
        "nr_devices": exp.nr_devices,
        "in_shardings": [str(s) for s in exp.in_shardings_hlo],
        "out_shardings": [str(s) for s in exp.out_shardings_hlo],
    }
