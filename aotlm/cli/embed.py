"""`aotlm embed`: embed texts with an encoder bundle from the command line (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from aotlm.cli.options import directory, errors_to_exit, flag, option, strict_flag


@click.command()
@directory()
@option("--text", "texts", multiple=True, required=True, help="Text to embed (repeat for several).")
@flag("--truncate", help="Cut texts longer than the bundle's max_seq_len instead of failing.")
@strict_flag()
@flag("--json", "as_json", help='Print {"embeddings", "dim", "compiles_after_ready"}.')
@errors_to_exit
def embed(bundle_dir: Path, texts: tuple[str, ...], truncate: bool, strict: bool, as_json: bool):
    """Embed TEXTs with the encoder bundle BUNDLE_DIR, with no compilation after load.

    Prints each embedding's first values and norm, then the cosine similarity of every pair.
    """
    import numpy as np

    from aotlm.runtime.embedding.embedder import Embedder

    embedder = Embedder.from_bundle(bundle_dir, strict=strict)
    vectors = embedder.embed(list(texts), truncate_prompt_tokens=-1 if truncate else None)
    compiles = embedder.compiles_after_ready
    if as_json:
        out = {
            "embeddings": vectors.tolist(),
            "dim": embedder.dim,
            "compiles_after_ready": compiles,
        }
        click.echo(json.dumps(out))
        return
    width = min(40, max(len(t) for t in texts))
    for i, (text, v) in enumerate(zip(texts, vectors, strict=True)):
        head = " ".join(f"{x:+.4f}" for x in v[:4])
        label = text if len(text) <= width else text[: width - 1] + "…"
        click.echo(
            f"[{i}] {label:<{width}}  {head} … ({len(v)} dims, norm {float(v @ v) ** 0.5:.4f})"
        )
    if len(texts) > 1:
        click.echo("\ncosine similarity")
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        sims = unit @ unit.T
        click.echo("     " + "".join(f"{f'[{j}]':>8}" for j in range(len(texts))))
        for i, row in enumerate(sims):
            click.echo(f"{f'[{i}]':<5}" + "".join(f"{x:8.4f}" for x in row))
    click.echo(f"[compiles after ready: {compiles}]", err=True)
