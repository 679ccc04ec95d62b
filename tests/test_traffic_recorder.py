"""TraceRecorder: the JSONL `aotlm serve --record-trace` appends and the planner reads."""

from __future__ import annotations

import pytest

from aotlm.buckets.traffic import TraceRequest, read_trace, write_trace
from aotlm.errors import ConfigError
from aotlm.runtime.http.traffic_recorder import RESUME_GAP_S, TraceRecorder


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_one_line_per_choice_with_arrival_since_start(tmp_path):
    clock = Clock()
    rec = TraceRecorder(tmp_path / "t.jsonl", clock=clock)
    rec.record(12, [5], arrival=100.25)
    rec.record(3, [2, 0, 7], arrival=101.5)  # the choice aborted before its first token is skipped
    rec.record(4, [0], arrival=102.0)  # nothing ran: no line
    assert read_trace(tmp_path / "t.jsonl") == [
        TraceRequest(12, 5, 0.25),
        TraceRequest(3, 2, 1.5),
        TraceRequest(3, 7, 1.5),
    ]
    assert rec.recorded == 3


def test_recording_into_an_existing_trace_continues_its_clock(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [TraceRequest(4, 4, 0.0), TraceRequest(5, 1, 8.0)])
    clock = Clock(50.0)
    rec = TraceRecorder(path, clock=clock)
    rec.record(6, [2], arrival=50.5)
    assert read_trace(path)[-1] == TraceRequest(6, 2, 8.0 + RESUME_GAP_S + 0.5)


def test_an_untimed_trace_or_a_bad_path_is_refused(tmp_path):
    untimed = write_trace(tmp_path / "u.jsonl", [TraceRequest(4, 4)])
    with pytest.raises(ConfigError, match="no arrival times"):
        TraceRecorder(untimed)
    with pytest.raises(ConfigError, match="cannot record"):
        TraceRecorder(tmp_path / "missing-dir" / "t.jsonl")
