"""Read and verify a bundle. Nothing in a bundle is used before `open_bundle` has checked it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aotlm.bundle.digest import sha256_bytes, sha256_file
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE, MAX_MANIFEST_BYTES
from aotlm.bundle.manifest import Manifest
from aotlm.bundle.manifest_read import unpack_manifest
from aotlm.errors import BundleError

_REBUILD = "rebuild it with `aotlm build` (or pull it again)"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk: every file listed in the manifest matched its sha256."""

    path: Path
    manifest: Manifest
    digest: str

    def file(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise BundleError(f"{self.path}: {rel} is not part of this bundle")
        return self.path / rel

    def read(self, rel: str) -> bytes:
        return self.file(rel).read_bytes()


def read_manifest(bundle_dir: Path | str) -> tuple[Manifest, str]:
    """Read the manifest and check it against the recorded digest; returns (manifest, digest)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST_FILE
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir}: not a directory; build a bundle with `aotlm build`")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {bundle_dir} is not a complete bundle: {_REBUILD}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; refusing to read it")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    digest_path = bundle_dir / DIGEST_FILE
    if not digest_path.is_file():
        raise BundleError(f"{digest_path}: missing: {_REBUILD}")
    recorded = digest_path.read_text(errors="replace").strip()
    if recorded != digest:
        raise BundleError(
            f"{path}: sha256 {digest} does not match {DIGEST_FILE} ({recorded[:64]!r}): the manifest "
            f"is corrupt or was modified: {_REBUILD}"
        )
    return unpack_manifest(data), digest


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Check every listed file's presence, size and sha256 (sizes first: cheap, catches truncation)."""
    files = manifest.files
    root = bundle_dir.resolve()
    for rel, entry in files.items():
        path = bundle_dir / rel
        if not path.is_file() or path.is_symlink():
            raise BundleError(f"{path}: missing (listed in the manifest): {_REBUILD}")
        if not path.resolve().is_relative_to(root):  # a linked directory on the way
            raise BundleError(
                f"{path}: leads outside the bundle through a symbolic link; refusing it: {_REBUILD}"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(
                f"{path}: size {size} bytes, manifest says {entry.size}: truncated or replaced: {_REBUILD}"
            )
    for rel, entry in files.items():
        path = bundle_dir / rel
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise BundleError(
                f"{path}: sha256 {actual} does not match the manifest ({entry.sha256}): "
                f"the file is corrupt or was modified: {_REBUILD}"
            )


def open_bundle(bundle_dir: Path | str) -> Bundle:
    """Verify a bundle completely (manifest digest, format version, structure, every file)."""
    bundle_dir = Path(bundle_dir)
    manifest, digest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return Bundle(path=bundle_dir, manifest=manifest, digest=digest)
