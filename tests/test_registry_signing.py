"""Ed25519 bundle signatures: what verify_signature accepts, and every way it says no."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from aotlm.bundle import read_manifest
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.cli.registry import sign
from aotlm.registry import generate_keypair, load_trusted_keys, sign_bundle, verify_signature
from aotlm.registry.errors import SignatureError
from aotlm.registry.signing import enforce_policy, load_private_key, read_signature_files


@pytest.fixture
def setup(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], bundle)
    key_path, _, keyid = generate_keypair(tmp_path / "keys" / "ci")
    generate_keypair(tmp_path / "other" / "x")
    return bundle, key_path, tmp_path / "keys", tmp_path / "other", keyid


def test_keygen_writes_a_private_key_only_the_owner_can_read(setup):
    _, key_path, keys, _, keyid = setup
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert list(load_trusted_keys(keys)) == [keyid]
    with pytest.raises(SignatureError, match="already exists"):
        generate_keypair(keys / "ci")


def test_sign_then_verify_and_digest_unchanged(setup):
    bundle, key_path, keys, other, keyid = setup
    before = read_manifest(bundle)[1]
    out = sign_bundle(bundle, load_private_key(key_path.read_bytes(), "k"))
    assert out == bundle / "signatures" / f"{keyid}.sig"
    assert read_manifest(bundle)[1] == before  # signing never touches the manifest
    assert verify_signature(bundle, keys) == keyid
    assert verify_signature(bundle, load_trusted_keys(keys)) == keyid
    assert verify_signature(bundle, other) is None


def test_cli_sign_reads_the_key_from_stdin(setup):
    bundle, key_path, keys, _, keyid = setup
    r = CliRunner().invoke(sign, [str(bundle), "--key", "-"], input=key_path.read_bytes())
    assert r.exit_code == 0 and keyid in r.output, r.output
    assert verify_signature(bundle, keys) == keyid
    r = CliRunner().invoke(sign, [str(bundle), "--key", str(keys / "ci.pub")])
    assert r.exit_code == 1 and "not an unencrypted PEM private key" in r.output


def _resign_manifest(bundle: Path, **changes) -> None:
    m = read_manifest(bundle)[0]
    packed = pack_manifest({**m.to_dict(), **changes})
    (bundle / MANIFEST_FILE).write_bytes(packed)
    (bundle / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")


def test_changed_bundle_or_forged_signature_is_not_trusted(setup):
    bundle, key_path, keys, _, keyid = setup
    sign_bundle(bundle, load_private_key(key_path.read_bytes(), "k"))
    sig = bundle / "signatures" / f"{keyid}.sig"
    original = sig.read_bytes()
    _resign_manifest(bundle, name="renamed")  # new digest: the old signature no longer applies
    assert verify_signature(bundle, keys) is None
    manifest, digest = read_manifest(bundle)
    with pytest.raises(SignatureError, match="signs another bundle"):
        enforce_policy(
            digest, manifest.name, read_signature_files(bundle), load_trusted_keys(keys), False
        )
    doc = json.loads(original)
    doc["bundle_digest"] = f"sha256:{digest}"  # claim the new bundle without a new signature
    sig.write_text(json.dumps(doc))
    assert verify_signature(bundle, keys) is None
    with pytest.raises(SignatureError, match="invalid signature by trusted key"):
        enforce_policy(
            digest, manifest.name, read_signature_files(bundle), load_trusted_keys(keys), False
        )
    sig.write_text("not json")
    with pytest.raises(SignatureError, match="malformed"):
        enforce_policy(
            digest, manifest.name, read_signature_files(bundle), load_trusted_keys(keys), False
        )


def test_empty_trust_policy_is_an_error_not_trust_all(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SignatureError, match="no trusted public keys"):
        load_trusted_keys(tmp_path / "empty")
