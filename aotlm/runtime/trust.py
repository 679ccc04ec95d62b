"""Whether this process may unpickle a bundle's serialized executables.

Serialized executables are pickles of private jax classes: loading one from an untrusted source
runs arbitrary code. The digest and fingerprint checks say a file is intact and compatible; the
trust policy says whether its author is trusted at all.

    allow_pickle="local"           only bundles this machine built (their digest is in the local
                                   registry, see aotlm/cache.py); the default
    allow_pickle="never"           never: always compile the StableHLO at startup
    allow_pickle="trusted-signed"  bundles signed by a trusted key (comes with the registry issue;
                                   until then it accepts nothing)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aotlm.cache import LocalRegistry, default_cache_dir

POLICIES = ("local", "never", "trusted-signed")


@dataclass(frozen=True)
class TrustPolicy:
    allow_pickle: str = "local"
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.allow_pickle not in POLICIES:
            raise ValueError(f"allow_pickle: expected one of {POLICIES}, got {self.allow_pickle!r}")

    def refusal(self, digest: str) -> str | None:
        """None when pickles of bundle `digest` may be loaded, else why not."""
        if self.allow_pickle == "never":
            return "trust policy allow_pickle=never"
        if self.allow_pickle == "trusted-signed":
            return (
                "trust policy allow_pickle=trusted-signed: bundle signatures are not supported yet"
            )
        if not LocalRegistry(self.cache_dir).contains(digest):
            return (
                f"trust policy allow_pickle=local: bundle sha256:{digest[:12]} was not built on this "
                f"machine (no record in {LocalRegistry(self.cache_dir).dir})"
            )
        return None
