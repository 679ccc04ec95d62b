"""push/pull/sign against a real CNCF distribution registry (Debian's `docker-registry`).

The suite starts its own registry on 127.0.0.1 (random port, temp config and storage) and tampers
with that storage directly, so every refusal is of bytes a real registry actually served.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from aotlm.bundle import open_bundle, read_manifest
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.cli.registry import keygen, pull, push, sign
from aotlm.registry import resolve_bundle

REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
CONFIG = """version: 0.1
log: {{level: error, accesslog: {{disabled: true}}}}
storage:
  filesystem: {{rootdirectory: {root}}}
  delete: {{enabled: true}}
http: {{addr: "127.0.0.1:{port}"}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(host:port, storage root) of a registry that lives for this module."""
    if REGISTRY_BIN is None:
        pytest.skip(
            "no `docker-registry` binary: apt-get install -y docker-registry (CNCF distribution)"
        )
    work = tmp_path_factory.mktemp("registry")
    port = free_port()
    (work / "config.yml").write_text(CONFIG.format(root=work / "storage", port=port))
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(work / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "log", "wb"),  # noqa: SIM115
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"registry did not start: {(work / 'log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}", work / "storage"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """(private key, trusted dir, other trusted dir): `other` trusts a different key."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("ci", "other"):
        assert CliRunner().invoke(keygen, [str(d / name / name)]).exit_code == 0
    return d / "ci" / "ci.key", d / "ci", d / "other"


@pytest.fixture(scope="module")
def signed(tiny_bundle, keys, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signed") / "tiny"
    shutil.copytree(tiny_bundle[0], path)
    assert CliRunner().invoke(sign, [str(path), "--key", str(keys[0])]).exit_code == 0
    return path


def variant(bundle: Path, out: Path, **changes) -> Path:
    """A copy of `bundle` with manifest fields changed (so a different digest), unsigned."""
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("signatures"))
    m = read_manifest(out)[0]
    packed = pack_manifest({**m.to_dict(), **changes})
    (out / MANIFEST_FILE).write_bytes(packed)
    (out / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")
    return out


def run(cmd, *args: str) -> tuple[int, str]:
    r = CliRunner(env={"GITHUB_SHA": None}).invoke(cmd, [str(a) for a in args])
    return r.exit_code, r.output


def push_json(bundle: Path, ref: str, *extra: str) -> dict:
    code, out = run(push, bundle, ref, "--json", *extra)
    assert code == 0, out
    return json.loads(out)


def tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def assert_nothing_written(parent: Path, target: Path) -> None:
    assert not target.exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{target.name}.")]


def blob_file(storage: Path, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_push_then_pull_by_tag_and_digest_is_byte_identical(registry, signed, tmp_path):
    host, _ = registry
    r = push_json(signed, f"oci://{host}/aotlm/tiny:v1", "--source-revision", "abc123")
    assert r["blobs_uploaded"] > 3 and r["signatures"]
    again = push_json(signed, f"oci://{host}/aotlm/tiny:v1", "--tag", "main")
    assert again["digest"] != r["digest"]  # no revision: a different (but deterministic) manifest
    assert again["blobs_uploaded"] == 0 and again["tags"] == ["v1", "main"]  # all deduplicated
    assert push_json(signed, f"oci://{host}/aotlm/tiny:v2")["digest"] == again["digest"]
    for ref in (f"oci://{host}/aotlm/tiny:v1", r["ref"], f"oci://{host}/aotlm/tiny:main"):
        out = tmp_path / ref.rsplit(":", 1)[-1][:12]
        code, text = run(pull, ref, "-o", out, "--json")
        assert code == 0, text
        assert tree(out) == tree(signed)
        assert open_bundle(out).digest == json.loads(text)["bundle_digest"].removeprefix("sha256:")
    manifest = httpx.get(
        f"http://{host}/v2/aotlm/tiny/manifests/{r['digest']}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    assert manifest["artifactType"] == "application/vnd.aotlm.bundle.v1"
    assert manifest["annotations"]["org.opencontainers.image.revision"] == "abc123"
    assert manifest["annotations"]["aotlm.bundle.digest"] == r["bundle_digest"]


def test_signature_policy(registry, signed, keys, tmp_path):
    host, _ = registry
    _, trusted, other = keys
    push_json(signed, f"oci://{host}/aotlm/policy:signed")
    push_json(variant(signed, tmp_path / "v", name="other"), f"oci://{host}/aotlm/policy:unsigned")
    out = tmp_path / "ok"
    code, text = run(
        pull,
        f"oci://{host}/aotlm/policy:signed",
        "-o",
        out,
        "--trusted-keys",
        trusted,
        "--require-signed",
    )
    assert code == 0 and "signed by" in text, text
    cases = {
        "unsigned": (trusted, "not signed by a trusted key (it has no signatures)"),
        "signed": (other, "which is not trusted"),
    }
    for tag, (policy, message) in cases.items():
        target = tmp_path / f"refused-{tag}"
        code, text = run(
            pull,
            f"oci://{host}/aotlm/policy:{tag}",
            "-o",
            target,
            "--trusted-keys",
            policy,
            "--require-signed",
        )
        assert code == 1 and message in text, text
        assert_nothing_written(tmp_path, target)
    code, text = run(
        pull, f"oci://{host}/aotlm/policy:signed", "-o", tmp_path / "x", "--require-signed"
    )
    assert code == 1 and "needs trusted keys" in text


def test_bad_signature_is_refused_even_without_require_signed(registry, signed, keys, tmp_path):
    host, _ = registry
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    sig = next((forged / "signatures").glob("*.sig"))
    doc = json.loads(sig.read_text())
    doc["signature"] = ("B" if doc["signature"][0] != "B" else "C") + doc["signature"][1:]
    sig.write_text(json.dumps(doc))
    push_json(forged, f"oci://{host}/aotlm/forged:v1")
    target = tmp_path / "out"
    code, text = run(pull, f"oci://{host}/aotlm/forged:v1", "-o", target, "--trusted-keys", keys[1])
    assert code == 1 and "invalid signature by trusted key" in text, text
    assert_nothing_written(tmp_path, target)


def test_tampered_blob_in_registry_storage_is_refused(registry, signed, tmp_path):
    host, storage = registry
    r = push_json(signed, f"oci://{host}/aotlm/tamper:v1")
    weights = open_bundle(signed).manifest.files["weights/model.safetensors"].sha256
    blob = blob_file(storage, weights)
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit flipped
        target = tmp_path / "out"
        code, text = run(pull, r["ref"], "-o", target)
        assert code == 1 and f"blob sha256:{weights} has sha256:" in text and "tampered" in text, (
            text
        )
        assert_nothing_written(tmp_path, target)
    finally:
        blob.write_bytes(original)


def test_tampered_manifest_and_wrong_digest_are_refused(registry, signed, tmp_path):
    host, storage = registry
    r = push_json(signed, f"oci://{host}/aotlm/mtamper:v1", "--source-revision", "abc123")
    blob = blob_file(storage, r["digest"])
    original = blob.read_bytes()
    try:
        blob.write_bytes(original.replace(b'"abc123"', b'"abd123"'))
        for ref, message in (
            (r["ref"], "returned a manifest whose sha256"),
            (f"oci://{host}/aotlm/mtamper:v1", "hash to"),
        ):
            target = tmp_path / "out"
            code, text = run(pull, ref, "-o", target)
            assert code == 1 and message in text and "refusing" in text, text
            assert_nothing_written(tmp_path, target)
    finally:
        blob.write_bytes(original)
    wrong = f"oci://{host}/aotlm/mtamper@sha256:" + "0" * 64
    code, text = run(pull, wrong, "-o", tmp_path / "out")
    assert code == 1 and "not found" in text
    assert_nothing_written(tmp_path, tmp_path / "out")


def _put_manifest(host: str, repo: str, tag: str, manifest: dict) -> None:
    r = httpx.put(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("title", "message"),
    [
        ("../evil", "escapes the bundle directory"),
        ("/tmp/evil", "escapes the bundle directory"),
        ("tokenizer/../../evil", "escapes the bundle directory"),
        ("extra/payload.bin", "do not match the bundle manifest"),
    ],
)
def test_unsafe_or_unlisted_layer_path_is_refused(registry, signed, tmp_path, title, message):
    host, _ = registry
    r = push_json(signed, f"oci://{host}/aotlm/evil:base")
    manifest = httpx.get(
        f"http://{host}/v2/aotlm/evil/manifests/{r['digest']}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    ).json()
    layer = dict(manifest["layers"][-1], annotations={"org.opencontainers.image.title": title})
    manifest["layers"].append(layer)
    _put_manifest(host, "aotlm/evil", "bad", manifest)
    work = tmp_path / "work"
    work.mkdir()
    code, text = run(pull, f"oci://{host}/aotlm/evil:bad", "-o", work / "out")
    assert code == 1 and message in text, text
    assert_nothing_written(work, work / "out")
    assert list(work.iterdir()) == [] and not (tmp_path / "evil").exists()


def test_target_that_is_not_a_bundle_is_left_alone(registry, signed, tmp_path):
    host, _ = registry
    push_json(signed, f"oci://{host}/aotlm/tiny:v1")
    target = tmp_path / "data"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    code, text = run(pull, f"oci://{host}/aotlm/tiny:v1", "-o", target)
    assert code == 1 and "is not a bundle" in text
    assert tree(target) == {"precious.txt": b"keep me"}


def test_registry_down_is_a_clear_error(signed, tmp_path):
    ref = f"oci://127.0.0.1:{free_port()}/aotlm/tiny:v1"
    for cmd, args in ((pull, [ref, "-o", tmp_path / "out"]), (push, [signed, ref])):
        code, text = run(cmd, *args)
        assert code == 1 and "cannot reach the registry at http://127.0.0.1:" in text, text
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_resolve_bundle_pulls_once_into_a_content_addressed_cache(registry, signed, keys, tmp_path):
    host, _ = registry
    r = push_json(signed, f"oci://{host}/aotlm/tiny:cache")
    cache = tmp_path / "cache"
    path = resolve_bundle(
        f"oci://{host}/aotlm/tiny:cache", cache, trusted_keys=keys[1], require_signed=True
    )
    assert path == cache / r["digest"].replace(":", "-")
    assert tree(path) == tree(signed)
    # Pinned by digest and cached: served without contacting any registry (this port is closed).
    offline = f"oci://127.0.0.1:{free_port()}/aotlm/tiny@{r['digest']}"
    assert resolve_bundle(offline, cache) == path
    assert resolve_bundle(signed) == signed
