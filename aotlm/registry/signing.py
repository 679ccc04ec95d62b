"""Ed25519 signatures over a bundle's digest and name, kept beside the bundle, never inside it.

A signature lives in `signatures/<keyid>.sig`, outside manifest.msgpack, so signing does not change
the bundle digest (builds stay reproducible) and a bundle can be signed after it was built or pushed.
Signing the digest is enough: the manifest it hashes lists every file's sha256, and `open_bundle`
checks those. Plain Ed25519 via `cryptography` rather than OpenSSF model-signing/sigstore: no
network, no transparency log or OIDC identity to run in an air-gapped deploy, one small dependency,
and keys that fit in a CI secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aotlm.bundle import open_bundle, read_manifest
from aotlm.registry.artifact import canonical_json
from aotlm.registry.errors import SignatureError

SIGNATURES_DIR = "signatures"
PAYLOAD_TYPE = "aotlm-bundle-signature/v1"
MAX_SIGNATURE_BYTES = 64 * 1024
_KEYID = re.compile(r"[a-f0-9]{16}")
TrustedKeys = Mapping[str, Ed25519PublicKey]


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key: names the signature file."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(prefix: Path) -> tuple[Path, Path, str]:
    """Write PREFIX.key (PKCS#8 PEM, mode 0600) and PREFIX.pub; refuses to overwrite either."""
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = (
        prefix.with_name(prefix.name + ".key"),
        prefix.with_name(prefix.name + ".pub"),
    )
    for p in (key_path, pub_path):
        if p.exists():
            raise SignatureError(f"{p}: already exists; refusing to overwrite a key")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = private.public_key()
    pub_path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path, key_id(public)


def load_private_key(data: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{where}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{where}: not an Ed25519 key (make one with `aotlm keygen`)")
    return key


def load_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{where}: not a PEM public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{where}: not an Ed25519 public key")
    return key


def load_trusted_keys(path: Path | str) -> dict[str, Ed25519PublicKey]:
    """The trust policy: one `.pub` file, or a directory of them. Empty is an error, not 'trust all'."""
    path = Path(path)
    files = sorted(path.glob("*.pub")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise SignatureError(f"{path}: no trusted public keys (*.pub) found")
    return {key_id(k): k for k in (load_public_key(f.read_bytes(), str(f)) for f in files)}


def _payload(digest: str, name: str) -> bytes:
    return canonical_json({"type": PAYLOAD_TYPE, "bundle_digest": f"sha256:{digest}", "name": name})


def signature_document(key: Ed25519PrivateKey, digest: str, name: str) -> bytes:
    sig = key.sign(_payload(digest, name))
    doc = {
        "version": 1,
        "keyid": key_id(key.public_key()),
        "bundle_digest": f"sha256:{digest}",
        "name": name,
        "signature": base64.b64encode(sig).decode(),
    }
    return canonical_json(doc) + b"\n"


def sign_bundle(bundle_dir: Path | str, key: Ed25519PrivateKey) -> Path:
    """Verify the bundle, then write signatures/<keyid>.sig (replacing this key's old signature)."""
    bundle = open_bundle(bundle_dir)
    doc = signature_document(key, bundle.digest, bundle.manifest.name)
    out = bundle.path / SIGNATURES_DIR / f"{key_id(key.public_key())}.sig"
    out.parent.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(doc)
    os.replace(tmp, out)
    return out


def read_signature_files(bundle_dir: Path) -> dict[str, bytes]:
    """keyid -> signature document for every signatures/*.sig (symlinks and huge files refused)."""
    docs: dict[str, bytes] = {}
    sig_dir = Path(bundle_dir) / SIGNATURES_DIR
    if sig_dir.is_symlink() or not sig_dir.is_dir():
        return docs
    for p in sorted(sig_dir.glob("*.sig")):
        if p.is_symlink() or not p.is_file() or p.stat().st_size > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{p}: not a regular signature file; refusing it")
        docs[p.stem] = p.read_bytes()
    return docs


@dataclass(frozen=True)
class SignatureCheck:
    """`good`: first trusted key with a valid signature. `broken`: tamper evidence (invalid,
    malformed, or for another bundle). `ignored`: signatures by keys outside the trust policy."""

    good: str | None
    broken: tuple[str, ...]
    ignored: tuple[str, ...]


def _check_one(stem: str, data: bytes, digest: str, name: str, trusted: TrustedKeys) -> str:
    """'' when valid and trusted, 'ignored: ...' for an untrusted key, else what is broken."""
    try:
        doc = json.loads(data)
        keyid, sig = doc["keyid"], base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, RecursionError):
        return f"{stem}.sig: malformed signature file"
    if keyid != stem or not _KEYID.fullmatch(str(keyid)):
        return f"{stem}.sig: key id {keyid!r} does not match the file name"
    if keyid not in trusted:
        return f"ignored: {stem}.sig is signed by key {keyid}, which is not trusted"
    if doc.get("bundle_digest") != f"sha256:{digest}":
        return f"{stem}.sig: signs another bundle ({doc.get('bundle_digest')})"
    try:
        trusted[keyid].verify(sig, _payload(digest, name))
    except InvalidSignature:
        return f"{stem}.sig: invalid signature by trusted key {keyid}"
    return ""


def check_signatures(
    digest: str, name: str, docs: Mapping[str, bytes], trusted: TrustedKeys
) -> SignatureCheck:
    """Check every signature document against the bundle's digest and name."""
    results = {stem: _check_one(stem, data, digest, name, trusted) for stem, data in docs.items()}
    good = next((stem for stem, r in sorted(results.items()) if not r), None)
    return SignatureCheck(
        good=good,
        broken=tuple(r for r in results.values() if r and not r.startswith("ignored: ")),
        ignored=tuple(
            r.removeprefix("ignored: ") for r in results.values() if r.startswith("ignored: ")
        ),
    )


def verify_signature(bundle_dir: Path | str, trusted_keys: TrustedKeys | Path | str) -> str | None:
    """The id of a trusted key whose signature over this bundle's digest is valid, else None.

    Checks the manifest against manifest.sha256 but not every file: callers run `open_bundle` too.
    """
    keys = trusted_keys if isinstance(trusted_keys, Mapping) else load_trusted_keys(trusted_keys)
    manifest, digest = read_manifest(Path(bundle_dir))
    docs = read_signature_files(Path(bundle_dir))
    return check_signatures(digest, manifest.name, docs, keys).good


def enforce_policy(
    digest: str, name: str, docs: Mapping[str, bytes], trusted: TrustedKeys, require_signed: bool
) -> str | None:
    """Raise on tamper evidence, or when no trusted signature exists and one is required."""
    check = check_signatures(digest, name, docs, trusted)
    if check.broken:
        raise SignatureError(
            f"bundle sha256:{digest}: " + "; ".join(check.broken) + "; refusing it"
        )
    if require_signed and check.good is None:
        why = "; ".join(check.ignored) if check.ignored else "it has no signatures"
        raise SignatureError(
            f"bundle sha256:{digest} is not signed by a trusted key ({why}); --require-signed refuses it"
        )
    return check.good
