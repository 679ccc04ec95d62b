"""The record of bundles this machine built: what trust policy "local" accepts.

    <cache dir>/built/<digest>.json

A digest is the sha256 of a manifest that holds every file's sha256, so a bundle with a recorded
digest has exactly the bytes this machine wrote, wherever it was copied to. The build writes the
record (aotlm/build/bundle.py); the loader's trust policy reads it (aotlm/runtime/load/trust.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from aotlm.state_dir import write_atomic


class BuiltHere:
    def __init__(self, root: Path | str) -> None:
        self.dir = Path(root) / "built"

    def record(self, digest: str, bundle_dir: Path) -> None:
        info = {"digest": digest, "path": str(Path(bundle_dir).absolute()), "at": time.time()}
        write_atomic(self.dir / f"{digest}.json", json.dumps(info).encode())

    def contains(self, digest: str) -> bool:
        return len(digest) == 64 and (self.dir / f"{digest}.json").is_file()
