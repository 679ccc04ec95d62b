"""A minimal, strict safetensors reader and writer over numpy.

Why our own: checkpoints and bundle weights come from outside, so the reader validates every header
field before it touches a byte of data (the same rules as the reference implementation: a JSON
object, known dtypes, shapes that match byte ranges, ranges that tile the data area with no holes
or overlaps). The writer is deterministic, so identical tensors give identical bytes and an
identical bundle digest. bfloat16 and float8 come from ``ml_dtypes`` (a jax dependency).

Format: ``u64 little-endian N`` | ``N bytes of JSON header, padded with spaces`` | data area.
Header: ``{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..],
"data_offsets": [begin, end]}}`` with offsets relative to the data area.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from aotlm.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 32
_METADATA_KEY = "__metadata__"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("bool"),
}
_NAMES_BY_DTYPE = {dt: name for name, dt in DTYPES.items()}


def _fail(path: str | os.PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: invalid safetensors file: {what}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Entry:
    """One validated header entry: dtype, shape and absolute byte range in the file."""

    __slots__ = ("dtype", "end", "shape", "start")

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


def _parse_header(path: str | os.PathLike, raw: bytes, data_start: int, file_size: int):
    """Validate a header; returns (entries by name, metadata). Raises CheckpointError."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"header is not valid JSON ({e})") from None
    except RecursionError:
        raise _fail(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"{where}: needs exactly the keys dtype, shape, data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise _fail(path, f"{where}: unknown dtype {info['dtype']!r}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _fail(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        # Exact Python ints: a product that wraps around int64 must not pass as 0 bytes. numpy
        # refuses an array whose non-zero dims overflow int64 even when it is empty.
        if len(shape) > MAX_DIMS or math.prod(max(d, 1) for d in shape) * dtype.itemsize >= 2**63:
            raise _fail(path, f"{where}: shape {shape} is too large for any array")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _fail(path, f"{where}: data_offsets must be [begin, end] ints, got {offsets!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _fail(
                path,
                f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes but "
                f"{info['dtype']}{shape} needs {nbytes}",
            )
        entries[name] = _Entry(
            dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]
        )
    # The ranges must tile the data area exactly: no overlaps, no holes, nothing past the end.
    cursor = data_start
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if entry.start != cursor:
            what = "overlaps the previous tensor" if entry.start < cursor else "leaves a hole"
            raise _fail(
                path, f"tensor {name!r} {what} (data_offsets start {entry.start - data_start})"
            )
        cursor = entry.end
    if cursor != file_size:
        raise _fail(
            path,
            f"data area is {file_size - data_start} bytes but tensors cover {cursor - data_start}"
            + (" (truncated file?)" if cursor > file_size else ""),
        )
    return entries, dict(metadata or {})


class SafetensorsFile:
    """A validated safetensors file whose tensors are read lazily through a read-only mmap.

    >>> with SafetensorsFile("model.safetensors") as f:
    ...     w = f.get("model.embed_tokens.weight")   # read-only view; copy to keep past close()
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            file_size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                prefix = fh.read(8)
                if len(prefix) < 8:
                    raise _fail(path, f"file is {file_size} bytes, too short for a header")
                (n,) = struct.unpack("<Q", prefix)
                if n > MAX_HEADER_BYTES or 8 + n > file_size:
                    raise _fail(path, f"header length {n} is larger than the file or 100 MB")
                raw = fh.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
        self._entries, self.metadata = _parse_header(path, raw, 8 + n, file_size)
        self._map: np.memmap | None = None
        if file_size > 8 + n:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view of the mapped file (no copy)."""
        e = self._entry(name)
        if e.start == e.end:
            return np.zeros(e.shape, e.dtype)
        assert self._map is not None
        return self._map[e.start : e.end].view(e.dtype).reshape(e.shape)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        """Drop this object's mapping (views already handed out keep theirs alive)."""
        self._map = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate a whole file into owned numpy arrays, by name."""
    with SafetensorsFile(path) as f:
        return {name: np.array(f.get(name)) for name in f}


def serialize_safetensors(
    tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> bytes:
    """Deterministic safetensors bytes: sorted compact JSON header padded with spaces to 8 bytes,
    data laid out by decreasing itemsize then name (so every tensor is naturally aligned)."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError("safetensors metadata must map strings to strings")
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise CheckpointError(f"invalid safetensors tensor name {name!r}")
        arr = np.asarray(value)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if dtype not in _NAMES_BY_DTYPE:
            raise CheckpointError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
        arrays[name] = np.asarray(arr, dtype=dtype, order="C")  # keeps 0-d shapes
    header: dict[str, Any] = {}
    if metadata:
        header[_METADATA_KEY] = dict(metadata)
    order = sorted(arrays, key=lambda k: (-arrays[k].dtype.itemsize, k))
    offset = 0
    for name in order:
        arr = arrays[name]
        header[name] = {
            "dtype": _NAMES_BY_DTYPE[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return b"".join([struct.pack("<Q", len(raw)), raw] + [arrays[k].tobytes() for k in order])


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` atomically (temp file + rename); same tensors, same bytes."""
    data = serialize_safetensors(tensors, metadata)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
