"""Helpers to write model.yaml files and build bundles in tests."""

from __future__ import annotations

from pathlib import Path

import yaml

SMALL_BUCKETS = {"tokens": [16, 32, 64], "requests": [1, 2, 4], "page_size": 16}


def write_model_yaml(directory: Path, checkpoint: Path, **overrides) -> Path:
    """A model.yaml for `checkpoint` with small buckets; keyword overrides replace top-level keys."""
    spec = {
        "model": str(checkpoint),
        "dtype": "float32",
        "max_seq_len": 128,
        "buckets": dict(SMALL_BUCKETS),
        "targets": ["cpu"],
        **overrides,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def build_from_yaml(path: Path, out: Path, jobs: int = 1):
    from aotlm.build.bundle import build_bundle
    from aotlm.build.model_yaml import load_build_config

    return build_bundle(load_build_config(path), out, jobs=jobs)


def bundle_last_logits(engine, prompt: list[int]):
    """f32 logits [V] after `prompt`, fed to the engine's runner in chunks of its largest token
    bucket (pages 1, 2, ... as the block table): what the oracle tests compare."""
    from aotlm.runtime.generation.batch import ChunkInput

    runner = engine.runner
    table = list(range(1, 1 + runner.pages_per_seq))
    chunk = max(runner.token_buckets)
    for start in range(0, len(prompt), chunk):
        piece = prompt[start : start + chunk]
        last = start + len(piece) == len(prompt)
        logits = runner.compute_logits([ChunkInput(piece, start, table, samples=last)])
    return logits[0]
