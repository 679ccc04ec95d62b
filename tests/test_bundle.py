"""The bundle contract: reproducible digest, and every kind of damage refused before use."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_factory import build_from_yaml
from click.testing import CliRunner

from aotlm.bundle import FORMAT_VERSION, open_bundle, read_manifest
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.bundle.manifest_read import unpack_manifest
from aotlm.cli import main
from aotlm.errors import BundleError
from aotlm.runtime.load.compile_guard import CompileCounter
from aotlm.runtime.load.loader import load_bundle


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(bundle: Path, **changes) -> None:
    m = read_manifest(bundle)[0].to_dict()
    m.update(changes)
    packed = pack_manifest(m)
    (bundle / MANIFEST_FILE).write_bytes(packed)
    (bundle / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")


def test_manifest_lists_every_file_and_function(tiny_bundle):
    path, result = tiny_bundle
    b = open_bundle(path)
    names = [f.name for f in b.manifest.functions]
    # forward per token bucket, logits per (token, request), sample per request bucket
    assert names.count("forward") == 3 and names.count("logits") == 9 and names.count("sample") == 3
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert on_disk == set(b.manifest.files) | {MANIFEST_FILE, DIGEST_FILE}
    assert "weights/model.safetensors" in on_disk and "tokenizer/tokenizer.json" in on_disk
    assert "tokenizer/chat_template.jinja" in on_disk
    assert b.manifest.function("forward").donate_argnums == (1, 2)
    assert b.digest == result.digest


def test_same_yaml_builds_the_same_digest(tiny_yaml, tiny_bundle, tmp_path):
    again = build_from_yaml(tiny_yaml, tmp_path / "again", jobs=2)
    assert again.digest == tiny_bundle[1].digest


def test_every_flipped_byte_is_refused_by_verify_and_load(tiny_bundle, tmp_path):
    path, _ = tiny_bundle
    m, _ = read_manifest(path)
    for rel in [*sorted(m.files), MANIFEST_FILE, DIGEST_FILE]:
        b = _copy(path, tmp_path / rel.replace("/", "_"))
        target = b / rel
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        result = CliRunner().invoke(main, ["verify", str(b)])
        assert result.exit_code != 0, rel
        shown = Path(rel).name if rel != DIGEST_FILE else MANIFEST_FILE
        assert shown in result.output and "rebuild" in result.output, result.output
        counter = CompileCounter()
        with pytest.raises(BundleError, match="rebuild"):
            load_bundle(b, counter=counter)
        assert counter.before_seal == 0, "nothing may be compiled from a damaged bundle"
        counter.close()


def test_missing_file_is_named(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path)
    (b / "weights/model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors: missing"):
        open_bundle(b)


def test_newer_format_version_says_upgrade_or_rebuild(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path)
    _rewrite_manifest(b, format_version=99, aotlm_version="9.0.0")
    with pytest.raises(BundleError, match=r"written by aotlm 9\.0\.0.*upgrade aotlm, or rebuild"):
        open_bundle(b)


@pytest.mark.parametrize("version", [0, 5])
def test_an_older_format_version_says_rebuild(tiny_bundle, tmp_path, version):
    b = _copy(tiny_bundle[0], tmp_path)
    _rewrite_manifest(b, format_version=version, aotlm_version="0.0.9")
    with pytest.raises(BundleError) as e:
        open_bundle(b)
    message = str(e.value)
    assert f"format_version {version}" in message and "written by aotlm 0.0.9" in message
    assert f"reads formats 7, 8, 9, 10, 11, {FORMAT_VERSION}: rebuild the bundle" in message
    assert "manifest.msgpack" in message


def test_a_written_manifest_reads_back_equal(tiny_bundle):
    m, _ = read_manifest(tiny_bundle[0])
    assert unpack_manifest(pack_manifest(m)) == m
    assert m.kind == "decoder" and m.serving.tp == 1 and m.serving.attention is not None


def test_manifest_structure_errors_name_the_field():
    with pytest.raises(BundleError, match="not a valid msgpack"):
        unpack_manifest(b"\xc1garbage")
    with pytest.raises(BundleError, match="not an aotlm bundle"):
        unpack_manifest(pack_manifest({"format": "zip"}))
    bad = {
        "format": "aotlm-bundle",
        "format_version": FORMAT_VERSION,
        "files": {"x": {"sha256": "0" * 64, "size": 1}},
    }
    with pytest.raises(BundleError, match="aotlm_version"):
        unpack_manifest(pack_manifest(bad))


def test_traversal_path_in_files_is_refused(tiny_bundle, tmp_path):
    b = _copy(tiny_bundle[0], tmp_path)
    files = read_manifest(b)[0].to_dict()["files"]
    files["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    _rewrite_manifest(b, files=files)
    with pytest.raises(BundleError, match="escapes the bundle"):
        open_bundle(b)


def test_the_exported_samplers_and_decode_take_named_inputs(tiny_bundle):
    """The step inputs' names travel through jax.export: a loader calls the graphs with the same
    Sampling / Penalties / DecodeRows objects the host packs (kernels/step_inputs.py)."""
    from jax import export as jax_export

    from aotlm.kernels.step_inputs import DecodeRows, Penalties, Sampling, TokenMask

    b = open_bundle(tiny_bundle[0])
    kinds = {}
    for fn in b.manifest.functions:
        tree = jax_export.deserialize(bytearray(b.read(fn.file))).in_tree
        args, _ = tree.unflatten(range(tree.num_leaves))
        kinds[fn.name] = tuple(type(a).__name__ for a in args)
    assert kinds["sample"] == ("int", Sampling.__name__)
    assert kinds["sample_penalized"] == ("int", Sampling.__name__, Penalties.__name__)
    masked = ("int", Sampling.__name__, Penalties.__name__, TokenMask.__name__)
    assert kinds["sample_masked"] == masked
    assert kinds["decode"][3:] == (DecodeRows.__name__, Sampling.__name__, "int")
