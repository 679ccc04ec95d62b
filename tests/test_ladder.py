"""Bucket ladders: generation, validation and lookup."""

from __future__ import annotations

import pytest

from aotlm.buckets import (
    clip_ladder,
    ladder_from_spec,
    pick_bucket,
    pow2_ladder,
    step_ladder,
    validate_ladder,
)
from aotlm.errors import ConfigError, NoBucketError


def test_pow2_ladder() -> None:
    assert pow2_ladder(16, 128) == (16, 32, 64, 128)
    assert pow2_ladder(1, 8) == (1, 2, 4, 8)
    assert pow2_ladder(64, 64) == (64,)


def test_pow2_ladder_clips_to_bounds_and_keeps_the_maximum() -> None:
    assert pow2_ladder(12, 100) == (12, 16, 32, 64, 100)


def test_step_ladder_doubles_then_steps() -> None:
    assert step_ladder(16, 512, 128) == (16, 32, 64, 128, 256, 384, 512)
    assert step_ladder(16, 500, 128) == (16, 32, 64, 128, 256, 384, 500)
    assert step_ladder(200, 512, 128) == (200, 256, 384, 512)
    assert step_ladder(1, 4, 128) == (1, 2, 4)


def test_clip_ladder() -> None:
    assert clip_ladder([1, 2, 4, 8, 16], 2, 10) == (2, 4, 8, 10)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "x: must not be empty"),
        ([16, 32, 32], "x[2]: must be larger than 32 (got 32)"),
        ([16, 64, 32], "x[2]: must be larger than 64 (got 32)"),
        ([0, 1], "x[0]: must be positive (got 0)"),
        ([-4], "x[0]: must be positive (got -4)"),
        ([1, True], "x[1]: expected an integer, got True"),
        ([1, 2.5], "x[1]: expected an integer, got 2.5"),
        ("16", "x: expected a list of integers"),
        (16, "x: expected a list of integers"),
    ],
)
def test_validate_ladder_rejects(values: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_ladder(values, "x")
    assert str(info.value).startswith(message)


def test_ladder_from_spec_forms() -> None:
    assert ladder_from_spec([1, 2, 4], "w") == (1, 2, 4)
    assert ladder_from_spec({"pow2": {"min": 16, "max": 128}}, "w") == (16, 32, 64, 128)
    spec = {"step": {"min": 16, "max": 512, "gap": 128}}
    assert ladder_from_spec(spec, "w") == (16, 32, 64, 128, 256, 384, 512)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"pow3": {"min": 1, "max": 2}}, "m.yaml: b.tokens: expected a list of integers or"),
        ({"pow2": {"min": 1}}, "m.yaml: b.tokens.pow2.max: required key is missing"),
        ({"pow2": {"min": 1, "max": 8, "gap": 2}}, "m.yaml: b.tokens.pow2.gap: unknown key"),
        ({"pow2": {"min": 0, "max": 8}}, "m.yaml: b.tokens.pow2.min: must be positive (got 0)"),
        ({"pow2": {"min": 16, "max": 8}}, "m.yaml: b.tokens.pow2.max: must be at least min"),
        ({"step": {"min": 1, "max": 8, "gap": "x"}}, "m.yaml: b.tokens.step.gap: expected an"),
        ({"step": [1, 2]}, "m.yaml: b.tokens.step: expected a mapping"),
        ([1, 3, 2], "m.yaml: b.tokens[2]: must be larger than 3 (got 2)"),
    ],
)
def test_ladder_from_spec_errors_name_the_key(spec: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ladder_from_spec(spec, "m.yaml: b.tokens")
    assert str(info.value).startswith(message)


def test_pick_bucket() -> None:
    ladder = (16, 32, 64)
    assert pick_bucket(ladder, 0) == 16
    assert pick_bucket(ladder, 1) == 16
    assert pick_bucket(ladder, 16) == 16
    assert pick_bucket(ladder, 17) == 32
    assert pick_bucket(ladder, 64) == 64


def test_pick_bucket_none_fits() -> None:
    with pytest.raises(NoBucketError, match=r"^no token bucket fits 300 tokens; largest is 256$"):
        pick_bucket((128, 256), 300)
    with pytest.raises(NoBucketError, match="no request bucket fits 9 requests; largest is 8"):
        pick_bucket((1, 2, 4, 8), 9, kind="request")


def test_pick_bucket_negative_is_a_bug() -> None:
    with pytest.raises(ValueError):
        pick_bucket((1, 2), -1)
