"""Small helpers every click command shares: AotlmError -> clean exit, sizes, plain tables.

Kept free of other aotlm imports so any command module can use it without import cycles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from aotlm.errors import AotlmError


def errors_to_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an AotlmError (bad input, bad bundle, ...) into a one-line message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AotlmError as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def human(n: float) -> str:
    """Bytes as B / KiB / MiB / GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Left-aligned columns under a header and a dashed rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
