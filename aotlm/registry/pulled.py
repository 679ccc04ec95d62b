"""`resolve_bundle`: turn a path or a registry reference into a local bundle directory.

Remote bundles land in a content-addressed cache keyed by the OCI manifest digest, so a reference
pinned by digest is served from the cache with no network at all, and two references to the same
digest share one copy. Entries appear by atomic rename only, so a cache entry is always complete.
"""

from __future__ import annotations

from pathlib import Path

from aotlm.bundle import read_manifest
from aotlm.registry.errors import RegistryError
from aotlm.registry.open_store import open_store
from aotlm.registry.pull import pull_bundle
from aotlm.registry.ref import Ref, is_ref, parse_ref
from aotlm.registry.signing import (
    TrustedKeys,
    enforce_policy,
    load_trusted_keys,
    read_signature_files,
)
from aotlm.registry.store import RegistryOptions, sha256_digest
from aotlm.state_dir import default_cache_dir


def cache_entry(cache_dir: Path, digest: str) -> Path:
    return cache_dir / digest.replace(":", "-")


def _resolve_tag(ref: Ref, options: RegistryOptions | None) -> str:
    store = open_store(ref, options)
    try:
        data = store.find_manifest(ref.reference)
    finally:
        store.close()
    if data is None:
        raise RegistryError(f"{ref}: not found in {ref.location}")
    return sha256_digest(data)


def resolve_bundle(
    ref_or_path: str | Path,
    cache_dir: Path | None = None,
    *,
    trusted_keys: TrustedKeys | Path | str | None = None,
    require_signed: bool = False,
    options: RegistryOptions | None = None,
) -> Path:
    """A local bundle directory for `ref_or_path`; pulls `oci://` / `file://` refs into the cache.

    A local path is returned as is (the loader verifies it). A cached entry is re-checked against
    the trust policy, since the policy may be stricter than the one it was pulled under.
    """
    if not is_ref(str(ref_or_path)):
        return Path(ref_or_path)
    ref = parse_ref(str(ref_or_path))
    cache_dir = (cache_dir or default_cache_dir() / "bundles").expanduser()
    digest = ref.digest or _resolve_tag(ref, options)
    entry = cache_entry(cache_dir, digest)
    if not (entry / "manifest.msgpack").is_file():
        pull_bundle(
            ref.pinned(digest),
            entry,
            trusted_keys=trusted_keys,
            require_signed=require_signed,
            options=options,
        )
    elif trusted_keys is not None:
        keys = (
            load_trusted_keys(trusted_keys)
            if isinstance(trusted_keys, Path | str)
            else trusted_keys
        )
        manifest, bundle_digest = read_manifest(entry)
        docs = read_signature_files(entry)
        enforce_policy(bundle_digest, manifest.name, docs, keys, require_signed)
    return entry
