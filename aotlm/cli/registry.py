"""`aotlm push`, `pull`, `sign`, `keygen`, `diff`: bundles to and from OCI registries, signed.

Thin by design: parse options, call `aotlm.registry`, print text or JSON. Heavy imports (httpx,
cryptography) happen inside the commands.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from aotlm.cli.options import (
    cache_dir,
    directory,
    errors_to_exit,
    flag,
    insecure,
    json_flag,
    option,
    output_dir,
    registry_login,
    require_signed,
    trusted_keys,
)
from aotlm.cli.tables import human


@click.command()
@directory()
@click.argument("ref")
@json_flag("the result")
@option(
    "--tag", "tags", multiple=True, help="Also point this tag at the pushed artifact (repeatable)."
)
@option(
    "--source-revision",
    envvar="GITHUB_SHA",
    default=None,
    help="Source commit recorded as org.opencontainers.image.revision (default: $GITHUB_SHA).",
)
@registry_login
@errors_to_exit
def push(bundle_dir, ref, as_json, tags, source_revision, options) -> None:
    """Verify BUNDLE_DIR and push it to REF (oci://HOST[:PORT]/REPO[:TAG] or file://DIR[:TAG])."""
    from aotlm.registry import push_bundle

    r = push_bundle(
        bundle_dir, ref, extra_tags=tags, source_revision=source_revision, options=options
    )
    click.echo(json.dumps(r.to_json()) if as_json else _pushed(r))


def _pushed(r) -> str:
    also = f" (+ {', '.join(r.tags[1:])})" if len(r.tags) > 1 else ""
    return (
        f"pushed   {r.pinned.location}:{r.tags[0]}{also}\n"
        f"blobs    {r.blobs_uploaded} uploaded ({human(r.bytes_uploaded)}), "
        f"{r.blobs_present} already there\n"
        f"signed   {', '.join(r.signatures) or '(unsigned)'}\n"
        f"bundle   {r.bundle_digest}\ndigest   {r.digest}\npull     {r.pinned}"
    )


@click.command()
@click.argument("ref")
@output_dir("Bundle directory to create (replaced atomically if it holds a bundle).")
@registry_login
@trusted_keys("Trust policy: a .pub file or a directory of them; signatures are then checked.")
@require_signed
@json_flag("the result")
@errors_to_exit
def pull(ref, out_dir, options, trusted_keys, require_signed, as_json) -> None:
    """Pull REF (a tag or @sha256: digest), verify everything, then move it into OUT_DIR."""
    from aotlm.registry import pull_bundle

    r = pull_bundle(
        ref, out_dir, trusted_keys=trusted_keys, require_signed=require_signed, options=options
    )
    click.echo(json.dumps(r.to_json()) if as_json else _pulled(r, checked=bool(trusted_keys)))


def _pulled(r, checked: bool) -> str:
    if r.signed_by:
        trust = f"signed by trusted key {r.signed_by}"
    elif checked:
        trust = "no trusted signature (allowed: --require-signed not given)"
    else:
        trust = f"not checked (no --trusted-keys; {len(r.signatures)} signature(s) stored)"
    return (
        f"pulled   {r.pinned}\nbundle   {r.bundle_digest}  {r.files} files verified\n"
        f"into     {r.out_dir}\ntrust    {trust}"
    )


@click.command()
@directory()
@option(
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
@cache_dir("Where oci:// and file:// references are pulled (default ~/.cache/aotlm/bundles).")
@insecure
@flag("--exit-code", help="Exit with status 1 when the bundles differ.")
@json_flag("the differences")
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
