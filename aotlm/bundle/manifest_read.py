"""Decode a manifest and check every field before anything reads one: bytes -> `Manifest`.

The manifest is read before any file is verified and comes from wherever the bundle came from,
so nothing is trusted: sizes are bounded, every field's type is checked, and any problem is a
BundleError that names the field. Only the versions in format.READABLE are accepted (the current
one and 7, which lacks only the masked sampler): an older bundle is rebuilt, a newer one needs a
newer aotlm.
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
    READABLE,
)
from aotlm.bundle.manifest import (
    DECODER,
    MODEL_KINDS,
    Attention,
    Buckets,
    CompiledTarget,
    Executable,
    FileEntry,
    Function,
    Manifest,
    ModelInfo,
    Serving,
    TargetEntry,
    kv_dtype_name,
)
from aotlm.errors import BundleError

MAX_MANIFEST_CONTAINERS = 1_000_000  # maps + arrays; the tiny model's manifest has ~600


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise BundleError(f"{MANIFEST_FILE}: {where}: {what}; the bundle is corrupt: rebuild it")


def _field(d: dict, key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    """d[key], checked to be a `kind` (bool is not an int here); `default` when optional."""
    if key not in d and default is not ...:
        return default
    _expect(key in d, f"{where}{key}", "missing")
    value = d[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    _expect(ok, f"{where}{key}", f"expected {getattr(kind, '__name__', kind)}")
    return value


def _map(d: dict, key: str, where: str) -> dict:
    value = _field(d, key, dict, where)
    _expect(all(isinstance(k, str) for k in value), f"{where}{key}", "expected string keys")
    return value


def _positive(d: dict, key: str, where: str) -> int:
    value = _field(d, key, int, where)
    _expect(value > 0, f"{where}{key}", "expected a positive int")
    return value


def _strings(d: dict, key: str, where: str) -> tuple[str, ...]:
    values = _field(d, key, list, where)
    _expect(all(isinstance(v, str) for v in values), f"{where}{key}", "expected strings")
    return tuple(values)


def _bucket(d: dict, where: str) -> dict[str, int]:
    bucket = _map(d, "bucket", where)
    _expect(
        set(bucket) <= {"tokens", "requests"}
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in bucket.values()),
        f"{where}bucket",
        "expected positive tokens / requests",
    )
    return bucket


def _avals(d: dict, key: str, where: str) -> tuple:
    out = []
    for i, aval in enumerate(_field(d, key, list, where)):
        ok = (
            isinstance(aval, list)
            and len(aval) == 2
            and isinstance(aval[0], list)
            and all(isinstance(n, int) and n >= 0 for n in aval[0])
            and isinstance(aval[1], str)
        )
        _expect(ok, f"{where}{key}[{i}]", "expected [shape, dtype]")
        out.append((tuple(aval[0]), aval[1]))
    return tuple(out)


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
            f"aotlm (reads {FORMAT_VERSION}): upgrade aotlm, or rebuild the bundle with this one"
        )
    if version not in READABLE:
        known = f" ({CHANGELOG[version][1][:60]}...)" if version in CHANGELOG else ""
        raise BundleError(
            f"{MANIFEST_FILE}: format_version {version}{known} was written by aotlm {writer}; this "
            f"aotlm reads formats {', '.join(map(str, READABLE))}: rebuild the bundle with "
            "`aotlm build`"
        )


def _files(m: dict) -> dict[str, FileEntry]:
    out = {}
    for path, entry in _map(m, "files", "").items():
        where = f"files[{path!r}]"
        _expect(bool(path) and not path.startswith("/") and "\x00" not in path, where, "bad path")
        _expect(".." not in path.split("/") and "\\" not in path, where, "path escapes the bundle")
        _expect(isinstance(entry, dict), where, "expected a map")
        sha = entry.get("sha256")
        _expect(isinstance(sha, str) and len(sha) == 64, where, "bad sha256")
        size = entry.get("size")
        _expect(
            isinstance(size, int) and not isinstance(size, bool) and size >= 0, where, "bad size"
        )
        out[path] = FileEntry(sha, size)
    return out


def _functions(m: dict, files: dict) -> tuple[Function, ...]:
    out = []
    for i, fn in enumerate(_field(m, "functions", list, "")):
        where = f"functions[{i}]."
        _expect(isinstance(fn, dict), where[:-1], "expected a map")
        path = _field(fn, "file", str, where)
        _expect(path in files, f"{where}file", f"{path} is not listed in files")
        donate = _field(fn, "donate_argnums", list, where)
        _expect(all(isinstance(a, int) for a in donate), f"{where}donate_argnums", "expected ints")
        sharded = {k: fn[k] for k in ("nr_devices", "in_shardings", "out_shardings") if k in fn}
        out.append(
            Function(
                name=_field(fn, "name", str, where),
                bucket=_bucket(fn, where),
                file=path,
                donate_argnums=tuple(donate),
                in_avals=_avals(fn, "in_avals", where),
                out_avals=_avals(fn, "out_avals", where),
                shardings=sharded or None,
            )
        )
    return tuple(out)


def _compiled(m: dict, files: dict) -> dict[str, CompiledTarget]:
    """Each compiled target: a fingerprint and executables under compiled/, listed in files."""
    out = {}
    for target, entry in _map(m, "compiled", "").items():
        where = f"compiled[{target!r}]."
        _expect(isinstance(entry, dict), where[:-1], "expected a map")
        fp = _map(entry, "fingerprint", where)
        _field(fp, "platform", str, f"{where}fingerprint.")
        _field(fp, "device_count", int, f"{where}fingerprint.")
        execs = []
        for i, ex in enumerate(_field(entry, "executables", list, where)):
            at = f"{where}executables[{i}]."
            _expect(isinstance(ex, dict), at[:-1], "expected a map")
            path = _field(ex, "file", str, at)
            _expect(path.startswith(COMPILED_DIR), f"{at}file", f"{path} is not under compiled/")
            _expect(path in files, f"{at}file", f"{path} is not listed in files")
            memory = _field(ex, "memory", (dict, type(None)), at, None)
            execs.append(Executable(_field(ex, "name", str, at), _bucket(ex, at), path, memory))
        out[target] = CompiledTarget(fp, tuple(execs))
    return out


def _targets(m: dict) -> dict[str, TargetEntry]:
    out = {}
    for target, entry in _map(m, "targets", "").items():
        where = f"targets[{target!r}]."
        _expect(isinstance(entry, dict), where[:-1], "expected a map")
        out[target] = TargetEntry(
            _field(entry, "tier", str, where),
            _field(entry, "reason", str, where),
            _map(entry, "memory_plan", where),
        )
    return out


def _model(m: dict) -> ModelInfo:
    model = _map(m, "model", "")
    kind = _field(model, "kind", str, "model.")
    _expect(kind in MODEL_KINDS, "model.kind", f"expected one of {', '.join(MODEL_KINDS)}")
    return ModelInfo(
        kind=kind,
        architecture=_field(model, "architecture", str, "model."),
        config=_map(model, "config", "model."),
        pooling=_field(model, "pooling", str, "model.", None),
        normalize=_field(model, "normalize", bool, "model.", None),
    )


def _serving(m: dict, kind: str) -> Serving:
    s = _map(m, "serving", "")
    at = "serving."
    kv: dict[str, Any] = {}
    if kind == DECODER:
        kv = {k: _positive(s, k, at) for k in ("page_size", "kv_pages", "pages_per_seq")}
        kv["decode_steps"] = _positive(s, "decode_steps", at)
        kv["kv_cache_dtype"] = _field(s, "kv_cache_dtype", str, at, None)
        _expect(kv["kv_cache_dtype"] in (None, "fp8"), f"{at}kv_cache_dtype", "expected fp8")
        kv["kv_pages_dtype"] = _field(s, "kv_dtype", str, at, None)
        if kv["kv_pages_dtype"] is not None:  # format 12 on: as the graphs were built
            want = kv_dtype_name(_field(s, "dtype", str, at), kv["kv_cache_dtype"])
            _expect(kv["kv_pages_dtype"] == want, f"{at}kv_dtype", f"expected {want}")
        kv["lora"] = _lora(s, at) if "lora" in s else None
        a = _map(s, "attention", at)
        kv["attention"] = Attention(
            impl=_field(a, "impl", str, f"{at}attention."),
            kernel=_field(a, "kernel", str, f"{at}attention."),
            block_sizes=_map(a, "block_sizes", f"{at}attention."),
            cpu=_field(a, "cpu", str, f"{at}attention."),
            custom_calls=_strings(a, "custom_calls", f"{at}attention."),
        )
    tp = ep = 1
    if "mesh" in s:  # a sharded bundle; absent: one device
        mesh = _map(s, "mesh", at)
        tp = _field(mesh, "tp", int, f"{at}mesh.")
        ep = _field(mesh, "ep", int, f"{at}mesh.") if "ep" in mesh else 1
        _expect(tp >= 1 and ep >= 1 and tp * ep > 1, f"{at}mesh", "expected tp * ep > 1")
    return Serving(
        dtype=_field(s, "dtype", str, at),
        max_seq_len=_positive(s, "max_seq_len", at),
        targets=_strings(s, "targets", at),
        platforms=_strings(s, "platforms", at),
        tp=tp,
        ep=ep,
        **kv,
    )


def _lora(s: dict, at: str) -> dict:
    lora = _map(s, "lora", at)
    where = f"{at}lora."
    out = {k: _field(lora, k, int, where) for k in ("max_loras", "max_rank")}
    _expect(min(out.values()) >= 1, f"{at}lora", "expected positive max_loras and max_rank")
    return out | {"targets": list(_strings(lora, "targets", where))}


def _buckets(m: dict) -> Buckets:
    b = _map(m, "buckets", "")
    ladders = []
    for key in ("tokens", "requests"):
        ladder = _field(b, key, list, "buckets.")
        _expect(
            bool(ladder)
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in ladder)
            and ladder == sorted(set(ladder)),
            f"buckets.{key}",
            "expected increasing positive ints",
        )
        ladders.append(tuple(ladder))
    return Buckets(*ladders, plan=_field(b, "plan", dict, "buckets.", None))


def _decode(data: bytes) -> Any:
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
        return msgpack.unpackb(
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


def unpack_manifest(data: bytes) -> Manifest:
    """Decode and validate a manifest; any problem is a BundleError naming the field."""
    m = _decode(data)
    _expect(isinstance(m, dict), "top level", "expected a map")
    _check_version(m)
    versions = {
        k: _field(m, k, str, "") for k in ("aotlm_version", "jax_version", "jaxlib_version")
    }
    name = _field(m, "name", str, "")
    files = _files(m)
    model = _model(m)
    return Manifest(
        name=name,
        model=model,
        serving=_serving(m, model.kind),
        buckets=_buckets(m),
        functions=_functions(m, files),
        compiled=_compiled(m, files),
        targets=_targets(m),
        files=files,
        format_version=m["format_version"],
        weights=_field(m, "weights", dict, "", {}),
        quantization=_field(m, "quantization", dict, "", None),
        **versions,
    )
