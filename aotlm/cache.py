"""This machine's aotlm state: a content-addressed build cache and the record of bundles built here.

    <cache dir>/build/ab/<key>.bin    bytes of one export or one compiled executable
    <cache dir>/build/ab/<key>.json   {"sha256", "size", "meta"}: checked on every read
    <cache dir>/built/<digest>.json   a bundle digest this machine built (the "local" trust marker)

The cache dir is `--cache-dir`, else `$XDG_CACHE_HOME/aotlm`, else `~/.cache/aotlm`. Nothing here
goes into a bundle's manifest, so bundles stay reproducible. Entries are written atomically
(temporary file, then rename), so concurrent builds share a cache safely. The cache only stores
and returns bytes; it never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from aotlm.bundle.digest import sha256_bytes


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aotlm"


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON: equal inputs, equal key."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class BuildCache:
    """Key -> bytes (+ small JSON metadata). A corrupt or partial entry reads as a miss."""

    def __init__(self, root: Path | str) -> None:
        self.dir = Path(root) / "build"

    def _paths(self, key: str) -> tuple[Path, Path]:
        base = self.dir / key[:2] / key
        return base.with_suffix(".bin"), base.with_suffix(".json")

    def get(self, key: str) -> tuple[bytes, dict] | None:
        data_path, meta_path = self._paths(key)
        try:
            entry = json.loads(meta_path.read_text())
            data = data_path.read_bytes()
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("sha256") != sha256_bytes(data):
            return None
        return data, entry.get("meta") or {}

    def put(self, key: str, data: bytes, meta: dict | None = None) -> None:
        data_path, meta_path = self._paths(key)
        _write_atomic(data_path, data)  # data first: an entry is visible only once complete
        entry = {"sha256": sha256_bytes(data), "size": len(data), "meta": meta or {}}
        _write_atomic(meta_path, json.dumps(entry, sort_keys=True).encode())


class LocalRegistry:
    """Digests of the bundles this machine built: what trust policy "local" accepts.

    A digest is the sha256 of a manifest that holds every file's sha256, so a bundle with a
    recorded digest has exactly the bytes this machine wrote, wherever it was copied to.
    """

    def __init__(self, root: Path | str) -> None:
        self.dir = Path(root) / "built"

    def record(self, digest: str, bundle_dir: Path) -> None:
        info = {"digest": digest, "path": str(Path(bundle_dir).absolute()), "at": time.time()}
        _write_atomic(self.dir / f"{digest}.json", json.dumps(info).encode())

    def contains(self, digest: str) -> bool:
        return len(digest) == 64 and (self.dir / f"{digest}.json").is_file()
