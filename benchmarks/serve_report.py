"""Report of benchmarks/serve.py: the JSON document and the printed table."""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence


def make_report(args, manifest, digest, load_avg, served_run, offline, hf) -> dict:
    """The JSON document: per-workload numbers, both baselines, the summary and output agreement."""
    w = served_run["workloads"]
    mixed, cold, shared = w["mixed"], w["prefix-cold"], w["prefix-shared"]
    texts = {name: wl.pop("texts") for name, wl in w.items()}
    tokens = mixed["output_tokens"]
    served = [wl for name, wl in w.items() if name.startswith("mixed")]
    ratios = [
        s["output_tok_s"] / h["output_tok_s"] for s, h in zip(served, hf["passes"], strict=True)
    ]
    summary = {
        "ratio_vs_transformers": statistics.median(ratios),
        "ratio_per_pass": ratios,
        "cpu_ms_per_token_server": 1e3 * mixed["server_cpu_s"] / tokens,
        "cpu_ms_per_token_client": 1e3 * mixed["client_cpu_s"] / tokens,
        "cpu_ms_per_token_engine": 1e3 * offline["cpu_s"] / tokens,
        "cpu_ms_per_token_transformers": 1e3 * hf["cpu_s"] / hf["useful_output_tokens"],
        "served_vs_offline": mixed["output_tok_s"] / offline["output_tok_s"],
        "ttft_p50_cold_ms": cold["ttft_ms"]["p50"],
        "ttft_p50_shared_ms": shared["ttft_ms"]["p50"],
        "ttft_mean_cold_ms": cold["ttft_ms"]["mean"],
        "ttft_mean_shared_ms": shared["ttft_ms"]["mean"],
        "prefix_hits_cold": cold["prefix_cache_hits"],
        "prefix_queries_cold": cold["prefix_cache_queries"],
        "prefix_hits_shared": shared["prefix_cache_hits"],
        "prefix_queries_shared": shared["prefix_cache_queries"],
        "compiles_after_ready": served_run["compiles_after_ready"],
        "exact_lengths": f"{sum(x['exact_lengths'] for x in w.values())}/"
        f"{sum(x['requests'] for x in w.values())}",
    }
    return {
        "model": manifest.name,
        "bundle_digest": f"sha256:{digest}",
        "buckets": {"tokens": manifest.buckets.tokens, "requests": manifest.buckets.requests},
        "max_seq_len": manifest.serving.max_seq_len,
        "concurrency": args.concurrency,
        "client": args.client,
        "seed": args.seed,
        "load_avg": [load_avg, os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "server_ready_s": served_run["ready_s"],
        "summary": summary,
        "workloads": w,
        "transformers": {k: v for k, v in hf.items() if k != "token_ids"},
        "engine_offline": {k: v for k, v in offline.items() if k not in ("token_ids", "texts")},
        "agreement": {
            "served_vs_offline_text": agreement(texts["mixed"], offline["texts"]),
            "offline_vs_transformers": agreement(offline["token_ids"], hf["token_ids"]),
        },
    }


def _common_prefix(p: Sequence, q: Sequence) -> int:
    n = 0
    for x, y in zip(p, q, strict=False):
        if x != y:
            break
        n += 1
    return n


def agreement(a: Sequence[Sequence], b: Sequence[Sequence]) -> dict:
    """Requests (token ids or texts) that are identical, and the share of `a`'s positions before
    the first difference."""
    pairs = list(zip(a, b, strict=True))
    return {
        "identical": sum(list(p) == list(q) for p, q in pairs),
        "requests": len(pairs),
        "tokens_before_divergence": sum(_common_prefix(p, q) for p, q in pairs)
        / max(1, sum(len(p) for p in a)),
    }


def _ms3(d: dict) -> str:
    return "/".join(f"{d[p]:.0f}" if d[p] >= 10 else f"{d[p]:.1f}" for p in ("p50", "p90", "p99"))


def print_report(r: dict) -> None:
    print(
        f"model {r['model']}  bundle {r['bundle_digest'][:19]}  concurrency {r['concurrency']}  "
        f"cpus {r['cpus']}  load avg {r['load_avg'][0]:.1f} -> {r['load_avg'][1]:.1f}  "
        f"server ready in {r['server_ready_s']:.1f} s"
    )
    print(
        f"{'workload':<22} {'reqs':>4} {'req/s':>6} {'out tok/s':>9}  {'TTFT ms p50/p90/p99':>19}  "
        f"{'TPOT ms p50/p90/p99':>19}  {'E2E ms p50/p90/p99':>19}  {'cached':>6}  tok/chunk"
    )
    for name, w in r["workloads"].items():
        cached = w["cached_prompt_tokens"] / w["prompt_tokens"]
        print(
            f"{name:<22} {w['requests']:>4} {w['req_s']:>6.2f} {w['output_tok_s']:>9.1f}  "
            f"{_ms3(w['ttft_ms']):>19}  {_ms3(w['tpot_ms']):>19}  {_ms3(w['e2e_ms']):>19}  "
            f"{cached:>6.0%}  {w['tokens_per_chunk']:>9.1f}"
        )
    n = r["workloads"]["mixed"]["requests"]
    for i, hf in enumerate(r["transformers"]["passes"]):
        name = "transformers" + (f" #{i + 1}" if i else "")
        both = ", ".join(f"{t} {v:.0f}" for t, v in hf["tok_s_by_threads"].items())
        print(
            f"{name:<22} {n:>4} {hf['req_s']:>6.2f} {hf['output_tok_s']:>9.1f}  mixed"
            f"{f'#{i + 1}' if i else ''} prompts, static batches of {r['concurrency']}, best of "
            f"torch threads ({both} tok/s); {hf['computed_output_tokens']} tokens computed for "
            f"{hf['useful_output_tokens']} requested"
        )
    off = r["engine_offline"]
    print(
        f"{'engine, no HTTP':<22} {n:>4} {off['req_s']:>6.2f} {off['output_tok_s']:>9.1f}  "
        f"mixed prompts: {off['steps']} steps, {off['step_ms']:.1f} ms/step = "
        f"{off['execute_ms']:.1f} execute + {off['host_ms']:.1f} scheduler/postprocess"
    )
    by = off["execute_by_token_bucket"]
    print(
        "  execute ms/step by token bucket (steps, share of engine time): "
        + ", ".join(f"T={b}: {v['ms']:.1f} ({v['steps']}, {v['share']:.0%})" for b, v in by.items())
    )
    _print_summary(r)


def _print_summary(r: dict) -> None:
    s, m, off = r["summary"], r["workloads"]["mixed"], r["engine_offline"]
    per_pass = ", ".join(f"{x:.2f}x" for x in s["ratio_per_pass"])
    print(
        f"aotlm / transformers (mixed, output tok/s): {s['ratio_vs_transformers']:.2f}x, the median "
        f"of the passes ({per_pass}) (goal >= 3x: "
        f"{'met' if s['ratio_vs_transformers'] >= 3 else 'not met'})"
    )
    print(
        f"where time goes (mixed): served {m['seconds']:.1f} s wall vs engine without HTTP "
        f"{off['seconds']:.1f} s; CPU ms per output token: server {s['cpu_ms_per_token_server']:.2f}"
        f" + client {s['cpu_ms_per_token_client']:.2f}, engine alone "
        f"{s['cpu_ms_per_token_engine']:.2f}, transformers {s['cpu_ms_per_token_transformers']:.2f}"
    )
    print(
        f"prefix reuse: TTFT p50 {s['ttft_p50_cold_ms']:.0f} -> {s['ttft_p50_shared_ms']:.0f} ms "
        f"({s['ttft_p50_cold_ms'] / s['ttft_p50_shared_ms']:.1f}x), mean "
        f"{s['ttft_mean_cold_ms']:.0f} -> {s['ttft_mean_shared_ms']:.0f} ms; prefix-cache hits "
        f"{s['prefix_hits_shared']:.0f}/{s['prefix_queries_shared']:.0f} prompt tokens "
        f"(cold: {s['prefix_hits_cold']:.0f}/{s['prefix_queries_cold']:.0f})"
    )
    a, b = r["agreement"]["served_vs_offline_text"], r["agreement"]["offline_vs_transformers"]
    print(
        f"compiles_after_ready {s['compiles_after_ready']:.0f}   exact output lengths "
        f"{s['exact_lengths']}   greedy: served = engine {a['identical']}/{a['requests']}, "
        f"engine = transformers {b['identical']}/{b['requests']} "
        f"({b['tokens_before_divergence']:.0%} of tokens before the first difference)"
    )
