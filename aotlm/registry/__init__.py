"""Ship bundles the way teams ship artifacts: OCI registries, immutable digests, signatures.

Public surface (the CLI in `aotlm.cli.registry` is a thin layer over it):
`push_bundle`, `pull_bundle`, `resolve_bundle`, `sign_bundle`, `verify_signature`,
`load_trusted_keys`, `generate_keypair`, `diff_bundles`, `parse_ref`.

Names are imported on first use, so `aotlm --help` and commands that never touch a registry do
not pay for importing httpx and cryptography.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "resolve_bundle": "pulled",
    "diff_bundles": "diff",
    "RegistryError": "errors",
    "SignatureError": "errors",
    "PullResult": "pull",
    "pull_bundle": "pull",
    "PushResult": "push",
    "push_bundle": "push",
    "Ref": "ref",
    "is_ref": "ref",
    "parse_ref": "ref",
    "generate_keypair": "signing",
    "load_trusted_keys": "signing",
    "sign_bundle": "signing",
    "verify_signature": "signing",
    "RegistryOptions": "store",
}
__all__ = [
    "PullResult",
    "PushResult",
    "Ref",
    "RegistryError",
    "RegistryOptions",
    "SignatureError",
    "diff_bundles",
    "generate_keypair",
    "is_ref",
    "load_trusted_keys",
    "parse_ref",
    "pull_bundle",
    "push_bundle",
    "resolve_bundle",
    "sign_bundle",
    "verify_signature",
]

if TYPE_CHECKING:
    from aotlm.registry.diff import diff_bundles
    from aotlm.registry.errors import RegistryError, SignatureError
    from aotlm.registry.pull import PullResult, pull_bundle
    from aotlm.registry.pulled import resolve_bundle
    from aotlm.registry.push import PushResult, push_bundle
    from aotlm.registry.ref import Ref, is_ref, parse_ref
    from aotlm.registry.signing import (
        generate_keypair,
        load_trusted_keys,
        sign_bundle,
        verify_signature,
    )
    from aotlm.registry.store import RegistryOptions


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aotlm.registry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"aotlm.registry.{_EXPORTS[name]}"), name)
