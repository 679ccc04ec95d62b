"""Write a bundle atomically: everything lands in a temporary sibling directory, then one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import FileEntry, Manifest, pack_manifest
from aotlm.errors import BundleError


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BundleError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
        raise BundleError(
            f"{out_dir}: exists, is not empty and is not a bundle; refusing to overwrite it"
        )


def write_bundle(out_dir: Path | str, manifest: Manifest, files: dict[str, bytes]) -> str:
    """Write `files` (relative path -> bytes) plus the manifest; returns the bundle digest.

    The manifest gets its `files` table with each file's sha256 and size. Paths are written in sorted
    order and no timestamps or host names go into the manifest, so builds are reproducible.
    """
    out_dir = Path(out_dir).absolute()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    manifest = manifest.with_files(
        {rel: FileEntry(sha256_bytes(data), len(data)) for rel, data in sorted(files.items())}
    )
    packed = pack_manifest(manifest)
    digest = sha256_bytes(packed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for rel, data in sorted(files.items()):
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (tmp / MANIFEST_FILE).write_bytes(packed)
        (tmp / DIGEST_FILE).write_text(digest + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def _replace_dir(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "b")
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
