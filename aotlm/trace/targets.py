"""Build targets, the tier each one gets on this machine, and the fingerprint of a compile.

A target is `cpu`, `cuda` or `tpu:<topology>`. StableHLO is exported for every target's platform;
compiled executables are made for the platform this process runs on and, when libtpu is
installed (the `tpu` extra), for TPU topologies without a TPU (deviceless compilation).

A serialized executable runs only in a process that matches its fingerprint exactly: the same
jax/jaxlib/libtpu, platform, device kind and count, topology, XLA flags, jax config and, on cpu,
the same host CPU (XLA compiles for the build host's instruction set).
"""

from __future__ import annotations

import hashlib
import os
import platform as host_platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jaxlib

COMPILED = "compiled"
STABLEHLO = "stablehlo"
# jax settings that change what a compile produces (tracing settings are fixed in the export).
_JAX_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision", "jax_use_shardy_partitioner")


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


def _libtpu_version() -> str:
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return ""


def host_cpu() -> str:
    """The build host's CPU model and a hash of its feature flags (XLA:CPU code uses them)."""
    model, flags = host_platform.processor() or host_platform.machine(), ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not flags:
                model = value.strip()
            if key in ("flags", "Features"):
                flags = " ".join(sorted(value.split()))
                break
    digest = hashlib.sha256(flags.encode()).hexdigest()[:16]
    return f"{host_platform.machine()} {model} flags:{digest}"


def device_topology(devices: list[Any]) -> str:
    """'2x2x1' from TPU device coordinates (the same on a real slice and a deviceless topology)."""
    coords = [tuple(getattr(d, "coords", ()) or ()) for d in devices]
    if not coords or not coords[0]:
        return ""
    return "x".join(str(max(c[i] for c in coords) + 1) for i in range(len(coords[0])))


def fingerprint(devices: list[Any]) -> dict:
    """Everything a serialized executable depends on, for a process whose devices are `devices`."""
    dev = devices[0]
    is_tpu = dev.platform == "tpu"
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "libtpu": _libtpu_version() if is_tpu else "",
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": len(devices),
        "topology": device_topology(devices) if is_tpu else "",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "libtpu_init_args": os.environ.get("LIBTPU_INIT_ARGS", "") if is_tpu else "",
        "jax_config": {k: str(getattr(jax.config, k, None)) for k in _JAX_CONFIG},
        "host_cpu": host_cpu() if dev.platform == "cpu" else "",
    }


def local_fingerprint(tp: int = 1) -> dict:
    """This process's fingerprint, for executables of a bundle sharded over `tp` devices."""
    return fingerprint(jax.devices()) | mesh_fingerprint(tp)


def mesh_fingerprint(tp: int) -> dict:
    """The mesh executables are compiled for (absent for one device, as before meshes)."""
    return {"mesh": {"tp": tp}} if tp > 1 else {}


def fingerprint_diff(recorded: dict, local: dict) -> list[str]:
    """Fields that differ, as 'field: built with X, this process has Y'."""
    keys = sorted(set(recorded) | set(local))
    return [
        f"{k}: built with {recorded.get(k)!r}, this process has {local.get(k)!r}"
        for k in keys
        if recorded.get(k) != local.get(k)
    ]


def _deviceless_tpu(target: Target) -> TargetPlan:
    try:
        from jax.experimental import topologies

        topo = topologies.get_topology_desc(target.topology, "tpu")
    except Exception as e:  # no libtpu, or a topology libtpu does not know
        reason = f"no TPU compiler here ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
        return TargetPlan(target, STABLEHLO, reason + "install the `tpu` extra to compile it")
    devices = tuple(topo.devices)
    return TargetPlan(target, COMPILED, "deviceless TPU compile", devices, fingerprint(devices))


def local_platform() -> str:
    """This process's platform as targets name it (jax says 'gpu' for cuda)."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def plan_target(target: Target, tp: int = 1) -> TargetPlan:
    """The tier `target` gets when built in this process, with the reason; `tp` > 1: for
    executables sharded over a mesh of that many devices."""
    plan = _plan_target(target)
    if tp == 1 or plan.tier != COMPILED:
        return plan
    if len(plan.devices) < tp:
        where = f"topology {target.topology}" if target.topology else "this build process"
        hint = (
            f" (on CPU: start the build with XLA_FLAGS=--xla_force_host_platform_device_count={tp})"
            if target.platform == "cpu"
            else ""
        )
        return TargetPlan(
            target,
            STABLEHLO,
            f"mesh tp={tp} needs {tp} {target.platform} devices and {where} has "
            f"{len(plan.devices)}: serving compiles the StableHLO at startup; for the compiled "
            f"tier build where {tp} devices are visible{hint}",
        )
    plan.fingerprint |= mesh_fingerprint(tp)
    plan.reason += f", mesh of {tp} devices"
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
