"""`aotlm push`: a verified bundle -> an OCI artifact (one layer per file) plus its signatures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aotlm.bundle import Manifest, open_bundle
from aotlm.bundle.digest import sha256_file
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.registry.artifact import (
    ARTIFACT_TYPE,
    CONFIG_TYPE,
    FILE_LAYER,
    MANIFEST_LAYER,
    TITLE,
    bundle_annotations,
    bundle_config,
    descriptor,
    image_manifest,
)
from aotlm.registry.errors import RegistryError
from aotlm.registry.open_store import open_store
from aotlm.registry.ref import Ref, check_tag, parse_ref
from aotlm.registry.referrers import push_signatures
from aotlm.registry.signing import read_signature_files
from aotlm.registry.store import RegistryOptions, sha256_digest


@dataclass(frozen=True)
class PushResult:
    """`pinned` is what a deployment should pull: the manifest digest, immune to moved tags."""

    pinned: Ref
    tags: tuple[str, ...]
    digest: str
    bundle_digest: str
    blobs_uploaded: int
    blobs_present: int
    bytes_uploaded: int
    signatures: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        return {
            "ref": str(self.pinned),
            "repository": self.pinned.location,
            "tags": list(self.tags),
            "digest": self.digest,
            "bundle_digest": self.bundle_digest,
            "blobs_uploaded": self.blobs_uploaded,
            "blobs_present": self.blobs_present,
            "bytes_uploaded": self.bytes_uploaded,
            "signatures": list(self.signatures),
        }


def _layer(media_type: str, sha256_hex: str, size: int, path: str) -> tuple[str, dict]:
    return path, descriptor(media_type, f"sha256:{sha256_hex}", size, **{TITLE: path})


def _layers(bundle_dir: Path, manifest: Manifest, digest: str) -> list[tuple[str, dict]]:
    """(path, descriptor) for the manifest, its digest file and every listed file, in order."""
    sha_file = bundle_dir / DIGEST_FILE
    return [
        _layer(MANIFEST_LAYER, digest, (bundle_dir / MANIFEST_FILE).stat().st_size, MANIFEST_FILE),
        _layer(FILE_LAYER, sha256_file(sha_file), sha_file.stat().st_size, DIGEST_FILE),
        *(_layer(FILE_LAYER, e.sha256, e.size, rel) for rel, e in sorted(manifest.files.items())),
    ]


def push_bundle(
    bundle_dir: Path | str,
    ref: Ref | str,
    *,
    extra_tags: tuple[str, ...] = (),
    source_revision: str | None = None,
    options: RegistryOptions | None = None,
) -> PushResult:
    """Verify the bundle, upload missing blobs, then the manifest under each tag, then signatures."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if ref.digest:
        raise RegistryError(
            f"{ref}: push to a tag, not a digest (the digest is computed from the bundle)"
        )
    tags = (ref.reference, *(check_tag(t) for t in extra_tags))
    bundle = open_bundle(bundle_dir)
    docs = read_signature_files(bundle.path)
    stale = [k for k, d in docs.items() if f"sha256:{bundle.digest}".encode() not in d]
    if stale:
        raise RegistryError(
            f"{bundle.path}: signatures {', '.join(stale)} sign another bundle: delete them or "
            "sign again with `aotlm sign`"
        )
    layers = _layers(bundle.path, bundle.manifest, bundle.digest)
    config = bundle_config(bundle.manifest, bundle.digest)
    oci = image_manifest(
        ARTIFACT_TYPE,
        descriptor(CONFIG_TYPE, sha256_digest(config), len(config)),
        [d for _, d in layers],
        bundle_annotations(bundle.manifest, bundle.digest, source_revision),
    )
    store = open_store(ref, options)
    uploaded = present = sent = 0
    try:
        blobs: dict[str, tuple[int, Path | bytes]] = {sha256_digest(config): (len(config), config)}
        for rel, d in layers:
            blobs.setdefault(d["digest"], (d["size"], bundle.path / rel))
        for digest, (size, source) in blobs.items():
            if store.has_blob(digest):
                present += 1
                continue
            store.push_blob(digest, size, source)
            uploaded, sent = uploaded + 1, sent + size
        digest = ""
        for tag in tags:
            digest = store.push_manifest(tag, oci)
        push_signatures(store, digest, len(oci), docs)
    finally:
        store.close()
    return PushResult(
        pinned=ref.pinned(digest),
        tags=tags,
        digest=digest,
        bundle_digest=f"sha256:{bundle.digest}",
        blobs_uploaded=uploaded,
        blobs_present=present,
        bytes_uploaded=sent,
        signatures=tuple(sorted(docs)),
    )
