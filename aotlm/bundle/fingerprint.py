"""The fingerprint of a compile: everything a serialized executable depends on.

A serialized executable runs only in a process that matches its fingerprint exactly: the same
jax/jaxlib/libtpu, platform, device kind and count, topology, XLA flags, jax config and, on cpu,
the same host CPU (XLA compiles for the build host's instruction set). The build records it per
compiled target; the loader compares it with its own field by field before unpickling anything.
"""

from __future__ import annotations

import hashlib
import os
import platform as host_platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jaxlib

# jax settings that change what a compile produces (tracing settings are fixed in the export).
_JAX_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision", "jax_use_shardy_partitioner")


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


def local_fingerprint(tp: int = 1, ep: int = 1) -> dict:
    """This process's fingerprint, for executables of a bundle sharded over a tp x ep mesh."""
    return fingerprint(jax.devices()) | mesh_fingerprint(tp, ep)


def mesh_fingerprint(tp: int, ep: int = 1) -> dict:
    """The mesh executables are compiled for (absent for one device, as before meshes)."""
    if ep > 1:
        return {"mesh": {"tp": tp, "ep": ep}}
    return {"mesh": {"tp": tp}} if tp > 1 else {}


def fingerprint_diff(recorded: dict, local: dict) -> list[str]:
    """Fields that differ, as 'field: built with X, this process has Y'."""
    keys = sorted(set(recorded) | set(local))
    return [
        f"{k}: built with {recorded.get(k)!r}, this process has {local.get(k)!r}"
        for k in keys
        if recorded.get(k) != local.get(k)
    ]


def local_platform() -> str:
    """This process's platform as targets name it (jax says 'gpu' for cuda)."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend
