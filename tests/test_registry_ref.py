"""References, layer paths and registry logins: the parsing every other module relies on."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from aotlm.registry.artifact import safe_path
from aotlm.registry.auth import docker_credentials
from aotlm.registry.errors import RegistryError
from aotlm.registry.http_store import HttpStore, is_local
from aotlm.registry.ref import is_ref, parse_ref
from aotlm.registry.store import RegistryOptions

DIGEST = "sha256:" + "ab" * 32


def test_parse_oci_refs():
    r = parse_ref("oci://ghcr.io/acme/models/tiny:v1")
    assert (r.host, r.repository, r.tag, r.digest, r.reference) == (
        "ghcr.io",
        "acme/models/tiny",
        "v1",
        None,
        "v1",
    )
    r = parse_ref(f"oci://127.0.0.1:5000/tiny:v1@{DIGEST}")
    assert (r.host, r.tag, r.reference) == ("127.0.0.1:5000", "v1", DIGEST)
    assert str(parse_ref("oci://localhost:5000/tiny")) == "oci://localhost:5000/tiny:latest"
    assert str(r.pinned(DIGEST)) == f"oci://127.0.0.1:5000/tiny@{DIGEST}"


def test_parse_file_refs():
    r = parse_ref(f"file:///srv/store@{DIGEST}")
    assert (r.path, r.digest) == (Path("/srv/store"), DIGEST)
    assert parse_ref("file:///srv/my.store:v2").tag == "v2"
    assert is_ref("file:///x") and is_ref("oci://h/r") and not is_ref("bundles/tiny")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://h/r", "not a registry reference"),
        ("oci://host", "missing repository"),
        ("oci://host/Upper", "bad repository"),
        ("oci://host/r:bad tag", "not a valid tag"),
        ("oci://host/r@sha256:123", "bad digest"),
        ("oci://ho st/r", "bad registry host"),
    ],
)
def test_bad_refs_say_what_is_wrong(text, message):
    with pytest.raises(RegistryError, match=message):
        parse_ref(text)


@pytest.mark.parametrize(
    "path", ["../x", "/etc/passwd", "a//b", "a/./b", "a/../../b", "", "a\\b", "a/\x00", 3]
)
def test_unsafe_layer_paths_are_refused(path):
    with pytest.raises(RegistryError):
        safe_path(path)


def test_safe_layer_paths_pass():
    for p in ("manifest.msgpack", "exported/forward_t16.jaxexp", "compiled/cpu/forward_t16.bin"):
        assert safe_path(p) == p


def test_loopback_is_plain_http_and_others_https():
    assert is_local("127.0.0.1:5000") and is_local("localhost") and is_local("[::1]:5000")
    assert not is_local("ghcr.io") and not is_local("10.0.0.1:5000")
    assert HttpStore("ghcr.io", "a/b", RegistryOptions()).origin == "https://ghcr.io"
    assert (
        HttpStore("reg.lan:5000", "a", RegistryOptions(insecure=True)).origin
        == "http://reg.lan:5000"
    )


def test_docker_config_credentials(tmp_path):
    auth = base64.b64encode(b"bot:s3cret").decode()
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {"https://ghcr.io": {"auth": auth}}}))
    creds = docker_credentials("ghcr.io", cfg)
    assert creds is not None and (creds.username, creds.password) == ("bot", "s3cret")
    assert docker_credentials("other.io", cfg) is None


def test_bearer_token_challenge_is_answered(tmp_path):
    """ghcr.io-style auth: 401 with a Bearer challenge, token from the realm, then the retry."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.path} {request.headers.get('authorization', '-')}")
        if request.url.path == "/token":
            assert request.url.params["scope"] == "repository:a/b:pull"
            assert request.headers["authorization"].startswith("Basic ")
            return httpx.Response(200, json={"token": "T0K"})
        if request.headers.get("authorization") != "Bearer T0K":
            challenge = 'Bearer realm="https://reg.test/token",service="reg.test",scope="repository:a/b:pull"'
            return httpx.Response(401, headers={"www-authenticate": challenge})
        return httpx.Response(404)

    opts = RegistryOptions(username="bot", password="pw")
    store = HttpStore("reg.test", "a/b", opts, transport=httpx.MockTransport(handler))
    assert store.find_manifest("v1") is None
    assert store.has_blob(DIGEST) is False  # the token is reused: no second challenge
    assert seen[:3] == [
        "/v2/a/b/manifests/v1 -",
        "/token Basic Ym90OnB3",
        "/v2/a/b/manifests/v1 Bearer T0K",
    ]
    assert seen[3] == f"/v2/a/b/blobs/{DIGEST} Bearer T0K"
