"""Artifact references: `oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]` and `file://PATH[:TAG][@...]`.

Parsed once into a frozen `Ref` so every other module works with named fields, never substrings.
A digest always wins over a tag (the tag is then only informational), as in docker and oras.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from aotlm.registry.errors import RegistryError

DEFAULT_TAG = "latest"
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_REPO_PART = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")
SCHEMES = ("oci://", "file://")


@dataclass(frozen=True)
class Ref:
    """One artifact in a store. `host`/`repository` for oci://, `path` for file:// layouts."""

    scheme: str  # "oci" | "file"
    tag: str | None
    digest: str | None
    host: str = ""
    repository: str = ""
    path: Path | None = None

    @property
    def reference(self) -> str:
        """What the store is asked for: the digest when pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def location(self) -> str:
        """The store without tag or digest: `oci://host/repo` or `file:///abs/path`."""
        if self.scheme == "oci":
            return f"oci://{self.host}/{self.repository}"
        return f"file://{self.path}"

    def pinned(self, digest: str) -> Ref:
        """The same artifact addressed by digest (what deployments should use)."""
        return replace(self, tag=None, digest=digest)

    def with_tag(self, tag: str) -> Ref:
        return replace(self, tag=check_tag(tag), digest=None)

    def __str__(self) -> str:
        if self.digest:
            return f"{self.location}@{self.digest}"
        return f"{self.location}:{self.tag or DEFAULT_TAG}"


def is_ref(text: str) -> bool:
    """True for strings that name a store (oci:// or file://) rather than a local directory."""
    return str(text).startswith(SCHEMES)


def check_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise RegistryError(
            f"{tag!r}: not a valid tag (letters, digits, '_', '.', '-'; at most 128; no leading '.' or '-')"
        )
    return tag


def _split_tag_digest(rest: str, text: str) -> tuple[str, str | None, str | None]:
    digest = None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise RegistryError(f"{text}: bad digest {digest!r} (expected sha256:<64 hex>)")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        check_tag(tag)
    return rest, tag, digest


def parse_ref(text: str) -> Ref:
    """Parse a reference; errors quote it and show the accepted forms."""
    forms = "oci://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST] or file://DIR[:TAG|@sha256:DIGEST]"
    if text.startswith("file://"):
        rest, tag, digest = _split_tag_digest(text[len("file://") :], text)
        if not rest:
            raise RegistryError(f"{text}: missing directory; expected {forms}")
        return Ref("file", tag, digest, path=Path(rest).absolute())
    if not text.startswith("oci://"):
        raise RegistryError(f"{text}: not a registry reference; expected {forms}")
    body = text[len("oci://") :]
    if "/" not in body:
        raise RegistryError(f"{text}: missing repository; expected {forms}")
    host, rest = body.split("/", 1)
    if not _HOST.fullmatch(host):
        raise RegistryError(f"{text}: bad registry host {host!r}")
    repo, tag, digest = _split_tag_digest(rest, text)
    if not all(_REPO_PART.fullmatch(p) for p in repo.split("/")):
        raise RegistryError(
            f"{text}: bad repository {repo!r} (lowercase letters, digits and . _ - separated by /)"
        )
    return Ref("oci", tag, digest, host=host.lower(), repository=repo)
