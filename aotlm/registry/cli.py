"""Click commands `push`, `pull`, `sign`, `keygen`, `diff`; registered on the main group by aotlm.cli.

Thin by design: parse options, call `aotlm.registry`, print text or JSON, and turn an AotlmError into
a one-line message with exit code 1. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aotlm.cli_util import errors_to_exit, human

if TYPE_CHECKING:  # importing aotlm.registry loads httpx and cryptography: only inside commands
    from aotlm.registry.store import RegistryOptions


def _registry_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--insecure, --username, --password-stdin: how to reach and log in to the registry."""
    fn = click.option(
        "--password-stdin", is_flag=True, help="Read the registry password (or token) from stdin."
    )(fn)
    fn = click.option(
        "--username", default=None, help="Registry user (default: ~/.docker/config.json)."
    )(fn)
    fn = click.option(
        "--insecure", is_flag=True, help="Plain http even for non-loopback registries."
    )(fn)
    return fn


def _options(insecure: bool, username: str | None, password_stdin: bool) -> RegistryOptions:
    from aotlm.registry.store import RegistryOptions

    if password_stdin and not username:
        raise click.UsageError("--password-stdin needs --username")
    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    return RegistryOptions(insecure=insecure, username=username, password=password)


@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref")
@click.option(
    "--tag", "tags", multiple=True, help="Also point this tag at the pushed artifact (repeatable)."
)
@click.option(
    "--source-revision",
    envvar="GITHUB_SHA",
    default=None,
    help="Source commit recorded as org.opencontainers.image.revision (default: $GITHUB_SHA).",
)
@_registry_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@errors_to_exit
def push(
    bundle_dir, ref, tags, source_revision, insecure, username, password_stdin, as_json
) -> None:
    """Verify BUNDLE_DIR and push it to REF (oci://HOST[:PORT]/REPO[:TAG] or file://DIR[:TAG])."""
    from aotlm.registry import push_bundle

    options = _options(insecure, username, password_stdin)
    r = push_bundle(
        bundle_dir, ref, extra_tags=tags, source_revision=source_revision, options=options
    )
    if as_json:
        click.echo(json.dumps(r.to_json()))
        return
    also = f" (+ {', '.join(r.tags[1:])})" if len(r.tags) > 1 else ""
    click.echo(f"pushed   {r.pinned.location}:{r.tags[0]}{also}")
    click.echo(
        f"blobs    {r.blobs_uploaded} uploaded ({human(r.bytes_uploaded)}), "
        f"{r.blobs_present} already there"
    )
    click.echo(f"signed   {', '.join(r.signatures) or '(unsigned)'}")
    click.echo(f"bundle   {r.bundle_digest}\ndigest   {r.digest}\npull     {r.pinned}")


@click.command()
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory to create (replaced atomically if it holds a bundle).",
)
@click.option(
    "--trusted-keys",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Trust policy: a .pub file or a directory of them; signatures are then checked.",
)
@click.option("--require-signed", is_flag=True, help="Refuse bundles not signed by a trusted key.")
@_registry_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@errors_to_exit
def pull(
    ref, out_dir, trusted_keys, require_signed, insecure, username, password_stdin, as_json
) -> None:
    """Pull REF (a tag or @sha256: digest), verify everything, then move it into OUT_DIR."""
    from aotlm.registry import pull_bundle

    options = _options(insecure, username, password_stdin)
    r = pull_bundle(
        ref, out_dir, trusted_keys=trusted_keys, require_signed=require_signed, options=options
    )
    if as_json:
        click.echo(json.dumps(r.to_json()))
        return
    if r.signed_by:
        trust = f"signed by trusted key {r.signed_by}"
    elif trusted_keys:
        trust = "no trusted signature (allowed: --require-signed not given)"
    else:
        trust = f"not checked (no --trusted-keys; {len(r.signatures)} signature(s) stored)"
    click.echo(f"pulled   {r.pinned}\nbundle   {r.bundle_digest}  {r.files} files verified")
    click.echo(f"into     {r.out_dir}\ntrust    {trust}")


@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(allow_dash=True, path_type=Path),
    help="Ed25519 private key (PEM, from `aotlm keygen`); '-' reads it from stdin.",
)
@errors_to_exit
def sign(bundle_dir: Path, key_path: Path) -> None:
    """Verify BUNDLE_DIR and write signatures/<keyid>.sig over its digest and name."""
    from aotlm.registry.signing import key_id, load_private_key, sign_bundle

    data = sys.stdin.buffer.read() if str(key_path) == "-" else key_path.read_bytes()
    key = load_private_key(data, str(key_path))
    out = sign_bundle(bundle_dir, key)
    click.echo(f"signed  {bundle_dir}  key {key_id(key.public_key())}  -> {out}")


@click.command()
@click.argument("prefix", type=click.Path(path_type=Path))
@errors_to_exit
def keygen(prefix: Path) -> None:
    """Create an Ed25519 keypair: PREFIX.key (private, mode 0600) and PREFIX.pub (to trust)."""
    from aotlm.registry import generate_keypair

    key_path, pub_path, keyid = generate_keypair(prefix)
    click.echo(f"key id  {keyid}\nprivate {key_path}  (keep secret: CI secret, never commit)")
    click.echo(f"public  {pub_path}  (put in the trusted keys directory of deployments)")


@click.command()
@click.argument("a")
@click.argument("b")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where oci:// and file:// references are pulled (default ~/.cache/aotlm/bundles).",
)
@click.option("--insecure", is_flag=True, help="Plain http even for non-loopback registries.")
@click.option("--exit-code", is_flag=True, help="Exit with status 1 when the bundles differ.")
@click.option("--json", "as_json", is_flag=True, help="Print the differences as JSON.")
@errors_to_exit
def diff(
    a: str, b: str, cache_dir: Path | None, insecure: bool, exit_code: bool, as_json: bool
) -> None:
    """Show what changed from bundle A to bundle B (directories or registry references)."""
    from aotlm.registry import RegistryOptions, diff_bundles, resolve_bundle
    from aotlm.registry.diff import format_diff

    options = RegistryOptions(insecure=insecure)
    d = diff_bundles(
        resolve_bundle(a, cache_dir, options=options), resolve_bundle(b, cache_dir, options=options)
    )
    click.echo(json.dumps(d, indent=2) if as_json else format_diff(d))
    if exit_code and not d["identical"]:
        raise SystemExit(1)
