"""The manifest: the bundle's table of contents, and the thing its digest is computed over.

Packed with msgpack from plain dicts whose keys are sorted, so equal content gives equal bytes.
`unpack_manifest` validates the structure before anything else reads a field.
"""

from __future__ import annotations

from typing import Any

import msgpack

from aotlm.bundle.format import (
    CHANGELOG,
    COMPILED_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_KINDS,
)
from aotlm.errors import BundleError

MAX_MANIFEST_CONTAINERS = 1_000_000  # maps + arrays; the tiny model's manifest has ~600


def _sorted(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _sorted(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [_sorted(v) for v in obj]
    return obj


def pack_manifest(manifest: dict) -> bytes:
    return msgpack.packb(_sorted(manifest), use_bin_type=True)


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BundleError(f"{MANIFEST_FILE}: {where}: {what}; the bundle is corrupt: rebuild it")


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    _expect(key in d, f"{where}{key}", "missing")
    value = d[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    _expect(ok, f"{where}{key}", f"expected {getattr(kind, '__name__', kind)}")
    return d[key]


def _check_version(m: dict) -> None:
    version = m.get("format_version")
    writer = m.get("aotlm_version", "an unknown aotlm")
    _expect(
        m.get("format") == FORMAT_NAME, "format", f"not an aotlm bundle (expected {FORMAT_NAME!r})"
    )
    _expect(isinstance(version, int) and not isinstance(version, bool), "format_version", "missing")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{MANIFEST_FILE}: format_version {version} was written by aotlm {writer}, newer than this "
            f"aotlm (reads up to {FORMAT_VERSION}): upgrade aotlm, or rebuild the bundle with this one"
        )
    if version not in CHANGELOG:
        raise BundleError(
            f"{MANIFEST_FILE}: unknown format_version {version} (written by aotlm {writer}; this aotlm "
            f"reads {sorted(CHANGELOG)}): rebuild the bundle with `aotlm build`"
        )


def _check_functions(m: dict) -> None:
    files = m["files"]
    for i, fn in enumerate(_field(m, "functions", list, "")):
        where = f"functions[{i}]."
        _expect(isinstance(fn, dict), where[:-1], "expected a map")
        _field(fn, "name", str, where)
        _field(fn, "bucket", dict, where)
        path = _field(fn, "file", str, where)
        _expect(path in files, f"{where}file", f"{path} is not listed in files")
        donate = _field(fn, "donate_argnums", list, where)
        _expect(all(isinstance(a, int) for a in donate), f"{where}donate_argnums", "expected ints")


def _check_compiled(m: dict) -> None:
    """Each compiled target: a fingerprint and executables under compiled/, listed in files."""
    files = m["files"]
    for target, entry in m["compiled"].items():
        where = f"compiled[{target!r}]."
        _expect(isinstance(entry, dict), where[:-1], "expected a map")
        fp = _field(entry, "fingerprint", dict, where)
        _field(fp, "platform", str, f"{where}fingerprint.")
        _field(fp, "device_count", int, f"{where}fingerprint.")
        for i, ex in enumerate(_field(entry, "executables", list, where)):
            at = f"{where}executables[{i}]."
            _expect(isinstance(ex, dict), at[:-1], "expected a map")
            _field(ex, "name", str, at)
            _field(ex, "bucket", dict, at)
            path = _field(ex, "file", str, at)
            _expect(path.startswith(COMPILED_DIR), f"{at}file", f"{path} is not under compiled/")
            _expect(path in files, f"{at}file", f"{path} is not listed in files")
    targets = _field(m, "targets", dict, "") if "targets" in m else {}  # optional before v2
    for target, entry in targets.items():
        _expect(isinstance(entry, dict), f"targets[{target!r}]", "expected a map")
        _field(entry, "tier", str, f"targets[{target!r}].")


def _check_files(m: dict) -> None:
    for path, entry in _field(m, "files", dict, "").items():
        where = f"files[{path!r}]"
        _expect(
            isinstance(path, str) and path and not path.startswith("/") and "\x00" not in path,
            where,
            "bad path",
        )
        _expect(".." not in path.split("/") and "\\" not in path, where, "path escapes the bundle")
        _expect(isinstance(entry, dict), where, "expected a map")
        _expect(
            isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64, where, "bad sha256"
        )
        _expect(isinstance(entry.get("size"), int) and entry["size"] >= 0, where, "bad size")


def unpack_manifest(data: bytes) -> dict:
    """Decode and validate a manifest; any problem is a BundleError naming the field."""
    containers = 0

    def count(container: Any) -> Any:
        """Bound the Python objects a small input can expand into (an empty array is one
        byte of msgpack and ~60 bytes of list): a bomb stops at MAX_MANIFEST_CONTAINERS."""
        nonlocal containers
        containers += 1
        if containers > MAX_MANIFEST_CONTAINERS:
            raise BundleError(
                f"{MANIFEST_FILE}: more than {MAX_MANIFEST_CONTAINERS} maps and arrays; "
                "refusing it (a real manifest has a few thousand): rebuild the bundle"
            )
        return container

    try:
        m = msgpack.unpackb(
            data, raw=False, strict_map_key=True, list_hook=count, object_hook=count
        )
    except BundleError:
        raise
    except msgpack.StackError as e:
        raise BundleError(
            f"{MANIFEST_FILE}: not a valid manifest (msgpack nested too deeply): rebuild the bundle"
        ) from e
    except Exception as e:  # msgpack raises several unrelated types on corrupt input
        raise BundleError(
            f"{MANIFEST_FILE}: not a valid msgpack manifest ({type(e).__name__}: {e}): "
            "rebuild the bundle"
        ) from e
    _expect(isinstance(m, dict), "top level", "expected a map")
    _check_version(m)
    for key, kind in (
        ("aotlm_version", str),
        ("jax_version", str),
        ("name", str),
        ("model", dict),
        ("serving", dict),
        ("buckets", dict),
        ("compiled", dict),
    ):
        _field(m, key, kind, "")
    if m["format_version"] >= 2:
        _field(m, "targets", dict, "")
    _check_files(m)
    _check_functions(m)
    _check_compiled(m)
    serving = m["serving"]
    kind = m["model"].get("kind", "decoder")
    _expect(kind in MODEL_KINDS, "model.kind", f"expected one of {', '.join(MODEL_KINDS)}")
    kv_keys = ("page_size", "kv_pages", "pages_per_seq") if kind == "decoder" else ()
    for key in ("max_seq_len", *kv_keys):
        _expect(
            isinstance(serving.get(key), int) and serving[key] > 0,
            f"serving.{key}",
            "expected a positive int",
        )
    _field(serving, "dtype", str, "serving.")
    if "mesh" in serving:  # a sharded bundle; absent: one device
        tp = _field(_field(serving, "mesh", dict, "serving."), "tp", int, "serving.mesh.")
        _expect(tp > 1, "serving.mesh.tp", "expected an int > 1")
    for key in ("tokens", "requests"):
        ladder = _field(m["buckets"], key, list, "buckets.")
        _expect(
            bool(ladder)
            and all(isinstance(b, int) and b > 0 for b in ladder)
            and ladder == sorted(set(ladder)),
            f"buckets.{key}",
            "expected increasing positive ints",
        )
    _field(m["model"], "config", dict, "model.")
    return m
