"""Hostile input to every parser that reads outside data: property-based (hypothesis) and by
hand-made bombs. Each parser may refuse, but only with its own typed error and a message that
says what is wrong: model.yaml -> ConfigError, manifest.msgpack / bundle files -> BundleError,
safetensors -> CheckpointError, chat messages -> RequestError. Never another exception, never a
hang, never a huge allocation."""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from aotlm.build.model_yaml import load_build_config, parse_build_config
from aotlm.bundle import open_bundle
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.bundle.manifest_read import unpack_manifest
from aotlm.errors import BundleError, CheckpointError, ConfigError, RequestError
from aotlm.runtime.http.chat import render_chat
from aotlm.safetensors_io import SafetensorsFile, serialize_safetensors
from aotlm.tiny import CHAT_TEMPLATE

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)


def nested(leaves: st.SearchStrategy, keys: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
        max_leaves=25,
    )


# ---- model.yaml -------------------------------------------------------------------------------

CONFIG_KEYS = st.sampled_from(
    [
        "model",
        "name",
        "dtype",
        "max_seq_len",
        "buckets",
        "kv_pages",
        "targets",
        "memory_gib",
        "decode_steps",
        "tokens",
        "requests",
        "page_size",
        "pow2",
        "step",
        "min",
        "max",
        "gap",
        "plan",
    ]
) | st.text(max_size=8)


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-yaml")


def _config_values(checkpoint: Path) -> st.SearchStrategy:
    good = {
        "model": st.just(str(checkpoint)),
        "dtype": st.sampled_from(["float32", "bfloat16"]),
        "max_seq_len": st.integers(-4, 300),
        "buckets": nested(scalars | st.integers(0, 300), CONFIG_KEYS),
    }
    anything = nested(scalars, CONFIG_KEYS)
    return st.fixed_dictionaries(
        {},
        optional={k: v | anything for k, v in good.items()}
        | {k: anything for k in ("name", "kv_pages", "targets", "memory_gib", "extra")},
    )


@given(data=st.data())
@FAST
def test_random_config_structures_raise_only_config_error(tiny_checkpoint, spec_dir, data):
    doc = data.draw(_config_values(tiny_checkpoint) | nested(scalars, CONFIG_KEYS))
    try:
        parse_build_config(doc, spec_dir / "model.yaml")
    except ConfigError as e:
        assert str(e).startswith("model.yaml") or "model.yaml" in str(e)


YAML_TEXT = st.text(alphabet="ab1:-[]{},&*!|>'\"#?% \n\t.", max_size=120)


@given(text=YAML_TEXT)
@FAST
@example(text="[" * 5000)  # deeper than the YAML parser's recursion
@example(text="a: &a [*a]")  # an alias that contains itself
@example(text="!!python/object/apply:os.system ['true']")  # never executed: safe_load
def test_random_yaml_text_raises_only_config_error(spec_dir, text):
    path = spec_dir / "random.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"random\.yaml"):
        load_build_config(path)


def test_a_yaml_alias_bomb_is_refused_at_once(spec_dir, tiny_checkpoint):
    """9 levels of 9 aliases: 9^9 strings if expanded (repr in an error would take minutes)."""
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = spec_dir / "bomb.yaml"
    path.write_text(
        f"model: {tiny_checkpoint}\nmax_seq_len: 128\nbuckets: {{}}\ndtype: [{', '.join(levels)}]\n"
    )
    with pytest.raises(ConfigError, match="expands to more than"):
        load_build_config(path)


# ---- manifest.msgpack -------------------------------------------------------------------------


@given(data=st.binary(max_size=300))
@FAST
@example(data=b"\xdd\xff\xff\xff\xff")  # an array that claims 4 billion items
@example(data=b"\xdf\xff\xff\xff\xff")  # a map that claims 4 billion pairs
@example(data=b"\xdb\xff\xff\xff\xff")  # a 4 GiB string
@example(data=b"\xc6\xff\xff\xff\xff")  # a 4 GiB binary
@example(data=b"\x91" * 100_000 + b"\xc0")  # 100k nested arrays
@example(data=b"\x81\xc0\x01")  # a nil map key
def test_random_bytes_are_refused_as_bundle_error(data):
    with pytest.raises(BundleError, match=r"manifest\.msgpack"):
        unpack_manifest(data)


def test_a_msgpack_bomb_stops_before_it_expands():
    """One byte per empty array: 8M of them would be ~600 MB of lists."""
    bomb = b"\xdd" + struct.pack(">I", 8_000_000) + b"\x90" * 8_000_000
    with pytest.raises(BundleError, match="maps and arrays"):
        unpack_manifest(bomb)


@pytest.fixture(scope="module")
def real_manifest(tiny_bundle) -> dict:
    return msgpack.unpackb((tiny_bundle[0] / MANIFEST_FILE).read_bytes(), raw=False)


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


def _mutate(manifest: dict, path: tuple, value, delete: bool) -> dict:
    doc = msgpack.unpackb(msgpack.packb(manifest), raw=False)  # a deep copy
    if not path:
        return value
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


MSGPACK_VALUES = nested(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=10),
    st.text(max_size=8),
)


@given(data=st.data())
@FAST
def test_mutated_manifests_raise_only_bundle_error(real_manifest, data):
    paths = list(_paths(real_manifest))
    path = data.draw(st.sampled_from(paths))
    doc = _mutate(real_manifest, path, data.draw(MSGPACK_VALUES), data.draw(st.booleans()))
    try:
        unpack_manifest(msgpack.packb(doc, use_bin_type=True))
    except BundleError as e:
        assert "manifest.msgpack" in str(e)


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-bundle") / "b"
    shutil.copytree(tiny_bundle[0], out)
    return out


def _rewrite(bundle: Path, manifest: dict) -> None:
    """A tampered manifest with a matching digest: what a local attacker could write."""
    packed = pack_manifest(manifest)
    (bundle / MANIFEST_FILE).write_bytes(packed)
    (bundle / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_and_redigested_bundles_raise_only_bundle_error(bundle_copy, real_manifest, data):
    paths = [p for p in _paths(real_manifest) if p[:1] in (("files",), ("functions",))]
    path = data.draw(st.sampled_from(paths))
    _rewrite(bundle_copy, _mutate(real_manifest, path, data.draw(MSGPACK_VALUES), False))
    with contextlib.suppress(BundleError):
        open_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("../outside.bin", "escapes the bundle"),
        ("weights/../../outside.bin", "escapes the bundle"),
        ("/etc/passwd", "bad path"),
        ("tokenizer\\..\\..\\x", "escapes the bundle"),
        ("nul\x00byte", "bad path"),
    ],
)
def test_paths_that_leave_the_bundle_are_refused(bundle_copy, real_manifest, rel, message):
    manifest = _mutate(real_manifest, ("files",), {**real_manifest["files"]}, False)
    manifest["files"][rel] = {"sha256": "0" * 64, "size": 0}
    _rewrite(bundle_copy, manifest)
    with pytest.raises(BundleError, match=message):
        open_bundle(bundle_copy)


def test_a_symlinked_directory_inside_the_bundle_is_refused(tiny_bundle, tmp_path):
    """tokenizer/ replaced by a link to a copy elsewhere: same bytes, but outside the bundle."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle[0], bundle)
    shutil.move(bundle / "tokenizer", tmp_path / "elsewhere")
    (bundle / "tokenizer").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="outside the bundle through a symbolic link"):
        open_bundle(bundle)


# ---- safetensors ------------------------------------------------------------------------------

DTYPE_NAMES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9"])
DIMS = st.integers(0, 6) | st.integers(0, 2**64) | st.just(2**32)


def _entries() -> st.SearchStrategy:
    entry = st.fixed_dictionaries(
        {
            "dtype": DTYPE_NAMES | scalars,
            "shape": st.lists(DIMS, max_size=4) | scalars,
            "data_offsets": st.lists(st.integers(-2, 80) | st.integers(0, 2**64), max_size=3)
            | scalars,
        }
    )
    return st.dictionaries(
        st.text(max_size=6), entry | nested(scalars, st.text(max_size=4)), max_size=4
    )


def _write_safetensors(path: Path, raw: bytes, data: bytes, declared: int | None = None) -> None:
    n = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", n) + raw + data)


@given(header=_entries(), data_len=st.integers(0, 96))
@FAST
def test_random_safetensors_headers_raise_only_checkpoint_error(spec_dir, header, data_len):
    path = spec_dir / "random.safetensors"
    _write_safetensors(path, json.dumps(header).encode(), bytes(data_len))
    try:
        with SafetensorsFile(path) as f:
            for name in f:  # what validated must also read, at the declared shape
                assert f.get(name).shape == f.shape(name)
    except CheckpointError as e:
        assert "random.safetensors" in str(e)


@given(blob=st.binary(max_size=200))
@FAST
def test_random_safetensors_bytes_raise_only_checkpoint_error(spec_dir, blob):
    path = spec_dir / "bytes.safetensors"
    path.write_bytes(blob)
    try:
        SafetensorsFile(path).close()  # a few short blobs are valid (empty) files
    except CheckpointError as e:
        assert "bytes.safetensors" in str(e)


@pytest.mark.parametrize(
    ("header", "data", "declared", "message"),
    [
        (b"{}", b"", 2**63, "header length"),  # oversized: never allocated
        (b"{}", b"", 200, "header length"),  # longer than the file: truncated
        (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', bytes(8), None, "truncated"),
        (b"[" * 100_000 + b"]" * 100_000, b"", None, "nested too deeply"),
        (
            b'{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,0]}}',
            b"",
            None,
            "too large",
        ),
        # 2^32 x 2^32 bytes wraps int64 to 0: must not pass as an empty tensor
        (
            b'{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}',
            b"",
            None,
            "too large",
        ),
        (
            b'{"a":{"dtype":"U8","shape":[0,9223372036854775808],"data_offsets":[0,0]}}',
            b"",
            None,
            "too large",
        ),
        (
            b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
            b"\x00",
            None,
            "duplicate",
        ),
        (b"\xff\xfe", b"", None, "not valid JSON"),
    ],
)
def test_malformed_safetensors_are_refused_clearly(tmp_path, header, data, declared, message):
    path = tmp_path / "m.safetensors"
    _write_safetensors(path, header, data, declared)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(path)


@given(cut=st.integers(0, 200))
@FAST
def test_every_truncation_of_a_real_file_is_refused(spec_dir, cut):
    import numpy as np

    blob = serialize_safetensors({"w": np.arange(12, dtype=np.float32), "b": np.ones(3, np.int8)})
    path = spec_dir / "cut.safetensors"
    path.write_bytes(blob[: min(cut, len(blob) - 1)])
    with pytest.raises(CheckpointError):
        SafetensorsFile(path)


# ---- chat templates ---------------------------------------------------------------------------


class _Tok:
    def __init__(self, template: str = CHAT_TEMPLATE) -> None:
        self.config = {"bos_token": "<s>", "eos_token": "</s>"}
        self.chat_template = template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]


MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls"]) | st.text(max_size=5),
    nested(scalars, st.text(max_size=5)),
    max_size=4,
)


@given(messages=st.lists(MESSAGE, max_size=4))
@FAST
def test_random_chat_messages_raise_only_request_error(messages):
    with contextlib.suppress(RequestError):
        assert isinstance(render_chat(_Tok(), messages), str)


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic sandbox escape
        "{{ messages.append(1) }}",  # mutation of the caller's objects
        "{% for i in range(10**9) %}{% endfor %}",  # jinja2's sandbox caps range()
        "{{ messages[0]['content'] | tojson }}",
        "{{ messages[0]['extra'] | tojson }}",  # 900 levels deep
        "{{ 1 / 0 }}",
        "{{ 10 ** 10 ** 10 > 0 }}",
        "{{ ({} | dictsort)[5] }}",
    ],
)
def test_hostile_templates_are_contained(template):
    deep: object = "x"
    for _ in range(900):  # as deep as JSON lets a client nest
        deep = [deep]
    msgs = [{"role": "user", "content": "hi", "extra": deep}]
    try:
        out = render_chat(_Tok(template), msgs)
    except RequestError:
        return
    assert "subclasses" not in out and len(msgs) == 1


# ---- registry documents (from the network) -----------------------------------------------------


def _oci_manifest() -> dict:
    from aotlm.registry.artifact import (
        ARTIFACT_TYPE,
        CONFIG_TYPE,
        FILE_LAYER,
        MANIFEST_LAYER,
        TITLE,
        descriptor,
    )

    layer = lambda mt, title: descriptor(mt, "sha256:" + "a" * 64, 10, **{TITLE: title})  # noqa: E731
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE,
        "config": descriptor(CONFIG_TYPE, "sha256:" + "b" * 64, 2),
        "layers": [
            layer(MANIFEST_LAYER, MANIFEST_FILE),
            layer(MANIFEST_LAYER, DIGEST_FILE),
            layer(FILE_LAYER, "weights/model.safetensors"),
        ],
        "annotations": {"aotlm.bundle.digest": "sha256:" + "c" * 64},
    }


JSON_VALUES = nested(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.text(max_size=12), st.text(max_size=8)
)


@given(data=st.data())
@FAST
@example(data=None)
def test_random_oci_manifests_raise_only_registry_error(data):
    from aotlm.registry.artifact import ARTIFACT_TYPE, bundle_layers, parse_manifest
    from aotlm.registry.errors import RegistryError

    if data is None:  # deeper than the JSON parser's recursion
        raw = b"[" * 100_000 + b"]" * 100_000
    else:
        good = _oci_manifest()
        path = data.draw(st.sampled_from(list(_paths(good))))
        doc = _mutate(good, path, data.draw(JSON_VALUES), data.draw(st.booleans()))
        raw = json.dumps(doc).encode()
    try:
        bundle_layers(parse_manifest(raw, ARTIFACT_TYPE))
    except RegistryError as e:
        assert "OCI manifest" in str(e) or "layer path" in str(e)


@given(doc=st.binary(max_size=80) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
@FAST
@example(doc=b"[" * 50_000)
@example(doc=b'{"keyid": "abcdabcdabcdabcd", "signature": 5}')
def test_random_signature_documents_are_reported_broken_never_raised(doc):
    from aotlm.registry.signing import check_signatures

    check = check_signatures("0" * 64, "tiny", {"abcdabcdabcdabcd": doc}, {})
    assert check.good is None and check.broken


@given(index=JSON_VALUES | st.binary(max_size=40))
@FAST
@example(index={"manifests": [{"annotations": "x", "digest": "sha256:00"}]})
@example(index={"manifests": [5]})
@example(index={"manifests": [{"digest": "sha256:../../etc/passwd"}]})
@example(index=b"[" * 50_000)
def test_a_damaged_oci_layout_index_raises_only_registry_error(spec_dir, index):
    """A directory registry travels on removable media: its index.json may hold anything."""
    from aotlm.registry.errors import RegistryError
    from aotlm.registry.layout_store import LayoutStore

    root = spec_dir / "layout"
    root.mkdir(exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    (root / "index.json").write_bytes(raw)
    with contextlib.suppress(RegistryError):
        assert LayoutStore(root).find_manifest("main") is None
