"""`aotlm generate`: text from a bundle on the command line, no server, no compiles after load."""

from __future__ import annotations

import json

import click

from aotlm.cli.options import (
    bundle_source,
    errors_to_exit,
    flag,
    option,
    resolve_source,
    strict_flag,
)


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE")
@option(
    "--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch)."
)
@option("--max-tokens", default=16, help="Tokens to generate per prompt.")
@option("--temperature", default=0.0, help="0 is greedy.")
@option(
    "--top-p",
    default=1.0,
    help="Nucleus sampling: keep the smallest set of tokens whose probability reaches it.",
)
@option("--top-k", default=0, help="0 is off.")
@option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@strict_flag()
@flag("--json", "as_json", help='Print {"text", "token_ids", "compiles_after_ready"} per prompt.')
@bundle_source
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
    from aotlm.runtime.generation.engine import Engine
    from aotlm.runtime.generation.sampling_params import SamplingParams

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
