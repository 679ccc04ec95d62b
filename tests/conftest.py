"""Shared, session-scoped artifacts: the tiny checkpoint and one bundle built from it."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path

import pytest
from bundle_factory import build_from_yaml, write_model_yaml


@pytest.fixture(scope="session", autouse=True)
def aotlm_cache_dir(tmp_path_factory) -> Path:
    """Builds cache and record their bundles here, never in the user's ~/.cache/aotlm."""
    path = tmp_path_factory.mktemp("aotlm-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path / "aotlm"
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from aotlm.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_yaml(tiny_checkpoint, tmp_path_factory) -> Path:
    """The shared tiny model.yaml: small buckets and multi-step decode (decode_steps: 4), so every
    server and engine test also runs the decode[R] path whenever all requests are decoding."""
    return write_model_yaml(tmp_path_factory.mktemp("spec"), tiny_checkpoint, decode_steps=4)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_yaml, tmp_path_factory):
    """(bundle dir, BuildResult) of the tiny model with small buckets."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return out, build_from_yaml(tiny_yaml, out)


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    """(bundle dir, BuildResult) of the real all-MiniLM-L6-v2 encoder: embed[S,B] for sequence
    lengths 16..128 and batches of 1 and 4 (8 graphs)."""
    from test_bert import minilm_dir

    buckets = {"tokens": [16, 32, 64, 128], "requests": [1, 4]}
    spec = write_model_yaml(tmp_path_factory.mktemp("minilm-spec"), minilm_dir(), buckets=buckets)
    out = tmp_path_factory.mktemp("bundles") / "minilm"
    return out, build_from_yaml(spec, out)
