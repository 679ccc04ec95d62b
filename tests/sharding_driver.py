"""Build and serve one checkpoint at several tensor-parallel degrees, in a process that sees 8
fake CPU devices; print one JSON line per bundle for tests/test_sharding.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_driver.py SPEC.json

SPEC: {"checkpoint", "out", "tps": [1, 4, 8], "prompts": [[ids]], "max_tokens", "stablehlo_tp"};
"meshes": [[tp, ep], ...] instead of "tps" for expert-parallel bundles.
Each bundle: last-position logits of every prompt (a fresh KV cache per prompt), then greedy
tokens of all prompts together (continuous batching), on a strict engine. `stablehlo_tp` also
serves that bundle with allow_pickle=never, so both tiers run sharded.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import yaml
from bundle_factory import bundle_last_logits

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle import read_manifest
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.load.trust import TrustPolicy

BUCKETS = {"tokens": [32], "requests": [4], "page_size": 16}
# Communication ops in an XLA HLO dump (the per-layer scan body appears once).
COLLECTIVE = re.compile(
    r"= \S+ (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)\("
)


def serve(bundle: Path, spec: dict, trust: TrustPolicy | None = None) -> dict:
    engine = Engine.from_bundle(bundle, strict=True, trust=trust)
    logits = [bundle_last_logits(engine, p).tolist() for p in spec["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    results = engine.generate(spec["prompts"], params)
    loaded = engine.loaded
    forward_hlo = loaded.executables[("forward", (BUCKETS["tokens"][-1],))].as_text()
    return {
        "tier": loaded.tier,
        "tier_reason": loaded.timings["tier_reason"],
        "tokens": [list(r[0].token_ids) for r in results],
        "logits": logits,
        "compiles_after_ready": engine.compiles_after_ready,
        "mesh_devices": 1 if loaded.mesh is None else loaded.mesh.devices.size,
        "weight_shards": _shards(loaded.params["layers"]["wq"]),
        "expert_shards": _shards(loaded.params["layers"]["we_up"])
        if "we_up" in loaded.params["layers"]
        else [],
        "kv_shards": _shards(engine.runner.k_pages),
        "collectives": dict(Counter(COLLECTIVE.findall(forward_hlo))),
        "decode_calls": sum(
            n for (name, _), n in engine.runner.bucket_calls.items() if name == "decode"
        ),
    }


def _shards(x) -> list[list[int]]:
    x = x["weight"] if isinstance(x, dict) else x  # a quantized weight: its values' shards
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def run(spec: dict, out: Path) -> dict:
    """Run this driver on ``spec`` in a process with 8 fake CPU devices: (tp, ep, tier) ->
    that bundle's report."""
    (out / "spec.json").write_text(json.dumps(spec | {"out": str(out)}))
    env = os.environ | {
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(out / "spec.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["tp"], r["ep"], r["tier"]): r for r in reports}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    for tp, ep in spec.get("meshes") or [[tp, 1] for tp in spec["tps"]]:
        name = f"tp{tp}" + (f"ep{ep}" if ep > 1 else "")
        yaml_path = out / f"{name}.yaml"
        model = {"model": spec["checkpoint"], "dtype": "float32", "max_seq_len": 64}
        # decode_steps: the multi-step decode graphs run sharded too (generate's decodes)
        model |= {"buckets": BUCKETS, "targets": ["cpu"], "decode_steps": 4}
        if tp * ep > 1:
            model["mesh"] = {"tp": tp} | ({"ep": ep} if ep > 1 else {})
        if spec.get("quantization"):
            model["quantization"] = spec["quantization"]
        yaml_path.write_text(yaml.safe_dump(model))
        bundle = out / name
        result = build_bundle(load_build_config(yaml_path), bundle)
        manifest = read_manifest(bundle)[0].to_dict()
        report = {
            "tp": tp,
            "ep": ep,
            "build_tier": result.targets["cpu"]["tier"],
            "memory_plan": result.targets["cpu"]["memory_plan"],
            "serving_mesh": manifest["serving"].get("mesh"),
            "fingerprint_mesh": manifest["compiled"]["cpu"]["fingerprint"].get("mesh"),
            "nr_devices": sorted({f.get("nr_devices", 1) for f in manifest["functions"]}),
            **serve(bundle, spec),
        }
        print(json.dumps(report), flush=True)
        if tp == spec.get("stablehlo_tp"):
            report = serve(bundle, spec, TrustPolicy(allow_pickle="never"))
            print(json.dumps({"tp": tp, "ep": ep, "build_tier": "stablehlo", **report}), flush=True)


if __name__ == "__main__":
    assert len(jax.devices()) == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    main(sys.argv[1])
