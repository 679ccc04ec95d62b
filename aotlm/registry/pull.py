"""`aotlm pull`: fetch an artifact into a temporary sibling directory, verify it all, then rename.

Order: OCI manifest (digest checked) -> bundle manifest and its digest -> every layer cross-checked
against the bundle manifest -> trust policy -> file blobs (each hashed while streaming) -> `open_bundle`
-> one rename. Any failure, or an interrupt, removes the temporary directory: the target is either
the old content or the complete new bundle, never a half of one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aotlm.bundle import Manifest, open_bundle, read_manifest
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE, MAX_MANIFEST_BYTES
from aotlm.registry.artifact import (
    ARTIFACT_TYPE,
    BUNDLE_DIGEST,
    Layer,
    as_map,
    bundle_layers,
    parse_manifest,
)
from aotlm.registry.errors import RegistryError, SignatureError
from aotlm.registry.open_store import open_store
from aotlm.registry.ref import Ref, parse_ref
from aotlm.registry.referrers import fetch_signatures
from aotlm.registry.signing import (
    SIGNATURES_DIR,
    TrustedKeys,
    enforce_policy,
    load_trusted_keys,
)
from aotlm.registry.store import RegistryOptions, Store, sha256_digest


@dataclass(frozen=True)
class PullResult:
    out_dir: Path
    pinned: Ref
    digest: str
    bundle_digest: str
    files: int
    signed_by: str | None
    signatures: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "bundle": str(self.out_dir),
            "ref": str(self.pinned),
            "digest": self.digest,
            "bundle_digest": self.bundle_digest,
            "files": self.files,
            "signed_by": self.signed_by,
            "signatures": list(self.signatures),
        }


def check_target(out_dir: Path) -> None:
    """Refuse before downloading anything if the target holds something that is not a bundle."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RegistryError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise RegistryError(
            f"{out_dir}: exists, is not empty and is not a bundle; refusing to replace it"
        )


def _write_blob(store: Store, layer: Layer, root: Path) -> None:
    path = root / layer.path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as f:
        store.fetch_blob(layer.digest, layer.size, f)


def _cross_check(
    layers: list[Layer], manifest: Manifest, oci: dict, digest: str, where: str
) -> None:
    """The OCI layers must be exactly the bundle's files with the bundle's digests and sizes."""
    noted = as_map(oci.get("annotations")).get(BUNDLE_DIGEST)
    if noted not in (None, f"sha256:{digest}"):
        raise RegistryError(
            f"{where}: annotation {BUNDLE_DIGEST}={noted} but the bundle is sha256:{digest}"
        )
    files = manifest.files
    paths = {layer.path for layer in layers} - {MANIFEST_FILE, DIGEST_FILE}
    if paths != set(files):
        extra, missing = sorted(paths - set(files)), sorted(set(files) - paths)
        raise RegistryError(
            f"{where}: layers do not match the bundle manifest (not in the bundle: {extra[:5]}, "
            f"missing: {missing[:5]}); refusing it"
        )
    for layer in layers:
        entry = files.get(layer.path)
        if entry and (layer.digest != f"sha256:{entry.sha256}" or layer.size != entry.size):
            raise RegistryError(
                f"{where}: layer {layer.path} is {layer.digest} ({layer.size} bytes) but the bundle "
                f"manifest says sha256:{entry.sha256} ({entry.size} bytes); refusing it"
            )


def _replace(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.rename(out_dir, old / "b")
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _fetch_into(store: Store, ref: Ref, tmp: Path, trusted: TrustedKeys | None, require: bool):
    data = store.find_manifest(ref.reference)
    if data is None:
        raise RegistryError(f"{ref}: not found in {store.location}")
    digest = sha256_digest(data)
    if ref.digest and digest != ref.digest:
        raise RegistryError(
            f"{ref}: the store returned a manifest with digest {digest}; refusing it"
        )
    oci = parse_manifest(data, ARTIFACT_TYPE)
    layers = bundle_layers(oci)
    first = [layer for layer in layers if layer.path in (MANIFEST_FILE, DIGEST_FILE)]
    if any(layer.size > MAX_MANIFEST_BYTES for layer in first):
        raise RegistryError(f"{ref}: the bundle manifest layer is implausibly large; refusing it")
    for layer in first:
        _write_blob(store, layer, tmp)
    manifest, bundle_digest = read_manifest(tmp)
    _cross_check(layers, manifest, oci, bundle_digest, f"{ref.location}@{digest}")
    docs = fetch_signatures(store, digest)
    signed_by = None
    if trusted is not None:
        signed_by = enforce_policy(bundle_digest, manifest.name, docs, trusted, require)
    for layer in layers:
        if layer not in first:
            _write_blob(store, layer, tmp)
    for keyid, doc in docs.items():
        (tmp / SIGNATURES_DIR).mkdir(exist_ok=True)
        (tmp / SIGNATURES_DIR / f"{keyid}.sig").write_bytes(doc)
    bundle = open_bundle(tmp)
    return digest, bundle, signed_by, tuple(sorted(docs))


def pull_bundle(
    ref: Ref | str,
    out_dir: Path | str,
    *,
    trusted_keys: TrustedKeys | Path | str | None = None,
    require_signed: bool = False,
    options: RegistryOptions | None = None,
) -> PullResult:
    """Pull `ref` into `out_dir` (replacing a bundle already there) after verifying everything."""
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    if require_signed and trusted_keys is None:
        raise SignatureError("--require-signed needs trusted keys (--trusted-keys DIR_OR_FILE)")
    keys = None
    if trusted_keys is not None:
        keys = (
            trusted_keys if isinstance(trusted_keys, Mapping) else load_trusted_keys(trusted_keys)
        )
    out_dir = Path(out_dir).absolute()
    check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    store = open_store(ref, options)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.pull-", dir=out_dir.parent))
    try:
        digest, bundle, signed_by, sigs = _fetch_into(store, ref, tmp, keys, require_signed)
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        store.close()
    return PullResult(
        out_dir=out_dir,
        pinned=ref.pinned(digest),
        digest=digest,
        bundle_digest=f"sha256:{bundle.digest}",
        files=len(bundle.manifest.files),
        signed_by=signed_by,
        signatures=sigs,
    )
