"""An OCI distribution registry spoken over HTTP with httpx (no oras, no docker).

The protocol subset is small (ping, HEAD/GET/upload blob, GET/PUT manifest), and owning it keeps
the properties this project needs in view: every byte streamed through a sha256, size caps before
reading, one clear error per failure, and no extra dependency tree (httpx is already used).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import httpx

import aotlm
from aotlm.registry.artifact import MAX_MANIFEST_BYTES, OCI_MANIFEST
from aotlm.registry.auth import Credentials, RegistryAuth, docker_credentials
from aotlm.registry.errors import RegistryError
from aotlm.registry.store import (
    CHUNK,
    RegistryOptions,
    check_digest,
    check_manifest_digest,
    copy_verified,
    sha256_digest,
)

_LOCAL = ("localhost", "127.0.0.1", "[::1]")


def is_local(host: str) -> bool:
    """Loopback registries (tests, a local `docker-registry`) are spoken to over plain http."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name in _LOCAL or name.startswith("127.")


class HttpStore:
    """One repository on one registry."""

    def __init__(
        self,
        host: str,
        repository: str,
        options: RegistryOptions,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        scheme = "http" if options.insecure or is_local(host) else "https"
        self.origin = f"{scheme}://{host}"
        self.base = f"{self.origin}/v2/{repository}"
        self.location = f"oci://{host}/{repository}"
        creds = (
            Credentials(options.username, options.password or "")
            if options.username
            else docker_credentials(host, options.docker_config)
        )
        self.client = httpx.Client(
            auth=RegistryAuth(creds),
            timeout=httpx.Timeout(options.timeout_s, connect=10.0),
            follow_redirects=True,
            headers={"User-Agent": f"aotlm/{aotlm.__version__}"},
            transport=transport,
        )

    def _send(self, method: str, url: str | httpx.URL, **kwargs) -> httpx.Response:
        try:
            return self.client.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    def _unreachable(self, e: Exception) -> RegistryError:
        hint = "is it running, and is the address right?"
        if self.origin.startswith("https://"):
            hint += " (a plain-http registry off localhost needs --insecure)"
        return RegistryError(
            f"cannot reach the registry at {self.origin} ({type(e).__name__}: {e}): {hint}"
        )

    def _fail(self, r: httpx.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError, TypeError, RecursionError):  # any body at all
            detail = r.text[:200]
        hint = {
            401: "authentication required: pass --username/--password-stdin or `docker login`",
            403: "access denied for these credentials",
            404: "not found",
        }.get(r.status_code, f"HTTP {r.status_code}")
        return RegistryError(
            f"{self.location}: {what}: {hint}" + (f" ({detail})" if detail else "")
        )

    def has_blob(self, digest: str) -> bool:
        r = self._send("HEAD", f"{self.base}/blobs/{check_digest(digest)}")
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            raise self._fail(r, f"checking blob {digest}")
        return True

    def push_blob(self, digest: str, size: int, source: Path | bytes) -> None:
        r = self._send("POST", f"{self.base}/blobs/uploads/")
        if r.status_code != 202 or "location" not in r.headers:
            raise self._fail(r, "starting a blob upload")
        url = r.url.join(r.headers["location"]).copy_merge_params({"digest": check_digest(digest)})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        if isinstance(source, bytes):
            r = self._send("PUT", url, content=source, headers=headers)
        else:
            with open(source, "rb") as f:
                r = self._send("PUT", url, content=f, headers=headers)
        if r.status_code != 201:
            raise self._fail(r, f"uploading blob {digest}")

    def fetch_blob(self, digest: str, size: int, dest: BinaryIO) -> None:
        url = f"{self.base}/blobs/{check_digest(digest)}"
        try:
            with self.client.stream("GET", url) as r:
                if r.status_code != 200:
                    r.read()
                    raise self._fail(r, f"downloading blob {digest}")
                copy_verified(r.iter_bytes(CHUNK), digest, size, dest, self.location)
        except httpx.TransportError as e:
            raise self._unreachable(e) from e

    def push_manifest(self, reference: str, data: bytes) -> str:
        r = self._send(
            "PUT",
            f"{self.base}/manifests/{reference}",
            content=data,
            headers={"Content-Type": OCI_MANIFEST},
        )
        if r.status_code != 201:
            raise self._fail(r, f"pushing manifest {reference}")
        digest = sha256_digest(data)
        claimed = r.headers.get("docker-content-digest", digest)
        if claimed != digest:
            raise RegistryError(
                f"{self.location}: registry stored manifest as {claimed}, expected {digest}"
            )
        return digest

    def find_manifest(self, reference: str) -> bytes | None:
        url = f"{self.base}/manifests/{reference}"
        try:
            with self.client.stream("GET", url, headers={"Accept": OCI_MANIFEST}) as r:
                if r.status_code == 404:
                    return None
                if r.status_code != 200:
                    r.read()
                    raise self._fail(r, f"fetching manifest {reference}")
                data = b""
                for chunk in r.iter_bytes(CHUNK):
                    data += chunk
                    if len(data) > MAX_MANIFEST_BYTES:
                        raise RegistryError(f"{self.location}: manifest {reference} is too large")
                claimed = r.headers.get("docker-content-digest")
        except httpx.TransportError as e:
            raise self._unreachable(e) from e
        check_manifest_digest(data, reference, self.location)
        if claimed and claimed != sha256_digest(data):
            raise RegistryError(
                f"{self.location}:{reference}: registry says the manifest is {claimed} but its bytes "
                f"hash to {sha256_digest(data)}; refusing it"
            )
        return data

    def close(self) -> None:
        self.client.close()
