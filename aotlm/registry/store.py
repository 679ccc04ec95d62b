"""The storage seam: an OCI registry over HTTP and an OCI image layout on disk behave the same.

Both are content-addressed blobs plus manifests found by tag or digest. Every byte that comes back
is hashed as it streams and compared with the digest it was asked for: a store is never trusted.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from aotlm.registry.errors import RegistryError

CHUNK = 1 << 20
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")


@dataclass(frozen=True)
class RegistryOptions:
    """How to reach a registry. `insecure` forces plain http; `docker_config` holds logins."""

    insecure: bool = False
    username: str | None = None
    password: str | None = None
    docker_config: Path | None = None
    timeout_s: float = 60.0


class Store(Protocol):
    location: str

    def has_blob(self, digest: str) -> bool: ...

    def push_blob(self, digest: str, size: int, source: Path | bytes) -> None: ...

    def fetch_blob(self, digest: str, size: int, dest: BinaryIO) -> None:
        """Write the blob to `dest`; raise RegistryError unless it has exactly `size` and `digest`."""
        ...

    def push_manifest(self, reference: str, data: bytes) -> str:
        """Store a manifest under a tag or its digest; returns its digest."""
        ...

    def find_manifest(self, reference: str) -> bytes | None:
        """The manifest's bytes (digest already checked), or None when the tag or digest is absent."""
        ...

    def close(self) -> None: ...


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object) -> str:
    """Only well-formed sha256 digests reach a URL or a path (they become file names in a layout)."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RegistryError(f"bad digest {digest!r} (expected sha256:<64 hex>); refusing it")
    return digest


def check_manifest_digest(data: bytes, reference: str, where: str) -> None:
    """A manifest fetched by digest must hash to it: otherwise the store is serving other content."""
    if reference.startswith("sha256:") and sha256_digest(data) != reference:
        raise RegistryError(
            f"{where}@{reference}: the store returned a manifest whose sha256 is "
            f"{sha256_digest(data)}: it was tampered with or the store is broken; refusing it"
        )


def copy_verified(
    chunks: Iterable[bytes], digest: str, size: int, dest: BinaryIO, where: str
) -> None:
    """Stream chunks into dest, stopping as soon as there are too many bytes; check the sha256."""
    h = hashlib.sha256()
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > size:
            raise RegistryError(
                f"{where}: blob {digest} is larger than its {size} bytes; refusing it"
            )
        h.update(chunk)
        dest.write(chunk)
    if n != size:
        raise RegistryError(f"{where}: blob {digest} has {n} bytes, expected {size}; refusing it")
    if "sha256:" + h.hexdigest() != digest:
        raise RegistryError(
            f"{where}: blob {digest} has sha256:{h.hexdigest()}: it was tampered with or corrupted "
            "in the store; refusing it"
        )


def read_chunks(f: BinaryIO) -> Iterable[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk
