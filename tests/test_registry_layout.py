"""The file:// registry (an OCI image layout on disk): same guarantees as the HTTP registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from aotlm.bundle import open_bundle
from aotlm.cli.registry import keygen, pull, push, sign
from aotlm.errors import BundleError
from aotlm.registry import pull_bundle, push_bundle
from aotlm.registry.errors import RegistryError
from aotlm.registry.layout_store import LayoutStore


def run(cmd, *args) -> tuple[int, str]:
    r = CliRunner(env={"GITHUB_SHA": None}).invoke(cmd, [str(a) for a in args])
    return r.exit_code, r.output


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def assert_nothing_written(parent: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}.")]


@pytest.fixture(scope="module")
def store(tiny_bundle, tmp_path_factory):
    """(layout dir, push result JSON, signed bundle, trusted keys dir) shared by this module."""
    work = tmp_path_factory.mktemp("layout")
    bundle = work / "tiny"
    shutil.copytree(tiny_bundle[0], bundle)
    assert run(keygen, work / "keys" / "ci")[0] == 0
    assert run(sign, bundle, "--key", work / "keys" / "ci.key")[0] == 0
    code, out = run(push, bundle, f"file://{work / 'store'}:v1", "--json")
    assert code == 0, out
    return work / "store", json.loads(out), bundle, work / "keys"


def test_layout_is_a_standard_oci_image_layout(store):
    root, r, _, _ = store
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    tags = {
        e["annotations"]["org.opencontainers.image.ref.name"]: e["digest"]
        for e in index["manifests"]
    }
    assert tags["v1"] == r["digest"]
    assert any(t.startswith("sha256-") and t.endswith(".sig") for t in tags)
    assert (root / "blobs/sha256" / r["digest"].removeprefix("sha256:")).is_file()


def test_pull_by_tag_and_digest_is_byte_identical_and_signed(store, tmp_path):
    root, r, bundle, keys = store
    for i, ref in enumerate((f"file://{root}:v1", r["ref"])):
        code, out = run(
            pull,
            ref,
            "-o",
            tmp_path / f"b{i}",
            "--trusted-keys",
            keys / "ci.pub",
            "--require-signed",
        )
        assert code == 0 and "signed by" in out, out
        assert tree(tmp_path / f"b{i}") == tree(bundle)


def test_pull_replaces_an_existing_bundle_atomically(store, tmp_path):
    root, r, bundle, _ = store
    target = tmp_path / "b"
    pull_bundle(r["ref"], target)
    (target / "stale.txt").write_text("old")
    pull_bundle(f"file://{root}:v1", target)
    assert tree(target) == tree(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_tampered_blob_is_refused(store, tmp_path):
    root, r, bundle, _ = store
    sha = open_bundle(bundle).manifest.files["tokenizer/tokenizer.json"].sha256
    blob = root / "blobs/sha256" / sha
    original = blob.read_bytes()
    try:
        blob.write_bytes(original.replace(b"{", b"[", 1))
        code, out = run(pull, r["ref"], "-o", tmp_path / "out")
        assert code == 1 and "tampered" in out and sha in out, out
        assert_nothing_written(tmp_path, tmp_path / "out")
    finally:
        blob.write_bytes(original)


def test_index_pointing_outside_the_layout_is_refused(store, tmp_path):
    root, _, _, _ = store
    evil = tmp_path / "evil"
    shutil.copytree(root, evil)
    index = json.loads((evil / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../etc/passwd"
    (evil / "index.json").write_text(json.dumps(index))
    code, out = run(pull, f"file://{evil}:v1", "-o", tmp_path / "out")
    assert code == 1 and "bad digest" in out, out
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_missing_store_tag_and_unsigned_are_clear_errors(store, tiny_bundle, tmp_path):
    root, _, _, keys = store
    cases = [
        (f"file://{tmp_path / 'nowhere'}:v1", [], "not an OCI layout"),
        (f"file://{root}:nope", [], "not found"),
    ]
    unsigned = tmp_path / "unsigned-store"
    push_bundle(tiny_bundle[0], f"file://{unsigned}:v1")
    cases.append(
        (f"file://{unsigned}:v1", ["--trusted-keys", keys, "--require-signed"], "no signatures")
    )
    for ref, extra, message in cases:
        code, out = run(pull, ref, "-o", tmp_path / "out", *extra)
        assert code == 1 and message in out, out
        assert_nothing_written(tmp_path, tmp_path / "out")


def test_push_refuses_a_corrupt_bundle_and_a_digest_ref(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle[0], bad)
    (bad / "tokenizer/tokenizer.json").write_bytes(b"{}")
    with pytest.raises(BundleError, match=r"size|does not match the manifest"):
        push_bundle(bad, f"file://{tmp_path / 's'}:v1")
    assert not (tmp_path / "s").exists()
    with pytest.raises(RegistryError, match="push to a tag"):
        push_bundle(tiny_bundle[0], f"file://{tmp_path / 's'}@sha256:" + "a" * 64)


def test_interrupted_pull_leaves_no_half_bundle(store, tmp_path, monkeypatch):
    """Ctrl-C mid-download: a new target never appears, an existing bundle stays as it was."""
    _, r, _, _ = store
    existing = tmp_path / "existing"
    pull_bundle(r["ref"], existing)
    before = tree(existing)
    real = LayoutStore.fetch_blob
    calls = {"n": 0}

    def flaky(self, digest, size, dest):
        calls["n"] += 1
        if calls["n"] == 5:
            dest.write(b"partial")
            raise KeyboardInterrupt
        return real(self, digest, size, dest)

    monkeypatch.setattr(LayoutStore, "fetch_blob", flaky)
    for target in (tmp_path / "new", existing):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            pull_bundle(r["ref"], target)
    assert not (tmp_path / "new").exists() and tree(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_generate_runs_a_signed_bundle_by_digest_with_its_executables(store):
    """The deploy path: pull by digest into the cache, trust the signature, load the pickles."""
    from aotlm.cli import main

    root, pushed, _, keys = store
    args = ["generate", pushed["ref"], "--prompt", "Hello", "--max-tokens", "3", "--json"]
    trusted = [
        *args,
        "--trusted-keys",
        str(keys),
        "--require-signed",
        "--allow-pickle",
        "trusted-signed",
    ]
    code, out = run(main, *trusted)
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert len(result["token_ids"]) == 3 and result["compiles_after_ready"] == 0
    from aotlm.state_dir import default_cache_dir

    cached = [
        p for p in (default_cache_dir() / "bundles").iterdir() if (p / "manifest.msgpack").is_file()
    ]
    assert (
        len(cached) == 1
        and open_bundle(cached[0]).digest == open_bundle(root.parent / "tiny").digest
    )
    code, out = run(main, *args, "--require-signed")
    assert code != 0 and "--require-signed needs --trusted-keys" in out
