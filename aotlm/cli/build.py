"""`aotlm build` and `aotlm tiny-checkpoint`: model.yaml (or nothing) in, a bundle (a checkpoint) out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from aotlm.cli.options import cache_dir, count, errors_to_exit, flag, json_flag, option, output_dir
from aotlm.cli.tables import human, table, targets_table


@click.command()
@click.argument("model_yaml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@output_dir("Bundle directory to write.")
@option(
    "--target",
    "targets",
    multiple=True,
    help="Override model.yaml targets (cpu, cuda, tpu:v5e:2x2).",
)
@count("--jobs", default=1, help="Functions exported and compiled in parallel (threads).")
@cache_dir(
    "Build cache and record of local builds [default: $XDG_CACHE_HOME/aotlm or ~/.cache/aotlm]."
)
@flag("--no-cache", help="Export and compile everything again.")
@flag("--stablehlo-only", help="Write the portable StableHLO tier only (no executables).")
@json_flag("the result")
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
    from aotlm.build.bundle import build_bundle
    from aotlm.build.model_yaml import load_build_config, with_targets

    cfg = load_build_config(model_yaml)
    if targets:
        cfg = with_targets(cfg, targets)
    result = build_bundle(
        cfg,
        out_dir,
        jobs=jobs,
        progress=None if as_json else _progress(),
        cache_dir=cache_dir,
        use_cache=not no_cache,
        compile_targets=not stablehlo_only,
    )
    if as_json:
        summary = {
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
        click.echo(json.dumps(summary))
        return
    per_fn: dict[str, list] = {}
    for f in result.functions:
        acc = per_fn.setdefault(f["name"], [0, 0, 0.0])
        acc[0] += 1
        acc[1] += f["size"]
        acc[2] += f["seconds"]
    rows = [[n, str(c), human(b), f"{s:.2f}"] for n, (c, b, s) in per_fn.items()]
    total = human(result.total_bytes) + " (bundle)"
    rows.append(["total", str(len(result.functions)), total, f"{result.seconds:.2f}"])
    click.echo(table(rows, ["function", "graphs", "export size", "build s"]))
    click.echo("\n" + targets_table(result.targets))
    click.echo(
        f"\nexported {result.exported}, compiled {result.compiled}, from cache {result.cached}"
    )
    click.echo(f"bundle {result.out_dir}  sha256:{result.digest}")


def _progress():
    """A progress bar on a terminal, one line per exported function otherwise (CI logs)."""
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


@click.command("tiny-checkpoint")
@click.argument("out_dir", type=click.Path(path_type=Path))
@option("--seed", default=0, help="Seed for the random weights.")
@option(
    "--family",
    type=click.Choice(["llama", "gemma3", "qwen3-moe", "mixtral"]),
    default="llama",
    help="Model family (default: the Llama the embedded default builds from).",
)
@errors_to_exit
def tiny_checkpoint(out_dir: Path, seed: int, family: str) -> None:
    """Create a small local random-weight checkpoint (no network): the Llama the embedded
    default builds from, or one of another family."""
    from aotlm.tiny import make_tiny_checkpoint

    click.echo(f"wrote {make_tiny_checkpoint(out_dir, seed=seed, family=family)}")
