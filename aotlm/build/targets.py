"""Build targets and the tier each one gets on this machine.

A target is `cpu`, `cuda` or `tpu:<topology>`. StableHLO is exported for every target's platform;
compiled executables are made for the platform this process runs on and, when libtpu is
installed (the `tpu` extra), for TPU topologies without a TPU (deviceless compilation).

What a compiled target's executables depend on is its fingerprint (aotlm/bundle/fingerprint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax

from aotlm.bundle.fingerprint import (
    device_topology,
    fingerprint,
    local_fingerprint,
    local_platform,
    mesh_fingerprint,
)

COMPILED = "compiled"
STABLEHLO = "stablehlo"


@dataclass(frozen=True)
class Target:
    name: str  # as written in model.yaml: cpu, cuda, tpu:v5e:2x2
    platform: str  # cpu, cuda, tpu
    topology: str = ""  # v5e:2x2 for TPU targets

    @classmethod
    def parse(cls, name: str) -> Target:
        platform, _, topology = name.partition(":")
        return cls(name=name, platform=platform, topology=topology)

    @property
    def dirname(self) -> str:
        """compiled/<dirname>/: no ':' in paths (tpu:v5e:2x2 -> tpu-v5e-2x2)."""
        return self.name.replace(":", "-")

    @property
    def generation(self) -> str:
        """The chip generation of a TPU target (v5e, v6e, v5p, tpu7x); '' otherwise."""
        return self.topology.split(":", 1)[0]


@dataclass
class TargetPlan:
    """What the build does for one target on this machine."""

    target: Target
    tier: str  # COMPILED or STABLEHLO
    reason: str = ""  # why STABLEHLO, or how it is compiled
    # The devices executables are compiled for: the first, or a mesh of the first tp (a sharded
    # build); empty: stablehlo only.
    devices: tuple[Any, ...] = ()
    fingerprint: dict = field(default_factory=dict)


def _deviceless_tpu(target: Target) -> TargetPlan:
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(target.topology, "tpu")
    except Exception as e:  # no libtpu, or a topology libtpu does not know
        reason = f"no TPU compiler here ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
        return TargetPlan(target, STABLEHLO, reason + "install the `tpu` extra to compile it")
    devices = tuple(topo.devices)
    return TargetPlan(target, COMPILED, "deviceless TPU compile", devices, fingerprint(devices))


def plan_target(target: Target, tp: int = 1, ep: int = 1) -> TargetPlan:
    """The tier `target` gets when built in this process, with the reason; `tp` * `ep` > 1: for
    executables sharded over a mesh of that many devices."""
    plan = _plan_target(target)
    n = tp * ep
    if n == 1 or plan.tier != COMPILED:
        return plan
    if len(plan.devices) < n:
        where = f"topology {target.topology}" if target.topology else "this build process"
        hint = (
            f" (on CPU: start the build with XLA_FLAGS=--xla_force_host_platform_device_count={n})"
            if target.platform == "cpu"
            else ""
        )
        return TargetPlan(
            target,
            STABLEHLO,
            f"mesh of {n} devices needs {n} {target.platform} devices and {where} has "
            f"{len(plan.devices)}: serving compiles the StableHLO at startup; for the compiled "
            f"tier build where {n} devices are visible{hint}",
        )
    plan.fingerprint |= mesh_fingerprint(tp, ep)
    plan.reason += f", mesh of {n} devices"
    return plan


def _plan_target(target: Target) -> TargetPlan:
    local = local_platform()
    if target.platform == local and local != "tpu":
        devices = tuple(jax.devices())
        return TargetPlan(target, COMPILED, f"local {local}", devices, local_fingerprint())
    if target.platform == "tpu":
        if local == "tpu":
            devices = tuple(jax.devices())
            if device_topology(devices) != _topology_dims(target):
                return _deviceless_tpu(target)
            return TargetPlan(target, COMPILED, "local tpu", devices, local_fingerprint())
        return _deviceless_tpu(target)
    return TargetPlan(
        target,
        STABLEHLO,
        f"no {target.platform} device on the build machine: serving compiles its StableHLO at "
        "startup (build on a machine with one for the compiled tier)",
    )


def _topology_dims(target: Target) -> str:
    dims = target.topology.split(":", 1)[-1].split("x")
    return "x".join(dims + ["1"] * (3 - len(dims)))
