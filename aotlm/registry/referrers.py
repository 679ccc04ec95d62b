"""Signatures in a store: one artifact per bundle, tagged `sha256-<hex>.sig`, whose `subject` is it.

Registries without the OCI 1.1 referrers API (distribution 2.x, many private ones) still find a
signature by that tag, the scheme cosign uses; `subject` lets 1.1 registries list it as a referrer.
A later `aotlm push` of a newly signed bundle adds its signatures to the ones already there.
"""

from __future__ import annotations

import io
import re

from aotlm.registry.artifact import (
    EMPTY_BLOB,
    EMPTY_DIGEST,
    EMPTY_TYPE,
    OCI_MANIFEST,
    SIGNATURE_ARTIFACT,
    SIGNATURE_LAYER,
    TITLE,
    as_map,
    descriptor,
    image_manifest,
    parse_manifest,
)
from aotlm.registry.errors import RegistryError
from aotlm.registry.signing import MAX_SIGNATURE_BYTES
from aotlm.registry.store import Store, sha256_digest

_SIG_NAME = re.compile(r"([a-f0-9]{16})\.sig")


def signature_tag(manifest_digest: str) -> str:
    return manifest_digest.replace(":", "-") + ".sig"


def _existing_layers(store: Store, tag: str) -> dict[str, dict]:
    data = store.find_manifest(tag)
    if data is None:
        return {}
    layers = {}
    for d in parse_manifest(data, SIGNATURE_ARTIFACT)["layers"]:
        title = as_map(as_map(d).get("annotations")).get(TITLE)
        if isinstance(title, str) and _SIG_NAME.fullmatch(title):
            layers[title] = d
    return layers


def push_signatures(
    store: Store, subject: str, subject_size: int, docs: dict[str, bytes]
) -> str | None:
    """Upload signature documents (keyid -> bytes) for the manifest `subject`; returns the tag."""
    if not docs:
        return None
    tag = signature_tag(subject)
    layers = _existing_layers(store, tag)
    for keyid, data in docs.items():
        digest = sha256_digest(data)
        if not store.has_blob(digest):
            store.push_blob(digest, len(data), data)
        layers[f"{keyid}.sig"] = descriptor(
            SIGNATURE_LAYER, digest, len(data), **{TITLE: f"{keyid}.sig"}
        )
    if not store.has_blob(EMPTY_DIGEST):
        store.push_blob(EMPTY_DIGEST, len(EMPTY_BLOB), EMPTY_BLOB)
    manifest = image_manifest(
        SIGNATURE_ARTIFACT,
        descriptor(EMPTY_TYPE, EMPTY_DIGEST, len(EMPTY_BLOB)),
        [layers[k] for k in sorted(layers)],
        {},
        subject=descriptor(OCI_MANIFEST, subject, subject_size),
    )
    store.push_manifest(tag, manifest)
    return tag


def fetch_signatures(store: Store, subject: str) -> dict[str, bytes]:
    """keyid -> signature document, each blob digest-checked; {} when the bundle is unsigned."""
    docs: dict[str, bytes] = {}
    for title, d in _existing_layers(store, signature_tag(subject)).items():
        size = d.get("size")
        if not isinstance(size, int) or not 0 <= size <= MAX_SIGNATURE_BYTES:
            raise RegistryError(f"{store.location}: signature {title} has a bad size; refusing it")
        buf = io.BytesIO()
        store.fetch_blob(d.get("digest"), size, buf)  # the store refuses a bad digest
        docs[title.removesuffix(".sig")] = buf.getvalue()
    return docs
