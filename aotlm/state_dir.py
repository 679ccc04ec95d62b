"""This machine's aotlm directory (`--cache-dir`): the build cache, the record of bundles built
here, pulled bundles. It is `--cache-dir`, else `$XDG_CACHE_HOME/aotlm`, else `~/.cache/aotlm`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "aotlm"


def write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, then rename: readers see the old file or the whole new one, never a part,
    so processes share the directory safely."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
