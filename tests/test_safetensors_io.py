"""Our safetensors reader/writer: exact roundtrips, identical bytes, official-package compatibility,
and a CheckpointError (never a crash or a silent misread) for every malformed header."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from aotlm.errors import CheckpointError
from aotlm.safetensors_io import (
    SafetensorsFile,
    read_safetensors,
    serialize_safetensors,
    write_safetensors,
)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "w.bf16": rng.standard_normal((4, 2, 3)).astype(ml_dtypes.bfloat16),
        "w.f16": rng.standard_normal(7).astype(np.float16),
        "ids.i64": np.arange(5, dtype=np.int64),
        "ids.i32": np.arange(-3, 3, dtype=np.int32),
        "bytes.u8": np.arange(3, dtype=np.uint8),  # odd size: later tensors must stay aligned
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_roundtrip_including_bf16_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    write_safetensors(path, _tensors(), metadata={"format": "np", "k": "v"})
    _assert_same(read_safetensors(path), _tensors())
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "k": "v"}
        assert f.keys() == sorted(_tensors()) and "w.bf16" in f
        assert f.dtype("w.bf16") == np.dtype(ml_dtypes.bfloat16) and f.shape("w.bf16") == (4, 2, 3)
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            f.get("nope")


def test_same_tensors_same_bytes(tmp_path: Path) -> None:
    reordered = dict(reversed(list(_tensors().items())))
    assert serialize_safetensors(_tensors()) == serialize_safetensors(reordered)
    write_safetensors(tmp_path / "a", _tensors())
    write_safetensors(tmp_path / "b", reordered)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    data = (tmp_path / "a").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and data[8 + n - 1 : 8 + n] in (b" ", b"}")


def test_official_package_reads_our_files(tmp_path: Path) -> None:
    tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    write_safetensors(tmp_path / "np.safetensors", tensors)
    _assert_same(safetensors.numpy.load_file(tmp_path / "np.safetensors"), tensors)
    write_safetensors(tmp_path / "all.safetensors", _tensors())
    via_torch = safetensors.torch.load_file(tmp_path / "all.safetensors")
    bf16 = via_torch.pop("w.bf16")
    assert bf16.dtype == torch.bfloat16
    np.testing.assert_array_equal(bf16.float().numpy(), _tensors()["w.bf16"].astype(np.float32))
    _assert_same({k: v.numpy() for k, v in via_torch.items()}, tensors)


def test_we_read_official_files(tmp_path: Path) -> None:
    path = tmp_path / "official.safetensors"
    tensors = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    _assert_same(read_safetensors(path), tensors)
    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    safetensors.torch.save_file({"b": bf16}, tmp_path / "bf16.safetensors")
    ours = read_safetensors(tmp_path / "bf16.safetensors")["b"]
    np.testing.assert_array_equal(ours.astype(np.float32), bf16.float().numpy())


def _raw_file(tmp_path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize(
    ("header", "data", "length", "needle"),
    [
        (b"{}", b"", 1 << 40, "header length"),
        (b"{}", b"", 200 * 1024 * 1024, "header length"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b'{"a": 1, "a": 2}', b"", None, "duplicate key"),
        ({"a": _entry("F32", [2], [0, 8])}, b"\0" * 4, None, "truncated"),
        ({"a": _entry("F32", [2], [0, 16])}, b"\0" * 16, None, "needs 8"),
        ({"a": _entry("F32", [2], [8, 16])}, b"\0" * 16, None, "hole"),
        ({"a": _entry("F32", [2], [0, 8]), "b": _entry("F32", [1], [4, 8])}, b"\0" * 8, None,
         "overlaps"),
        ({"a": _entry("F32", [2], [0, 8])}, b"\0" * 12, None, "cover 8"),
        ({"a": _entry("Q4", [2], [0, 8])}, b"\0" * 8, None, "unknown dtype 'Q4'"),
        ({"a": _entry("F32", [-2], [0, 8])}, b"\0" * 8, None, "non-negative"),
        ({"a": _entry("F32", [2.0], [0, 8])}, b"\0" * 8, None, "non-negative"),
        ({"a": _entry("F32", [2], [8, 0])}, b"\0" * 8, None, "data_offsets"),
        ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "exactly the keys"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ],
    ids=[
        "length-past-eof", "length-over-100mb", "not-json", "not-object", "duplicate-key",
        "truncated", "shape-offset-mismatch", "hole", "overlap", "trailing-bytes", "bad-dtype",
        "negative-dim", "float-dim", "reversed-offsets", "missing-key", "bad-metadata",
    ],
)  # fmt: skip
def test_malformed_files_raise(tmp_path, header, data, length, needle) -> None:
    path = _raw_file(tmp_path, header, data, length)
    with pytest.raises(CheckpointError, match=needle) as err:
        read_safetensors(path)
    assert str(path) in str(err.value)


def test_too_short_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        read_safetensors(tmp_path / "short")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors(tmp_path / "absent")


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no safetensors name"):
        write_safetensors(tmp_path / "x", {"a": np.array(["s"])})
    with pytest.raises(CheckpointError, match="metadata"):
        write_safetensors(tmp_path / "x", {}, metadata={"a": 1})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="invalid safetensors tensor name"):
        write_safetensors(tmp_path / "x", {"__metadata__": np.zeros(1)})


def test_transformers_loads_a_checkpoint_we_rewrote(tmp_path: Path) -> None:
    from hf_factory import load_hf_model, make_hf_checkpoint

    ckpt = make_hf_checkpoint(tmp_path / "ckpt", "qwen2", num_layers=1)
    original = read_safetensors(ckpt / "model.safetensors")
    write_safetensors(ckpt / "model.safetensors", original)
    state = load_hf_model(ckpt).state_dict()
    for name, value in original.items():
        np.testing.assert_array_equal(state[name].numpy(), value, err_msg=name)
