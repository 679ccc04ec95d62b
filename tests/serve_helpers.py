"""Helpers for tests that start `aotlm serve` as a real subprocess."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_ready(proc: subprocess.Popen, base: str, timeout: float = 90) -> None:
    """Poll `base`/ready until it answers 200; fails if the server exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None and time.monotonic() < deadline
        try:
            if httpx.get(f"{base}/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
