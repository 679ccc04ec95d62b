"""How a bundle maps onto an OCI artifact, and the checks applied to one before trusting it.

One layer per bundle file (not a tar): each layer's digest *is* the file's sha256 that the bundle
manifest already records, so the OCI manifest and the bundle manifest can be cross-checked before a
byte is downloaded; there is no archive to extract (no links, devices or traversal inside one to
defend against: only a path per layer, validated here); registries deduplicate unchanged weights and
tokenizer files across builds; and `oras pull` understands the layout (`org.opencontainers.image.title`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import Manifest
from aotlm.registry.errors import RegistryError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.aotlm.bundle.v1"
CONFIG_TYPE = "application/vnd.aotlm.bundle.config.v1+json"
MANIFEST_LAYER = "application/vnd.aotlm.bundle.manifest.v1+msgpack"
FILE_LAYER = "application/vnd.aotlm.bundle.file.v1"
SIGNATURE_ARTIFACT = "application/vnd.aotlm.signature.v1"
SIGNATURE_LAYER = "application/vnd.aotlm.signature.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
TITLE = "org.opencontainers.image.title"
REVISION = "org.opencontainers.image.revision"
BUNDLE_DIGEST = "aotlm.bundle.digest"

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # the limit most registries apply to manifests
MAX_CONFIG_BYTES = 1024 * 1024
MAX_LAYERS = 100_000
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_SAFE_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


@dataclass(frozen=True)
class Layer:
    """A validated layer: where it goes in the bundle, and the blob it must hash to."""

    path: str
    digest: str
    size: int
    media_type: str


def as_map(value: object) -> dict:
    """`value` if it is a JSON object, else {}: optional objects of a document from outside."""
    return value if isinstance(value, dict) else {}


def canonical_json(obj: object) -> bytes:
    """Sorted keys, no spaces: the same content always gives the same bytes, hence the same digest."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def descriptor(media_type: str, digest: str, size: int, **annotations: str) -> dict:
    d: dict = {"mediaType": media_type, "digest": digest, "size": size}
    if annotations:
        d["annotations"] = dict(annotations)
    return d


def safe_path(path: object) -> str:
    """A relative path that stays inside the bundle: no '..', no absolute, no odd characters."""
    if not isinstance(path, str) or not path or len(path) > 512:
        raise RegistryError(f"layer path {path!r}: missing or too long; refusing the artifact")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RegistryError(
            f"layer path {path!r} escapes the bundle directory; refusing the artifact"
        )
    if not all(_SAFE_PART.fullmatch(p) for p in parts):
        raise RegistryError(f"layer path {path!r} has characters a bundle never uses; refusing it")
    return path


def bundle_annotations(manifest: Manifest, digest: str, revision: str | None) -> dict[str, str]:
    """What a registry UI or `oras manifest fetch` shows; no timestamps, so pushes are reproducible."""
    notes = {
        BUNDLE_DIGEST: f"sha256:{digest}",
        "aotlm.bundle.name": manifest.name,
        "aotlm.format_version": str(manifest.format_version),
        "aotlm.version": manifest.aotlm_version,
        "aotlm.jax_version": manifest.jax_version,
        "aotlm.jaxlib_version": manifest.jaxlib_version,
        "aotlm.architecture": manifest.model.architecture,
        "aotlm.targets": ",".join(manifest.serving.targets),
        "aotlm.platforms": ",".join(manifest.serving.platforms),
        "org.opencontainers.image.title": manifest.name,
    }
    if revision:
        notes[REVISION] = revision
    return notes


def bundle_config(manifest: Manifest, digest: str) -> bytes:
    """The config blob: a small JSON summary, so tools can read it without fetching any layer."""
    wire = manifest.to_dict()
    return canonical_json(
        {
            "bundle_digest": f"sha256:{digest}",
            "name": manifest.name,
            "format_version": manifest.format_version,
            "aotlm_version": manifest.aotlm_version,
            "jax_version": manifest.jax_version,
            "buckets": wire["buckets"],
            "serving": wire["serving"],
        }
    )


def image_manifest(
    artifact_type: str,
    config: dict,
    layers: list[dict],
    annotations: dict[str, str],
    subject: dict | None = None,
) -> bytes:
    m: dict = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config,
        "layers": layers,
        "annotations": annotations,
    }
    if subject:
        m["subject"] = subject
    return canonical_json(m)


def _descriptor_fields(d: object, where: str) -> tuple[str, str, int]:
    if not isinstance(d, dict):
        raise RegistryError(f"OCI manifest: {where}: expected a descriptor object")
    mt, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
    if not isinstance(mt, str) or not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RegistryError(
            f"OCI manifest: {where}: bad mediaType or digest (only sha256 is accepted)"
        )
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"OCI manifest: {where}: bad size")
    return mt, digest, size


def parse_manifest(data: bytes, artifact_type: str) -> dict:
    """Decode an OCI manifest and check it is the artifact type we expect."""
    try:
        m = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deeply
        raise RegistryError(f"OCI manifest is not valid JSON ({e}); refusing it") from e
    if not isinstance(m, dict) or m.get("schemaVersion") != 2:
        raise RegistryError("OCI manifest: not a schemaVersion 2 manifest")
    if m.get("mediaType", OCI_MANIFEST) != OCI_MANIFEST:
        raise RegistryError(
            f"OCI manifest: mediaType {m.get('mediaType')!r} is not an image manifest"
        )
    found = m.get("artifactType") or as_map(m.get("config")).get("mediaType")
    expected_config = CONFIG_TYPE if artifact_type == ARTIFACT_TYPE else EMPTY_TYPE
    if found not in (artifact_type, expected_config):
        raise RegistryError(
            f"OCI manifest: artifact type {found!r} is not {artifact_type!r}: "
            "this reference is not an aotlm bundle (pushed by `aotlm push`?)"
        )
    _descriptor_fields(m.get("config"), "config")
    if not isinstance(m.get("layers"), list) or len(m["layers"]) > MAX_LAYERS:
        raise RegistryError(f"OCI manifest: layers must be a list of at most {MAX_LAYERS}")
    return m


def bundle_layers(m: dict) -> list[Layer]:
    """Validated layers of a bundle artifact; refuses unsafe or duplicate paths and unknown types."""
    layers: list[Layer] = []
    seen: set[str] = set()
    dirs: set[str] = set()
    for i, d in enumerate(m["layers"]):
        mt, digest, size = _descriptor_fields(d, f"layers[{i}]")
        if mt not in (MANIFEST_LAYER, FILE_LAYER):
            raise RegistryError(f"OCI manifest: layers[{i}]: unknown media type {mt!r}")
        path = safe_path(as_map(d.get("annotations")).get(TITLE))
        parents = {path.rsplit("/", k)[0] for k in range(1, path.count("/") + 1)}
        if path in seen or path in dirs or parents & seen:
            raise RegistryError(
                f"OCI manifest: layers[{i}]: path {path!r} clashes with another layer"
            )
        seen.add(path)
        dirs |= parents
        layers.append(Layer(path, digest, size, mt))
    for required in (MANIFEST_FILE, DIGEST_FILE):
        if required not in seen:
            raise RegistryError(f"OCI manifest: no layer for {required}; not a complete bundle")
    return layers
