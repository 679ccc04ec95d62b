"""Where `generate` and `serve` get a bundle from, and how far they trust it.

BUNDLE may be a local directory or a registry reference (`oci://host/repo@sha256:...`,
`file:///path/store:tag`), pulled and verified into the local content-addressed cache first.
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from aotlm.runtime.trust import POLICIES, TrustPolicy


def bundle_source_options(fn):
    """The trust options shared by every command that runs a bundle."""

    @click.option(
        "--allow-pickle",
        type=click.Choice(POLICIES),
        default="local",
        show_default=True,
        help="Which bundles' compiled executables (pickles) may be loaded: built on this machine "
        "(or signed by --trusted-keys), only signed ones, or never (compile StableHLO at startup).",
    )
    @click.option(
        "--trusted-keys",
        type=click.Path(exists=True, path_type=Path),
        default=None,
        help="Ed25519 public key (.pub) or a directory of them whose signatures are trusted.",
    )
    @click.option(
        "--require-signed",
        is_flag=True,
        help="Refuse a registry bundle that is not signed by one of --trusted-keys.",
    )
    @functools.wraps(fn)
    def wrapper(*args, allow_pickle, trusted_keys, require_signed, **kwargs):
        kwargs["trust"] = TrustPolicy(allow_pickle, trusted_keys=trusted_keys)
        kwargs["require_signed"] = require_signed
        return fn(*args, **kwargs)

    return wrapper


def resolve_source(bundle: str, trust: TrustPolicy, require_signed: bool) -> Path:
    """A local, not yet verified bundle directory (the loader verifies every byte before use)."""
    from aotlm.registry import is_ref

    if not is_ref(bundle):
        path = Path(bundle)
        if not path.is_dir():
            raise click.BadParameter(f"{bundle}: no such bundle directory", param_hint="BUNDLE")
        return path
    if require_signed and trust.trusted_keys is None:
        raise click.BadParameter(
            "--require-signed needs --trusted-keys", param_hint="--require-signed"
        )
    from aotlm.registry import resolve_bundle

    return resolve_bundle(bundle, trusted_keys=trust.trusted_keys, require_signed=require_signed)
