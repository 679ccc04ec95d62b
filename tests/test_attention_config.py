"""The attention kernel's block sizes: a model.yaml key, recorded in the manifest per build."""

from __future__ import annotations

import pytest
from bundle_factory import write_model_yaml
from click.testing import CliRunner

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.bundle import read_manifest
from aotlm.cli import main
from aotlm.errors import ConfigError


def test_block_sizes_are_recorded_and_shown(tiny_checkpoint, tmp_path):
    spec = write_model_yaml(
        tmp_path / "spec", tiny_checkpoint, attention={"block_queries": 32, "block_kv_pages": 2}
    )
    build_bundle(load_build_config(spec), tmp_path / "b", compile_targets=False)
    manifest = read_manifest(tmp_path / "b")[0].to_dict()
    attention = manifest["serving"]["attention"]
    assert attention["kernel"] == "aotlm_ragged_paged_attention"
    assert attention["block_sizes"] == {"queries": 32, "kv_pages": 2}
    shown = CliRunner().invoke(main, ["inspect", str(tmp_path / "b")])
    assert "block_queries=32 block_kv_pages=2" in shown.output


def test_default_block_sizes_are_resolved_into_the_manifest(tiny_bundle):
    blocks = read_manifest(tiny_bundle[0])[0].serving.attention.block_sizes
    assert blocks["queries"] >= 1 and blocks["kv_pages"] >= 1


def test_bad_block_sizes_name_the_key(tiny_checkpoint, tmp_path):
    bad = write_model_yaml(tmp_path / "a", tiny_checkpoint, attention={"block_queries": 0})
    with pytest.raises(ConfigError, match=r"attention\.block_queries"):
        load_build_config(bad)
    unknown = write_model_yaml(tmp_path / "b", tiny_checkpoint, attention={"blocks": 4})
    with pytest.raises(ConfigError, match="attention"):
        load_build_config(unknown)
    # 3 query tokens x 2 query heads per KV head is not a multiple of the 8 f32 sublanes.
    illegal = write_model_yaml(tmp_path / "c", tiny_checkpoint, attention={"block_queries": 3})
    with pytest.raises(ConfigError, match=r"attention: block_sizes\.queries=3"):
        build_bundle(load_build_config(illegal), tmp_path / "x", compile_targets=False)
