"""`aotlm diff`: differences reported from the manifests, in text and JSON."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from aotlm.bundle import read_manifest
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.cli.registry import diff
from aotlm.registry import diff_bundles


def _variant(src: Path, dst: Path) -> Path:
    """A bundle with one more token bucket, a cuda target, a changed and a new file (manifest only)."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)[0].to_dict()
    m["buckets"] = {**m["buckets"], "tokens": [*m["buckets"]["tokens"], 4096]}
    m["serving"] = {**m["serving"], "targets": ["cpu", "cuda"]}
    files = dict(m["files"])
    files["tokenizer/tokenizer.json"] = {**files["tokenizer/tokenizer.json"], "sha256": "0" * 64}
    files["exported/extra.jaxexp"] = {"sha256": "1" * 64, "size": 10}
    m["files"] = files
    packed = pack_manifest(m)
    (dst / MANIFEST_FILE).write_bytes(packed)
    (dst / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")
    return dst


def test_identical_bundles(tiny_bundle):
    d = diff_bundles(tiny_bundle[0], tiny_bundle[0])
    assert d["identical"] and not d["files"]["changed"] and not d["buckets"]


def test_diff_reports_buckets_targets_and_files(tiny_bundle, tmp_path):
    a = tiny_bundle[0]
    b = _variant(a, tmp_path / "b")
    d = diff_bundles(a, b)
    assert not d["identical"]
    assert d["buckets"]["buckets.tokens"][1][-1] == 4096
    assert d["serving"]["serving.targets"] == [["cpu"], ["cpu", "cuda"]]
    assert d["files"] == {
        "added": ["exported/extra.jaxexp"],
        "removed": [],
        "changed": ["tokenizer/tokenizer.json"],
    }
    r = CliRunner().invoke(diff, [str(a), str(b)])
    assert r.exit_code == 0 and "serving.targets: ['cpu'] -> ['cpu', 'cuda']" in r.output
    assert "  + exported/extra.jaxexp" in r.output and "  ~ tokenizer/tokenizer.json" in r.output
    r = CliRunner().invoke(diff, [str(a), str(b), "--json", "--exit-code"])
    assert r.exit_code == 1 and json.loads(r.output)["files"]["added"] == ["exported/extra.jaxexp"]
