"""Traffic traces: what requests a server sees, the input the bucket planner learns from.

A trace file is JSONL, one request per line::

    {"prompt_tokens": 412, "output_tokens": 87, "arrival": 0.25}

``arrival`` (seconds from the trace's start) is optional; a trace either has it on every line
(replayed open-loop) or on none (replayed at a fixed concurrency, see ``simulate.py``). Blank
lines and lines starting with ``#`` are skipped. The synthetic generators stand in for real
traffic in tests and benchmarks; they are seeded, so a benchmark is reproducible.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aotlm.errors import ConfigError

_KEYS = ("prompt_tokens", "output_tokens", "arrival")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: prompt length, tokens generated (>= 1: every request samples once) and
    optionally its arrival time in seconds."""

    prompt_tokens: int
    output_tokens: int
    arrival: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
        }
        if self.arrival is not None:
            out["arrival"] = self.arrival
        return out


def _count(obj: dict, key: str, minimum: int, where: str) -> int:
    if key not in obj:
        raise ConfigError(f"{where}: {key}: required key is missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{where}: {key}: must be at least {minimum} (got {value})")
    return value


def parse_request(obj: Any, where: str) -> TraceRequest:
    """Validate one decoded JSON object; ``where`` (``trace.jsonl:3``) prefixes every error."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in _KEYS:
            raise ConfigError(f"{where}: {key}: unknown key (allowed: {', '.join(_KEYS)})")
    prompt = _count(obj, "prompt_tokens", 1, where)
    output = _count(obj, "output_tokens", 1, where)
    arrival = obj.get("arrival")
    if arrival is not None:
        if isinstance(arrival, bool) or not isinstance(arrival, (int, float)):
            raise ConfigError(f"{where}: arrival: expected seconds (a number), got {arrival!r}")
        if not arrival >= 0 or arrival == float("inf"):  # also rejects NaN
            raise ConfigError(f"{where}: arrival: must be finite and >= 0 (got {arrival})")
        arrival = float(arrival)
    return TraceRequest(prompt, output, arrival)


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace; every error names the file and line (``trace.jsonl:7: ...``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: trace file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read trace: {exc}") from None
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path.name}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        requests.append(parse_request(obj, where))
    if not requests:
        raise ConfigError(f"{path.name}: the trace has no requests")
    timed = sum(r.arrival is not None for r in requests)
    if 0 < timed < len(requests):
        raise ConfigError(
            f"{path.name}: {timed} of {len(requests)} requests have an arrival time; "
            "give it on every line or on none"
        )
    return requests


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> Path:
    """Write ``requests`` as JSONL (what ``read_trace`` reads back, and a server can record)."""
    path = Path(path)
    lines = [json.dumps(r.to_dict()) for r in requests]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ---- synthetic traffic ------------------------------------------------------------------------


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return rng.lognormal(np.log(median), sigma, n)


def _assemble(
    rng: np.random.Generator,
    prompts: np.ndarray,
    outputs: np.ndarray,
    max_seq_len: int,
    rate: float | None,
) -> list[TraceRequest]:
    """Round, clip to ``max_seq_len`` (prompt first, then output), and add Poisson arrivals."""
    p = np.clip(np.rint(prompts), 1, max_seq_len - 1).astype(int)
    o = np.clip(np.rint(outputs), 1, None).astype(int)
    o = np.minimum(o, max_seq_len - p)
    if not rate:
        return [TraceRequest(int(a), int(b)) for a, b in zip(p, o, strict=True)]
    arrivals = np.cumsum(rng.exponential(1.0 / rate, len(p)))
    return [
        TraceRequest(int(a), int(b), round(float(t), 6))
        for a, b, t in zip(p, o, arrivals, strict=True)
    ]


def short_chat(
    n: int, *, seed: int = 0, max_seq_len: int = 4096, rate: float | None = None
) -> list[TraceRequest]:
    """Chat turns: prompts of a few hundred tokens (median 200), answers of ~150."""
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, 200, 0.8, n)
    outputs = _lognormal(rng, 150, 0.7, n)
    return _assemble(rng, prompts, outputs, max_seq_len, rate)


def long_prompt_rag(
    n: int, *, seed: int = 0, max_seq_len: int = 4096, rate: float | None = None
) -> list[TraceRequest]:
    """Retrieval-augmented prompts: 1.5k-3.5k tokens of context, short answers (median 60)."""
    rng = np.random.default_rng(seed)
    prompts = rng.normal(2500, 500, n)
    outputs = _lognormal(rng, 60, 0.6, n)
    return _assemble(rng, prompts, outputs, max_seq_len, rate)


def mixed_heavy_tail(
    n: int, *, seed: int = 0, max_seq_len: int = 4096, rate: float | None = None
) -> list[TraceRequest]:
    """Mostly small requests with Pareto tails (alpha 1.2) in both prompt and output lengths:
    the case where a few huge requests set the maximum and the bulk sits far below it."""
    rng = np.random.default_rng(seed)
    prompts = 32 * (1 + rng.pareto(1.2, n))
    outputs = 16 * (1 + rng.pareto(1.2, n))
    return _assemble(rng, prompts, outputs, max_seq_len, rate)


SYNTHETIC: dict[str, Callable[..., list[TraceRequest]]] = {
    "short-chat": short_chat,
    "long-prompt-rag": long_prompt_rag,
    "mixed-heavy-tail": mixed_heavy_tail,
}
