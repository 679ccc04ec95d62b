"""benchmarks/serve.py end to end on the shared tiny bundle: the harness the throughput figures
come from runs, and its sides did the same work (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_serve_benchmark_runs_every_side_on_the_same_requests(
    tiny_bundle, tiny_checkpoint, tmp_path
):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/serve.py"), "--bundle", str(tiny_bundle[0])]
    cmd += ["--checkpoint", str(tiny_checkpoint), "--requests", "4", "--passes", "2"]
    cmd += ["--prefix-requests", "3", "--concurrency", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    summary = report["summary"]
    assert summary["compiles_after_ready"] == 0
    workloads = report["workloads"]
    assert set(workloads) == {"mixed", "mixed#2", "prefix-cold", "prefix-shared"}
    assert summary["exact_lengths"] == "14/14"  # 4 + 4 + 3 + 3: every request its max_tokens
    # transformers ran each mixed pass right after the server, on the same requests
    passes = report["transformers"]["passes"]
    assert [p["useful_output_tokens"] for p in passes] == [
        workloads[n]["output_tokens"] for n in ("mixed", "mixed#2")
    ]
    assert len(summary["ratio_per_pass"]) == 2 and all(r > 0 for r in summary["ratio_per_pass"])
    # greedy is batch-invariant: the server streamed what the engine alone generates
    served = report["agreement"]["served_vs_offline_text"]
    assert served["identical"] == served["requests"] == 4
    # the shared prefix was served from the cache once its first request computed it
    assert summary["prefix_hits_cold"] == 0 and summary["prefix_hits_shared"] > 0
    assert "aotlm / transformers (mixed, output tok/s)" in proc.stdout


def test_startup_benchmark_runs_every_mode_on_the_tiny_model(tmp_path):
    """benchmarks/startup.py --models tiny: builds, then starts each way a server can (jit cold,
    jit with the persistent cache, bundle StableHLO, bundle compiled, the read-bytes floor)."""
    out = tmp_path / "startup.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/startup.py"),
        "--models",
        "tiny",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = json.loads(out.read_text(encoding="utf-8"))["models"]["tiny"]
    ready, build = tiny["ready"], tiny["build"]
    graphs = build["jobs1"]["exported"]
    assert graphs > 0 and build["rebuild"]["exported"] == build["rebuild"]["compiled"] == 0
    # the jit baseline compiles every graph at start; the compiled bundle compiles none
    assert ready["jit"]["compiles"] == ready["stablehlo"]["compiles"] == graphs
    assert ready["compiled"]["compiles"] == 0 and ready["compiled"]["timings"]["tier"] == "compiled"
    assert "bundle compiled" in proc.stdout


def test_structured_benchmark_runs_every_mix(tiny_bundle, tmp_path):
    """benchmarks/structured.py at a tiny size: 0/50/100% grammar rows on the same requests,
    every grammar row's output parses, nothing compiled."""
    out = tmp_path / "structured.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/structured.py"), "--bundle", str(tiny_bundle[0])]
    cmd += ["--requests", "4", "--max-tokens", "48", "--passes", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["compiles_after_ready"] == 0
    mixes = [(s["grammar_share"], s["decode_steps"]) for s in report["summary"]]
    assert mixes == [(0.0, 4), (0.0, 1), (0.5, 4), (1.0, 4)]  # the shared bundle: decode_steps 4
    finished = [r["valid_json"] + r["cut_by_max_tokens"] for r in report["runs"]]
    assert finished == [0, 0, 2, 4] and sum(r["valid_json"] for r in report["runs"]) > 0
    assert report["runs"][1]["mask_fills"] == 0 < report["runs"][2]["mask_fills"]
    assert report["summary"][0]["ratio_vs_free"] == 1.0
    assert "vs free" in proc.stdout


def test_moe_benchmark_compares_moe_with_dense_and_the_expert_kernels(tmp_path):
    """benchmarks/moe.py at a tiny size: both models served on the same requests with equal
    active parameters (within the router's), every expert path timed at both token counts."""
    out = tmp_path / "moe.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/moe.py"), "--out", str(out)]
    cmd += ["--hidden", "128", "--layers", "2", "--experts", "8", "--top-k", "2"]
    cmd += ["--expert-size", "64", "--batch", "4", "--prompt", "32", "--max-tokens", "8"]
    cmd += ["--passes", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    moe, dense = report["active_params"]["moe"], report["active_params"]["dense"]
    assert 0 < moe - dense <= 2 * 128 * 8  # the routers [L, H, E] are the only extra
    for side in ("moe", "dense"):
        assert report["served"][side]["decode_tok_s"] > 0 < report["served"][side]["prefill_tok_s"]
    assert [k["tokens"] for k in report["expert_kernels"]] == [4, 16]
    assert all(
        k[f"{i}_ms"] > 0 for k in report["expert_kernels"] for i in ("auto", "ragged", "reference")
    )
    assert "MoE / dense time per decode step" in proc.stdout


def test_quant_benchmark_serves_every_variant_against_its_floor(tmp_path):
    """benchmarks/quant.py at a tiny size: bf16, int8, fp8 and int8 + fp8 KV bundles of one
    checkpoint, each served at batch 1 and 16 against the memory floor, the quantized ones with
    their quality."""
    out = tmp_path / "quant.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/quant.py"), "--out", str(out)]
    cmd += ["--hidden", "128", "--layers", "2", "--intermediate", "256", "--vocab", "1000"]
    cmd += ["--max-tokens", "6", "--passes", "1", "--quality-tokens", "32"]
    cmd += ["--variants", "bf16,int8,fp8,int8-kv8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = report["variants"]
    assert sorted(rows) == ["bf16", "fp8", "int8", "int8-kv8"] and report["copy_bandwidth_gbs"] > 0
    for name, row in rows.items():
        assert row["compiles_after_ready"] == 0
        for b in ("batch1", "batch16"):
            assert row[b]["tok_s"] > 0 and row[b]["floor_ms"] > 0 and row[b]["x_floor"] > 0
        assert (row["quality"] is None) == (name == "bf16")
    assert rows["int8"]["weights_bytes"] < rows["bf16"]["weights_bytes"]
    assert rows["int8"]["quality"]["tokens"] == 32
    assert set(report["ratios"]) == {"int8/bf16", "fp8/bf16", "int8-kv8/bf16"}
    assert rows["int8-kv8"]["batch16"]["floor_ms"] < rows["int8"]["batch16"]["floor_ms"]
    assert "int8 / bf16 decode tok/s" in proc.stdout


def test_buckets_benchmark_plans_seen_and_unseen_traffic(tmp_path):
    """benchmarks/buckets.py at a small size: every synthetic case planned against pow2, and the
    unseen mixture planned on one sample and scored on another, with the optimum's bound."""
    out = tmp_path / "buckets.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/buckets.py"), "--out", str(out)]
    cmd += ["--requests", "200", "--unseen-requests", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert len(report["cases"]) == 6
    for case in report["unseen"]:
        for key in ("graphs8", "rungs8"):
            for where in ("in_sample", "held_out"):
                r = case[f"{key}_{where}"]
                assert r["planned"] >= 0 and r["pow2"] > 0
            # in sample the planner is the optimum: never more padding than pow2's rungs
            assert case[f"{key}_in_sample"]["ratio"] <= 1.0
        assert len(case["rungs8_ladders"]["planned"]) == 8
        curve = list(case["optimal_padding_by_rungs"].values())
        assert curve == sorted(curve, reverse=True)  # more rungs never pad more
    assert "unseen traffic" in proc.stdout


def test_peers_benchmark_serves_aotlm_and_vllm_on_the_same_requests(tmp_path):
    """benchmarks/peers.py --sizes tiny: both servers started cold and warm and driven by the same
    load; vLLM CPU is installed into its own venv on first use (skipped only when that install
    fails, with its reason)."""
    out = tmp_path / "peers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/peers.py"), "--out", str(out)]
    cmd += ["--sizes", "tiny", "--concurrency", "1,2", "--requests", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tiny = json.loads(out.read_text(encoding="utf-8"))["sizes"]["tiny"]
    a = tiny["aotlm"]
    assert a["compiles_after_ready"] == 0
    assert set(a["ready_s"]) == {"stablehlo", "compiled", "compiled#2"}
    names = {"mixed@1", "mixed@2", "prefix-shared@16"}
    for name in names:
        assert a[name]["exact_lengths"] == a[name]["requests"] > 0
    why = tiny.get("vllm_unavailable") or ""
    if "pip" in why and "install" in why:
        pytest.skip(f"vLLM CPU could not be installed here: {why[:500]}")
    assert "vllm" in tiny, why  # installed but failed to serve: a real failure
    v = tiny["vllm"]
    assert set(v["ready_s"]) == {"cold", "warm"}
    for name in names:
        assert v[name]["exact_lengths"] == v[name]["requests"] == a[name]["requests"]
        agreed, total = tiny["greedy_agreement"][name].split("/")
        assert int(total) == a[name]["requests"] and 0 <= int(agreed) <= int(total)
    assert set(tiny["ratios"]) >= {"tok_s mixed@2", "ready vs vllm cold"}
    assert "first completion after start" in proc.stdout


def test_embed_benchmark_compares_the_bundle_with_torch_f32_and_bf16(minilm_bundle, tmp_path):
    """benchmarks/embed.py on the shared real all-MiniLM-L6-v2 bundle: every batch size runs the
    bundle and both PyTorch baselines on the same sentences, and the f32 bundle's embeddings are
    the f32 baseline's."""
    from bundle_factory import write_model_yaml
    from test_bert import minilm_dir

    buckets = {"tokens": [16, 32, 64, 128], "requests": [1, 4]}  # the fixture's
    spec = write_model_yaml(tmp_path / "spec", minilm_dir(), buckets=buckets)
    out = tmp_path / "embed.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/embed.py"), "--yaml", str(spec)]
    cmd += ["--bundle", str(minilm_bundle[0]), "--sentences", "12", "--batch-sizes", "1,4"]
    cmd += ["--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["compiles_after_ready"] == 0 and report["sentences"] == 12
    assert report["baselines"] == ["torch", "torch_bf16"]
    assert [r["batch_size"] for r in report["rows"]] == [1, 4]
    for row in report["rows"]:
        assert row["max_cosine_distance"] < 1e-5  # f32 bundle vs f32 PyTorch
        assert row["torch_bf16_max_cosine_distance"] < 1e-2  # bf16 rounding, not a wrong model
        assert row["speedup_vs_torch"] > 0 and row["speedup_vs_torch_bf16"] > 0
    assert "aot/torch_bf16" in proc.stdout
