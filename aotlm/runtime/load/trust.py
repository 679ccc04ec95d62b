"""Whether this process may unpickle a bundle's serialized executables.

Serialized executables are pickles of private jax classes: loading one from an untrusted source
runs arbitrary code. The digest and fingerprint checks say a file is intact and compatible; the
trust policy says whether its author is trusted at all.

    allow_pickle="local"           bundles this machine built (their digest is recorded in
                                   aotlm/bundle/built_here.py's directory), or signed by a key in
                                   `trusted_keys` when keys are given; the default
    allow_pickle="trusted-signed"  only bundles signed by a key in `trusted_keys`
    allow_pickle="never"           never: always compile the StableHLO at startup

A refused bundle still serves: from its StableHLO, compiled once at startup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aotlm.bundle.built_here import BuiltHere
from aotlm.state_dir import default_cache_dir

POLICIES = ("local", "trusted-signed", "never")


@dataclass(frozen=True)
class TrustPolicy:
    allow_pickle: str = "local"
    cache_dir: Path = field(default_factory=default_cache_dir)
    trusted_keys: Path | None = None  # a .pub file or a directory of them

    def __post_init__(self) -> None:
        if self.allow_pickle not in POLICIES:
            raise ValueError(f"allow_pickle: expected one of {POLICIES}, got {self.allow_pickle!r}")

    def _signed_by(self, bundle_dir: Path) -> str | None:
        if self.trusted_keys is None:
            return None
        from aotlm.registry import verify_signature  # cryptography loads only when keys are set

        return verify_signature(bundle_dir, self.trusted_keys)

    def refusal(self, bundle_dir: Path, digest: str) -> str | None:
        """None when pickles of this (already verified) bundle may be loaded, else why not."""
        if self.allow_pickle == "never":
            return "trust policy allow_pickle=never"
        if self._signed_by(Path(bundle_dir)):
            return None
        if self.allow_pickle == "trusted-signed":
            keys = self.trusted_keys or "none configured"
            return f"trust policy allow_pickle=trusted-signed: not signed by a trusted key ({keys})"
        record = BuiltHere(self.cache_dir)
        if not record.contains(digest):
            return (
                f"trust policy allow_pickle=local: bundle sha256:{digest[:12]} was not built on this "
                f"machine (no record in {record.dir}) and is not signed by a trusted key"
            )
        return None
