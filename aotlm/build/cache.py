"""The build cache: content-addressed exports and compiled executables, shared by builds.

    <cache dir>/build/ab/<key>.bin    bytes of one export or one compiled executable
    <cache dir>/build/ab/<key>.json   {"sha256", "size", "meta"}: checked on every read

The cache dir is aotlm/state_dir.py's (the record of bundles built here: bundle/built_here.py).
Nothing here goes into a bundle's manifest, so bundles stay reproducible. Entries are written atomically
(temporary file, then rename), so concurrent builds share a cache safely. The cache only stores
and returns bytes; it never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from aotlm.bundle.digest import sha256_bytes
from aotlm.state_dir import write_atomic


def cache_key(**parts: Any) -> str:
    """sha256 of the parts as canonical JSON: equal inputs, equal key."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


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
        write_atomic(data_path, data)  # data first: an entry is visible only once complete
        entry = {"sha256": sha256_bytes(data), "size": len(data), "meta": meta or {}}
        write_atomic(meta_path, json.dumps(entry, sort_keys=True).encode())
