"""Targets: the compiled tier, its fingerprint and trust checks, the build cache, the memory plan."""

from __future__ import annotations

import logging
import pickle
import re
import shutil
from pathlib import Path

import pytest
from bundle_factory import build_from_yaml, write_model_yaml
from click.testing import CliRunner

from aotlm.build.bundle import build_bundle
from aotlm.build.model_yaml import load_build_config
from aotlm.build.targets import Target, plan_target
from aotlm.bundle import read_manifest
from aotlm.bundle.digest import sha256_bytes
from aotlm.bundle.format import DIGEST_FILE, FORMAT_VERSION, MANIFEST_FILE
from aotlm.bundle.manifest import pack_manifest
from aotlm.cli import main
from aotlm.errors import BundleError, ConfigError
from aotlm.runtime.generation.engine import Engine
from aotlm.runtime.generation.sampling_params import SamplingParams
from aotlm.runtime.load import loader
from aotlm.runtime.load.compile_guard import CompileCounter
from aotlm.runtime.load.loader import load_bundle
from aotlm.runtime.load.trust import TrustPolicy

PROMPTS = ["The compiler reads the program", "Rain"]
SMALL = {"tokens": [16], "requests": [1, 2], "page_size": 16}


@pytest.fixture(scope="module")
def small_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """A 4-function bundle: falling back to StableHLO compiles little, so the tests stay fast."""
    tmp = tmp_path_factory.mktemp("small")
    out = tmp / "bundle"
    build_from_yaml(write_model_yaml(tmp, tiny_checkpoint, buckets=SMALL), out)
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _rewrite_manifest(bundle: Path, edit) -> None:
    m = read_manifest(bundle)[0].to_dict()
    edit(m)
    packed = pack_manifest(m)
    (bundle / MANIFEST_FILE).write_bytes(packed)
    (bundle / DIGEST_FILE).write_text(sha256_bytes(packed) + "\n")


def _load(path: Path, **kwargs):
    counter = CompileCounter()
    loaded = load_bundle(path, counter=counter, **kwargs)
    return loaded, counter


def _tokens(loaded) -> list[tuple[int, ...]]:
    loaded.counter.seal()
    engine = Engine(loaded, strict=True)
    out = []
    for params in (
        SamplingParams(temperature=0.0, max_tokens=8),
        SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=8),
    ):
        out += [c.token_ids for (c,) in engine.generate(PROMPTS, params)]
    assert engine.compiles_after_ready == 0
    return out


def _forbid_unpickling(monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("a serialized executable was unpickled")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(loader, "load_compiled", boom)


def test_build_records_tier_fingerprint_and_files(tiny_bundle):
    path, _ = tiny_bundle
    m, _ = read_manifest(path)
    assert m.format_version == FORMAT_VERSION
    assert m.targets["cpu"].tier == "compiled"
    fp = m.compiled["cpu"].fingerprint
    assert fp["platform"] == "cpu" and fp["device_count"] >= 1 and fp["jax"]
    execs = m.compiled["cpu"].executables
    assert len(execs) == len(m.functions) == 24  # 21 + decode[R] for 3 request buckets
    for e in execs:
        assert e.file.startswith("compiled/cpu/") and e.file.endswith(".bin")
        assert e.file in m.files and (path / e.file).is_file()
        assert set(e.memory) == {"argument", "output", "alias", "temp", "code"}
    plan = m.targets["cpu"].memory_plan
    assert plan["weights_bytes"] > 0 and plan["kv_pool_bytes"] > 0
    assert plan["total_bytes"] >= plan["weights_bytes"] + plan["kv_pool_bytes"]
    assert plan["peak_step"].startswith("compiled/cpu/forward_")


def test_compiled_tier_loads_without_compiling_and_matches_stablehlo(small_bundle):
    compiled, counter = _load(small_bundle)
    assert compiled.timings["tier"] == "compiled" and compiled.tier == "compiled"
    assert counter.before_seal == 0, "loading the compiled tier must not compile anything"
    portable, counter2 = _load(small_bundle, trust=TrustPolicy("never"))
    assert portable.timings["tier"] == "stablehlo"
    assert counter2.before_seal == len(portable.executables)
    assert _tokens(compiled) == _tokens(portable)
    counter.close()
    counter2.close()


def test_fingerprint_mismatch_falls_back_to_stablehlo_with_a_message(
    small_bundle, tmp_path, monkeypatch, caplog
):
    b = _copy(small_bundle, tmp_path)

    def edit(m):
        m["compiled"]["cpu"]["fingerprint"]["device_kind"] = "some other cpu"

    _rewrite_manifest(b, edit)
    _forbid_unpickling(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="aotlm.runtime.load.loader"):
        loaded, counter = _load(b)
    assert loaded.tier == "stablehlo"
    assert "fingerprint of target cpu does not match" in loaded.timings["tier_reason"]
    assert "device_kind: built with 'some other cpu'" in caplog.text
    assert counter.before_seal == len(loaded.executables)
    counter.close()


def test_tampered_executable_is_refused_before_deserialization(tiny_bundle, tmp_path, monkeypatch):
    b = _copy(tiny_bundle[0], tmp_path)
    target = b / "compiled/cpu/forward_t16.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    _forbid_unpickling(monkeypatch)
    counter = CompileCounter()
    with pytest.raises(BundleError, match=r"compiled/cpu/forward_t16\.bin: sha256 .* rebuild"):
        load_bundle(b, counter=counter)
    assert counter.before_seal == 0
    counter.close()


def test_trust_policy_never_never_unpickles(small_bundle, monkeypatch):
    _forbid_unpickling(monkeypatch)
    loaded, counter = _load(small_bundle, trust=TrustPolicy("never"))
    assert loaded.tier == "stablehlo" and "allow_pickle=never" in loaded.timings["tier_reason"]
    counter.close()


def test_a_bundle_built_elsewhere_is_not_trusted_by_default(small_bundle, tmp_path, monkeypatch):
    _forbid_unpickling(monkeypatch)
    elsewhere = TrustPolicy("local", cache_dir=tmp_path / "other-machine")
    loaded, counter = _load(small_bundle, trust=elsewhere)
    assert loaded.tier == "stablehlo"
    assert "was not built on this machine" in loaded.timings["tier_reason"]
    signed, counter2 = _load(small_bundle, trust=TrustPolicy("trusted-signed"))
    assert (
        signed.tier == "stablehlo"
        and "not signed by a trusted key" in signed.timings["tier_reason"]
    )
    counter.close()
    counter2.close()
    with pytest.raises(ValueError, match="allow_pickle"):
        TrustPolicy("always")


def test_a_bundle_signed_by_a_trusted_key_loads_its_executables_elsewhere(small_bundle, tmp_path):
    from aotlm.registry import generate_keypair, sign_bundle
    from aotlm.registry.signing import load_private_key

    b = _copy(small_bundle, tmp_path)
    key_path, pub_path, _ = generate_keypair(tmp_path / "keys" / "ci")
    _, other_pub, _ = generate_keypair(tmp_path / "other" / "someone")
    sign_bundle(b, load_private_key(key_path.read_bytes(), str(key_path)))
    elsewhere = tmp_path / "other-machine"
    trusted, c1 = _load(b, trust=TrustPolicy("trusted-signed", elsewhere, trusted_keys=pub_path))
    local_or_signed, c2 = _load(b, trust=TrustPolicy("local", elsewhere, trusted_keys=pub_path))
    untrusted, c3 = _load(b, trust=TrustPolicy("trusted-signed", elsewhere, trusted_keys=other_pub))
    assert trusted.tier == "compiled" and local_or_signed.tier == "compiled"
    assert untrusted.tier == "stablehlo"
    for c in (c1, c2, c3):
        c.close()


def test_a_bundle_without_a_compiled_tier_loads_as_stablehlo(small_bundle, tmp_path):
    b = _copy(small_bundle, tmp_path)

    def edit(m):
        m["compiled"] = {}

    _rewrite_manifest(b, edit)
    loaded, counter = _load(b)
    assert loaded.tier == "stablehlo" and "no compiled executables" in loaded.timings["tier_reason"]
    counter.close()


def test_rebuild_hits_the_cache_and_one_changed_bucket_rebuilds_only_it(
    tiny_checkpoint, tiny_yaml, tiny_bundle, tmp_path
):
    counter = CompileCounter()
    again = build_from_yaml(tiny_yaml, tmp_path / "again")
    assert (again.exported, again.compiled, counter.before_seal) == (0, 0, 0)
    assert again.cached == 2 * 24 and again.digest == tiny_bundle[1].digest
    counter.close()
    # tokens [16, 32, 64] -> [16, 32, 48]: forward t48 and logits t48 x 3 request buckets are new
    buckets = {"tokens": [16, 32, 48], "requests": [1, 2, 4], "page_size": 16}
    changed = write_model_yaml(tmp_path / "changed", tiny_checkpoint, buckets=buckets)
    result = build_from_yaml(changed, tmp_path / "changed-bundle")
    assert (result.exported, result.compiled) == (4, 4)


def test_memory_plan_over_memory_gib_fails_the_build(tiny_checkpoint, tmp_path):
    tiny = write_model_yaml(tmp_path / "tiny", tiny_checkpoint, memory_gib=0.001)
    with pytest.raises(ConfigError, match=r"memory plan for target cpu: needs .* shrink kv_pages"):
        build_from_yaml(tiny, tmp_path / "never-written")
    assert not (tmp_path / "never-written").exists()
    # weights + KV fit, the largest step's temporaries do not: found once compiled
    fits = load_build_config(write_model_yaml(tmp_path / "fits", tiny_checkpoint))
    plan = build_bundle(fits, tmp_path / "ok").targets["cpu"]["memory_plan"]
    resident = plan["weights_bytes"] + plan["kv_pool_bytes"]
    gib = (resident + plan["peak_step_bytes"] // 2) / (1 << 30)
    tight = write_model_yaml(tmp_path / "tight", tiny_checkpoint, memory_gib=gib)
    with pytest.raises(ConfigError, match=re.escape(f"largest step {plan['peak_step']}")):
        build_from_yaml(tight, tmp_path / "too-tight")


def test_cli_build_and_inspect_show_tiers_and_memory(tiny_yaml, tiny_bundle, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["build", str(tiny_yaml), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "cpu     compiled" in result.output
    assert "exported 0, compiled 0, from cache 48" in result.output
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0, shown.output
    assert (
        "memory    cpu: weights" in shown.output and "compiled  cpu: platform=cpu" in shown.output
    )
    portable = CliRunner().invoke(
        main, ["build", str(tiny_yaml), "-o", str(tmp_path / "p"), "--stablehlo-only", "--json"]
    )
    assert '"tier": "stablehlo"' in portable.output
    assert not (tmp_path / "p" / "compiled").exists()


def test_stablehlo_only_builds_are_reproducible_without_the_cache(tiny_yaml, tmp_path):
    cfg = load_build_config(tiny_yaml)
    a = build_bundle(cfg, tmp_path / "a", use_cache=False, compile_targets=False)
    b = build_bundle(cfg, tmp_path / "b", use_cache=False, compile_targets=False, jobs=2)
    assert a.digest == b.digest and a.exported == 24 and a.compiled == 0


def test_a_target_without_a_compiler_here_is_stablehlo_with_a_reason():
    assert plan_target(Target.parse("cuda")).tier == "stablehlo"
    assert "no cuda device" in plan_target(Target.parse("cuda")).reason


def _libtpu_missing() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(
    not _libtpu_missing(), reason="libtpu is installed: the deviceless test below runs instead"
)
def test_tpu_target_without_libtpu_says_to_install_the_extra():
    plan = plan_target(Target.parse("tpu:v5e:2x2"))
    assert plan.tier == "stablehlo" and "`tpu` extra" in plan.reason


@pytest.mark.skipif(
    _libtpu_missing(),
    reason="libtpu is not importable: install the `tpu` extra (pip install 'aotlm[tpu]') "
    "to compile TPU targets without a TPU",
)
def test_tpu_v5e_target_compiles_deviceless(tiny_checkpoint, tmp_path):
    spec = write_model_yaml(tmp_path, tiny_checkpoint, targets=["cpu", "tpu:v5e:2x2"])
    result = build_from_yaml(spec, tmp_path / "tpu")
    m = read_manifest(tmp_path / "tpu")[0].to_dict()
    assert result.targets["tpu:v5e:2x2"]["tier"] == "compiled"
    fp = m["compiled"]["tpu:v5e:2x2"]["fingerprint"]
    assert (fp["platform"], fp["device_count"], fp["topology"]) == ("tpu", 4, "2x2x1")
    assert fp["libtpu"] and fp["device_kind"].startswith("TPU v5")
    files = [e["file"] for e in m["compiled"]["tpu:v5e:2x2"]["executables"]]
    assert files and all(f.startswith("compiled/tpu-v5e-2x2/") and f in m["files"] for f in files)
    assert m["targets"]["tpu:v5e:2x2"]["memory_plan"]["limit_bytes"] == 16 << 30
