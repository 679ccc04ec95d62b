"""Command-line interface: parse arguments, call the library, turn AotlmError into a clean exit."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

from aotlm.cli_util import errors_to_exit, human, table
from aotlm.runtime.source import bundle_source_options, resolve_source


@click.group()
@click.version_option(package_name="aotlm")
def main() -> None:
    """aotlm: compile a language model ahead of time, serve it with zero compiles."""


@main.command()
@click.argument("model_yaml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle directory to write.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="Override model.yaml targets (cpu, cuda, tpu:v5e:2x2).",
)
@click.option(
    "--jobs",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Functions exported and compiled in parallel (threads).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Build cache and record of local builds [default: $XDG_CACHE_HOME/aotlm or ~/.cache/aotlm].",
)
@click.option("--no-cache", is_flag=True, help="Export and compile everything again.")
@click.option(
    "--stablehlo-only",
    is_flag=True,
    help="Write the portable StableHLO tier only (no executables).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@errors_to_exit
def build(
    model_yaml: Path,
    out_dir: Path,
    targets: tuple[str, ...],
    jobs: int,
    cache_dir: Path | None,
    no_cache: bool,
    stablehlo_only: bool,
    as_json: bool,
) -> None:
    """Trace every bucket of MODEL_YAML, export it, compile it where possible, write a bundle."""
    from aotlm.build import build_bundle
    from aotlm.config import load_build_config, with_targets

    cfg = load_build_config(model_yaml)
    if targets:
        cfg = with_targets(cfg, targets)
    progress = None if as_json else _build_progress()
    result = build_bundle(
        cfg,
        out_dir,
        jobs=jobs,
        progress=progress,
        cache_dir=cache_dir,
        use_cache=not no_cache,
        compile_targets=not stablehlo_only,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "bundle": str(result.out_dir),
                    "digest": result.digest,
                    "functions": len(result.functions),
                    "bytes": result.total_bytes,
                    "seconds": round(result.seconds, 3),
                    "exported": result.exported,
                    "compiled": result.compiled,
                    "cached": result.cached,
                    "targets": result.targets,
                }
            )
        )
        return
    per_fn: dict[str, list] = {}
    for f in result.functions:
        acc = per_fn.setdefault(f["name"], [0, 0, 0.0])
        acc[0] += 1
        acc[1] += f["size"]
        acc[2] += f["seconds"]
    rows = [[n, str(c), human(b), f"{s:.2f}"] for n, (c, b, s) in per_fn.items()]
    rows.append(
        [
            "total",
            str(len(result.functions)),
            human(result.total_bytes) + " (bundle)",
            f"{result.seconds:.2f}",
        ]
    )
    click.echo(table(rows, ["function", "graphs", "export size", "build s"]))
    click.echo("\n" + _targetstable(result.targets))
    click.echo(
        f"\nexported {result.exported}, compiled {result.compiled}, from cache {result.cached}"
    )
    click.echo(f"bundle {result.out_dir}  sha256:{result.digest}")


def _targetstable(targets: dict) -> str:
    """One row per target: tier, memory plan against the device limit, and why."""
    rows = []
    for name, t in targets.items():
        plan = t.get("memory_plan") or {}
        limit = plan.get("limit_bytes")
        memory = human(plan.get("total_bytes", 0)) + (
            f" / {human(limit)}" if limit is not None else " (no limit)"
        )
        rows.append([name, t["tier"], memory, t.get("reason", "")])
    return table(rows, ["target", "tier", "memory plan", "why"])


def _plan_line(plan: dict) -> str:
    """The recorded plan's source and expected padded work, planned vs pow2 vs step ladders."""
    pads = ", ".join(
        f"{name} {plan[name]['work_overhead']:.1%}"
        for name in ("planned", "pow2", "step")
        if name in plan
    )
    return (
        f"plan      {plan.get('trace')} (sha256 {str(plan.get('trace_sha256'))[:12]}, "
        f"{plan.get('trace_requests')} requests, budget {plan.get('max_graphs')} graphs): "
        f"expected padding {pads}"
    )


def _build_progress():
    if sys.stdout.isatty():
        state: dict = {}

        def bar(done, total, spec, secs):
            if "bar" not in state:
                state["bar"] = click.progressbar(length=total, label="exporting", show_pos=True)
                state["bar"].__enter__()
            state["bar"].label = f"{spec.name} {spec.bucket}"
            state["bar"].update(1)
            if done == total:
                state["bar"].__exit__(None, None, None)

        return bar

    def lines(done, total, spec, secs):
        click.echo(f"[{done}/{total}] exported {spec.name} {spec.bucket} in {secs:.2f}s")

    return lines


@main.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
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
            + (f" mesh=tp:{s['mesh']['tp']}" if "mesh" in s else "")
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
        click.echo(_plan_line(m["buckets"]["plan"]))
    fn_rows = [[n, str(c)] for n, c in counts.items()] + [
        ["total", str(summary["total_functions"])]
    ]
    click.echo("\n" + table(fn_rows, ["function", "graphs"]))
    if summary["targets"]:
        click.echo("\n" + _targetstable(summary["targets"]))
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


@main.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@errors_to_exit
def verify(bundle_dir: Path) -> None:
    """Check a bundle's format version, manifest digest and every file's sha256."""
    from aotlm.bundle import open_bundle

    b = open_bundle(bundle_dir)
    click.echo(f"ok  {len(b.manifest.files)} files verified  sha256:{b.digest}")


@main.command("tiny-checkpoint")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
@errors_to_exit
def tiny_checkpoint(out_dir: Path, seed: int) -> None:
    """Create the small local Llama checkpoint the embedded default builds from (no network)."""
    from aotlm.tiny import make_tiny_checkpoint

    click.echo(f"wrote {make_tiny_checkpoint(out_dir, seed=seed)}")


@main.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@click.option(
    "--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch)."
)
@click.option("--max-tokens", default=16, show_default=True, help="Tokens to generate per prompt.")
@click.option("--temperature", default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, help="0 is off.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option(
    "--strict", is_flag=True, help="Fail if anything compiles after the bundle is loaded."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print {"text", "token_ids", "compiles_after_ready"} per prompt.',
)
@bundle_source_options
@errors_to_exit
def generate(
    bundle_dir,
    prompts,
    max_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    strict,
    as_json,
    trust,
    require_signed,
) -> None:
    """Generate text from BUNDLE (a directory or oci:// / file:// reference), no compiles after load."""
    from aotlm.runtime.engine import Engine
    from aotlm.runtime.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens
    ).validate()
    source = resolve_source(bundle_dir, trust, require_signed)
    engine = Engine.from_bundle(source, strict=strict, trust=trust)
    results = engine.generate(list(prompts), params)
    for prompt, (c,) in zip(prompts, results, strict=True):
        if as_json:
            out = {
                "text": c.text,
                "token_ids": list(c.token_ids),
                "compiles_after_ready": engine.compiles_after_ready,
            }
            click.echo(json.dumps(out))
        else:
            click.echo(f"{prompt}{c.text}")
    if not as_json:
        click.echo(
            f"[{sum(len(c.token_ids) for (c,) in results)} tokens, finish={results[-1][0].finish_reason}, "
            f"compiles after ready: {engine.compiles_after_ready}]",
            err=True,
        )


def _register_subcommands() -> None:
    # Imported here (light modules, no jax) so `aotlm --help` lists every command group.
    from aotlm.buckets.plan_cli import buckets
    from aotlm.registry.cli import diff, keygen, pull, push, sign
    from aotlm.runtime.embed_cli import embed
    from aotlm.runtime.serve_cli import serve

    for command in (buckets, serve, embed, push, pull, sign, keygen, diff):
        main.add_command(command)


_register_subcommands()
