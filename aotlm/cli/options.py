"""What every command shares: options declared once, AotlmError turned into a clean exit, and
where a command gets its bundle from (a directory or a registry reference) and how far it trusts it.

The option helpers keep each command's declaration to one line per option; their defaults are
shown in ``--help`` whenever a default is given.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from aotlm.errors import AotlmError
from aotlm.runtime.load.trust import POLICIES, TrustPolicy

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def errors_to_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an AotlmError (bad input, bad bundle, ...) into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AotlmError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def option(*decls: str, help: str, **kw: Any) -> Decorator:
    """A click option whose default, when it has one, is shown in --help."""
    return click.option(
        *decls, show_default="default" in kw and kw["default"] is not None, help=help, **kw
    )


def flag(*decls: str, help: str) -> Decorator:
    return click.option(*decls, is_flag=True, help=help)


def count(*decls: str, help: str, minimum: int = 1, **kw: Any) -> Decorator:
    """An integer option of at least `minimum`."""
    return option(*decls, type=click.IntRange(min=minimum), help=help, **kw)


def amount(*decls: str, help: str, **kw: Any) -> Decorator:
    """A float option of at least 0 (seconds, costs)."""
    return option(*decls, type=click.FloatRange(min=0), help=help, **kw)


def json_flag(what: str) -> Decorator:
    return flag("--json", "as_json", help=f"Print {what} as JSON.")


def strict_flag(help: str = "Fail if anything compiles after the bundle is loaded.") -> Decorator:
    return flag("--strict", help=help)


def directory(name: str = "bundle_dir") -> Decorator:
    """An existing directory argument (a bundle, mostly)."""
    return click.argument(name, type=click.Path(exists=True, file_okay=False, path_type=Path))


def output_dir(help: str) -> Decorator:
    return option(
        "-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help=help
    )


def cache_dir(help: str) -> Decorator:
    return option(
        "--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=help
    )


def trusted_keys(help: str) -> Decorator:
    return option(
        "--trusted-keys", type=click.Path(exists=True, path_type=Path), default=None, help=help
    )


require_signed = flag(
    "--require-signed", help="Refuse a registry bundle that is not signed by one of --trusted-keys."
)
insecure = flag("--insecure", help="Plain http even for non-loopback registries.")


def registry_login(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--insecure, --username, --password-stdin: how to reach and log in to the registry; passes
    them to the command as `options` (a RegistryOptions)."""

    @insecure
    @option("--username", default=None, help="Registry user (default: ~/.docker/config.json).")
    @flag("--password-stdin", help="Read the registry password (or token) from stdin.")
    @functools.wraps(fn)
    def wrapper(*args, insecure, username, password_stdin, **kwargs):
        from aotlm.registry.store import RegistryOptions

        if password_stdin and not username:
            raise click.UsageError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\n") if password_stdin else None
        kwargs["options"] = RegistryOptions(insecure=insecure, username=username, password=password)
        return fn(*args, **kwargs)

    return wrapper


def bundle_source(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The trust options of every command that runs a bundle; passes `trust` and `require_signed`."""

    @option(
        "--allow-pickle",
        type=click.Choice(POLICIES),
        default="local",
        help="Which bundles' compiled executables (pickles) may be loaded: built on this "
        "machine (or signed by --trusted-keys), only signed ones, or never (compile StableHLO "
        "at startup).",
    )
    @trusted_keys("Ed25519 public key (.pub) or a directory of them whose signatures are trusted.")
    @require_signed
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
