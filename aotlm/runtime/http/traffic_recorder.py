"""`aotlm serve --record-trace FILE`: append served requests to a traffic trace.

The file is what `aotlm buckets plan --trace FILE` (and model.yaml's `buckets.plan`) reads: JSONL
in `aotlm.buckets.traffic`'s format, one line per finished sequence (a request with `n` choices is
`n` lines, as the scheduler runs `n` sequences)::

    {"prompt_tokens": 412, "output_tokens": 87, "arrival": 0.25}

`arrival` is seconds since the recorder started. Recording into an existing trace continues its
clock one second after its last arrival, so several server runs add up to one replayable trace.
Plain Python; every line is appended and flushed on its own, so a crash loses nothing written.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from aotlm.buckets.traffic import TraceRequest, read_trace
from aotlm.errors import ConfigError

RESUME_GAP_S = 1.0


class TraceRecorder:
    def __init__(self, path: str | Path, *, clock=time.monotonic) -> None:
        """Check ``path`` can take timed requests; raises ``ConfigError`` if not."""
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        offset = 0.0
        if self.path.is_file() and self.path.stat().st_size:
            existing = read_trace(self.path)
            if existing[0].arrival is None:
                raise ConfigError(
                    f"{self.path}: its requests have no arrival times; record into a new file"
                )
            offset = max(r.arrival or 0.0 for r in existing) + RESUME_GAP_S
        try:
            self.path.touch()
        except OSError as e:
            raise ConfigError(f"{self.path}: cannot record a trace there: {e}") from None
        self._start = clock() - offset
        self.recorded = 0

    def record(self, prompt_tokens: int, output_tokens: Iterable[int], arrival: float) -> None:
        """One line per choice of a request that arrived at ``arrival`` (the recorder's clock).

        Choices that produced no token (aborted before their first) are skipped: a trace line
        needs at least one prompt and one output token.
        """
        since = round(max(0.0, arrival - self._start), 6)
        lines = [
            json.dumps(TraceRequest(prompt_tokens, n, since).to_dict()) + "\n"
            for n in output_tokens
            if n >= 1 and prompt_tokens >= 1
        ]
        if not lines:
            return
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.writelines(lines)
            self.recorded += len(lines)
