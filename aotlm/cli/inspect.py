"""`aotlm inspect` and `aotlm verify`: what a bundle holds, and whether every byte is intact."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

from aotlm.cli.options import directory, errors_to_exit, json_flag
from aotlm.cli.tables import human, plan_line, table, targets_table


@click.command()
@directory()
@json_flag("the manifest summary")
@errors_to_exit
def inspect(bundle_dir: Path, as_json: bool) -> None:
    """Show a bundle's model, buckets, functions, files and digest."""
    from aotlm.bundle import read_manifest

    manifest, digest = read_manifest(bundle_dir)
    m = manifest.to_dict()  # inspect shows the manifest as it is written
    counts = Counter(f["name"] for f in m["functions"])
    summary = {
        "bundle": str(bundle_dir),
        "digest": digest,
        "format_version": m["format_version"],
        "aotlm_version": m["aotlm_version"],
        "jax_version": m["jax_version"],
        "name": m["name"],
        "architecture": m["model"].get("architecture"),
        "serving": m["serving"],
        "buckets": m["buckets"],
        "functions": dict(counts),
        "total_functions": sum(counts.values()),
        "targets": m.get("targets", {}),
        "weights": m.get("weights", {}),
        "quantization": m.get("quantization"),
        "fingerprints": {t: e["fingerprint"] for t, e in m["compiled"].items()},
        "files": {p: e["size"] for p, e in sorted(m["files"].items())},
        "total_bytes": sum(e["size"] for e in m["files"].values()),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    s = m["serving"]
    click.echo(f"bundle    {bundle_dir}\ndigest    sha256:{digest}")
    click.echo(
        f"format    v{m['format_version']} (aotlm {m['aotlm_version']}, jax {m['jax_version']})"
    )
    if m["model"].get("kind") == "encoder":  # embeddings: no KV cache; buckets are (S, B)
        norm = ", normalized" if m["model"].get("normalize") else ""
        pooling = f"{m['model'].get('pooling')} pooling{norm}"
        click.echo(
            f"model     {m['name']} ({summary['architecture']} encoder, {s['dtype']}, {pooling})"
        )
        click.echo(f"serving   max_seq_len={s['max_seq_len']} platforms={','.join(s['platforms'])}")
        click.echo(
            f"buckets   sequence lengths={m['buckets']['tokens']} "
            f"batch sizes={m['buckets']['requests']}"
        )
    else:
        click.echo(f"model     {m['name']} ({summary['architecture']}, {s['dtype']})")
        click.echo(
            f"serving   max_seq_len={s['max_seq_len']} page_size={s['page_size']} kv_pages={s['kv_pages']} "
            f"platforms={','.join(s['platforms'])}"
            + (" mesh=" + ",".join(f"{k}:{v}" for k, v in s["mesh"].items()) if "mesh" in s else "")
            + (f" decode_steps={s['decode_steps']}" if s.get("decode_steps", 1) > 1 else "")
        )
        click.echo(f"buckets   tokens={m['buckets']['tokens']} requests={m['buckets']['requests']}")
        if "attention" in s:
            blocks = s["attention"]["block_sizes"]
            click.echo(
                f"attention {s['attention']['kernel']} block_queries={blocks['queries']} "
                f"block_kv_pages={blocks['kv_pages']} (TPU); cpu: "
                + s["attention"].get("cpu", "jnp")
                + "".join(f" ({c})" for c in s["attention"].get("custom_calls", []))
            )
    if "plan" in m["buckets"]:
        click.echo(plan_line(m["buckets"]["plan"]))
    if "quantization" in m:
        click.echo(_quantization_line(m["quantization"]))
    if m.get("weights"):
        rows = [[k, ",".join(v["dtypes"]), human(v["bytes"])] for k, v in m["weights"].items()]
        rows.append(["total", "", human(sum(v["bytes"] for v in m["weights"].values()))])
        click.echo("\n" + table(rows, ["weights", "dtype", "bytes"]))
    fn_rows = [[n, str(c)] for n, c in counts.items()] + [
        ["total", str(summary["total_functions"])]
    ]
    click.echo("\n" + table(fn_rows, ["function", "graphs"]))
    if summary["targets"]:
        click.echo("\n" + targets_table(summary["targets"]))
        for target, plan in ((t, e["memory_plan"]) for t, e in summary["targets"].items()):
            parts = [
                f"weights {human(plan['weights_bytes'])}",
                f"KV pool {human(plan['kv_pool_bytes'])}",
                f"code {human(plan['code_bytes'])}",
                f"peak step {human(plan['peak_step_bytes'])} {plan['peak_step'] or '(not analyzed)'}",
            ]
            click.echo(f"memory    {target}: {', '.join(parts)}; limit: {plan['limit']}")
    for target, fp in summary["fingerprints"].items():
        shown = ", ".join(
            f"{k}={fp[k]}" for k in ("platform", "device_kind", "device_count", "jax")
        )
        click.echo(f"compiled  {target}: {shown}")
    file_rows = [[p, human(n)] for p, n in summary["files"].items()]
    file_rows.append(["total", human(summary["total_bytes"])])
    click.echo("\n" + table(file_rows, ["file", "size"]))


def _quantization_line(q: dict) -> str:
    parts = [f"weights {q['weights']}" if "weights" in q else "weights unquantized"]
    if "kv_cache_dtype" in q:
        parts.append(f"KV cache {q['kv_cache_dtype']}")
    line = f"quantization: {', '.join(parts)} (by {q.get('source', '?')})"
    f = q.get("quality")
    if f and "mean_cosine" in f:  # an encoder
        line += (
            f"\nquality   embeddings' cosine similarity mean {f['mean_cosine']:.5f}, min "
            f"{f['min_cosine']:.5f} ({f['sentences']} sentences of {f['text']})"
        )
    elif f:
        line += (
            f"\nquality   mean KL {f['mean_kl']:.5f} nats, top-1 agreement "
            f"{f['top1_agreement']:.4f}, perplexity {f['perplexity']:.3f} vs "
            f"{f['perplexity_unquantized']:.3f} unquantized ({f['tokens']} tokens of {f['text']})"
        )
    return line


@click.command()
@directory()
@errors_to_exit
def verify(bundle_dir: Path) -> None:
    """Check a bundle's format version, manifest digest and every file's sha256."""
    from aotlm.bundle import open_bundle

    b = open_bundle(bundle_dir)
    click.echo(f"ok  {len(b.manifest.files)} files verified  sha256:{b.digest}")
