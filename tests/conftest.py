"""Shared, session-scoped artifacts: the tiny checkpoint and one bundle built from it."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import pytest
from bundle_factory import build_from_yaml, write_model_yaml


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from aotlm.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_yaml(tiny_checkpoint, tmp_path_factory) -> Path:
    return write_model_yaml(tmp_path_factory.mktemp("spec"), tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_yaml, tmp_path_factory):
    """(bundle dir, BuildResult) of the tiny model with small buckets."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return out, build_from_yaml(tiny_yaml, out)
