"""The `aotlm` command: one module per command group, each parsing and printing only.

    build.py     build, tiny-checkpoint        inspect.py   inspect, verify
    generate.py  generate                      serve.py     serve
    embed.py     embed                         buckets.py   buckets plan
    registry.py  push, pull, sign, keygen, diff
    options.py   the options they share, AotlmError -> exit 1, where a bundle comes from
    tables.py    sizes and aligned tables

No library module imports click; commands import the library (heavy parts inside the command, so
`aotlm --help` stays fast).
"""

from __future__ import annotations

import click

from aotlm.cli.buckets import buckets
from aotlm.cli.build import build, tiny_checkpoint
from aotlm.cli.embed import embed
from aotlm.cli.generate import generate
from aotlm.cli.inspect import inspect, verify
from aotlm.cli.registry import diff, keygen, pull, push, sign
from aotlm.cli.serve import serve


@click.group()
@click.version_option(package_name="aotlm")
def main() -> None:
    """aotlm: compile a language model ahead of time, serve it with zero compiles."""


for _command in (
    build, inspect, verify, tiny_checkpoint, generate, buckets, serve, embed, push, pull, sign,
    keygen, diff,
):  # fmt: skip
    main.add_command(_command)
