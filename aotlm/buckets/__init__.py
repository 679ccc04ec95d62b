"""Bucket ladders (and, later, the planner and padding helpers): static sizes decided at build."""

from aotlm.buckets.ladder import (
    Ladder,
    clip_ladder,
    ladder_from_spec,
    pick_bucket,
    pow2_ladder,
    step_ladder,
    validate_ladder,
)

__all__ = [
    "Ladder",
    "clip_ladder",
    "ladder_from_spec",
    "pick_bucket",
    "pow2_ladder",
    "step_ladder",
    "validate_ladder",
]
