"""A registry in a plain directory (OCI image layout): for air-gapped sites and removable media.

The layout is the OCI image-layout spec (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), so
`oras`, `skopeo` and `crane` read it too. Tags are `org.opencontainers.image.ref.name` annotations
in index.json. Every write goes to a temporary file and is renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from aotlm.registry.artifact import OCI_MANIFEST, canonical_json
from aotlm.registry.errors import RegistryError
from aotlm.registry.store import (
    check_digest,
    check_manifest_digest,
    copy_verified,
    read_chunks,
    sha256_digest,
)

REF_NAME = "org.opencontainers.image.ref.name"
_LAYOUT = {"imageLayoutVersion": "1.0.0"}


class LayoutStore:
    """An OCI image layout rooted at `root`; created on first push."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = f"file://{self.root}"

    def _blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / check_digest(digest).removeprefix("sha256:")

    def _ensure(self) -> None:
        if (
            self.root.exists()
            and not (self.root / "oci-layout").is_file()
            and any(self.root.iterdir())
        ):
            raise RegistryError(
                f"{self.root}: exists and is not an OCI layout; refusing to write there"
            )
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.root / "oci-layout").is_file():
            self._write(self.root / "oci-layout", canonical_json(_LAYOUT))

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _index(self) -> dict:
        path = self.root / "index.json"
        if not path.is_file():
            return {"schemaVersion": 2, "manifests": []}
        try:
            index = json.loads(path.read_bytes())
        except (ValueError, RecursionError):
            index = None
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(entries, list) or not all(  # removable media may carry anything
            isinstance(e, dict) and isinstance(e.get("annotations") or {}, dict) for e in entries
        ):
            raise RegistryError(f"{path}: not a valid OCI index; the layout is damaged")
        return index

    def has_blob(self, digest: str) -> bool:
        return self._blob(digest).is_file()

    def push_blob(self, digest: str, size: int, source: Path | bytes) -> None:
        self._ensure()
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._blob(digest).parent)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(source, bytes):
                    copy_verified([source], digest, size, out, self.location)
                else:
                    with open(source, "rb") as f:
                        copy_verified(read_chunks(f), digest, size, out, self.location)
            os.replace(tmp, self._blob(digest))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def fetch_blob(self, digest: str, size: int, dest: BinaryIO) -> None:
        path = self._blob(digest)
        if not path.is_file():
            raise RegistryError(f"{self.location}: blob {digest} is missing from the layout")
        with open(path, "rb") as f:
            copy_verified(read_chunks(f), digest, size, dest, self.location)

    def push_manifest(self, reference: str, data: bytes) -> str:
        digest = sha256_digest(data)
        self.push_blob(digest, len(data), data)
        index = self._index()
        tag = None if reference.startswith("sha256:") else reference
        kept = [
            e
            for e in index["manifests"]
            if (e.get("annotations") or {}).get(REF_NAME) != tag
            and not (tag is None and e.get("digest") == digest)
        ]
        entry: dict = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(data)}
        artifact_type = json.loads(data).get("artifactType")
        if artifact_type:
            entry["artifactType"] = artifact_type
        if tag:
            entry["annotations"] = {REF_NAME: tag}
        index["manifests"] = [*kept, entry]
        self._write(self.root / "index.json", canonical_json(index))
        return digest

    def find_manifest(self, reference: str) -> bytes | None:
        if not (self.root / "oci-layout").is_file():
            raise RegistryError(
                f"{self.root}: not an OCI layout (no oci-layout file); check the path"
            )
        digest = reference
        if not reference.startswith("sha256:"):
            named = [
                e
                for e in self._index()["manifests"]
                if (e.get("annotations") or {}).get(REF_NAME) == reference
            ]
            if not named:
                return None
            digest = named[-1].get("digest", "")
        path = self._blob(digest)
        if not path.is_file():
            return None
        data = path.read_bytes()
        check_manifest_digest(data, digest, self.location)
        return data

    def close(self) -> None:
        pass
