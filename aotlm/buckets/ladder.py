"""Bucket ladders: the sorted, static sizes that every traced graph is padded up to.

A ladder is a plain ``tuple[int, ...]``, strictly increasing and non-empty. Ladders are decided
at build time (from model.yaml or a planner), written into the bundle, and only read at serve
time, so everything here is pure Python: no jax, no numpy.

Spec forms accepted by :func:`ladder_from_spec` (as written in model.yaml)::

    [16, 32, 64, 128]                       # explicit
    {pow2: {min: 16, max: 128}}             # 16, 32, 64, 128
    {step: {min: 16, max: 512, gap: 128}}   # 16, 32, 64, 128, 256, 384, 512
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aotlm.errors import ConfigError, NoBucketError

Ladder = tuple[int, ...]


def _positive_int(value: Any, where: str) -> int:
    # bool is an int subclass; `True` in a YAML ladder is a typo, never a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{where}: must be positive (got {value})")
    return value


def validate_ladder(values: Iterable[Any], where: str = "ladder") -> Ladder:
    """Check that ``values`` are positive ints in strictly increasing order; return them as a tuple.

    Sorting silently would hide typos such as ``[16, 32, 23]``, so order is an error, not a fix.

    >>> validate_ladder([1, 2, 4])
    (1, 2, 4)
    """
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ConfigError(f"{where}: expected a list of integers, got {values!r}")
    ladder = tuple(values)
    if not ladder:
        raise ConfigError(f"{where}: must not be empty")
    for i, value in enumerate(ladder):
        _positive_int(value, f"{where}[{i}]")
        if i and value <= ladder[i - 1]:
            raise ConfigError(
                f"{where}[{i}]: must be larger than {ladder[i - 1]} (got {value}); "
                "buckets are listed in strictly increasing order"
            )
    return ladder


def clip_ladder(values: Iterable[int], min_size: int, max_size: int) -> Ladder:
    """Keep the rungs inside ``[min_size, max_size]`` and always end on ``max_size``.

    The largest bucket bounds what the server accepts, so it must be exactly the requested
    maximum even when the generating rule (powers of two, steps) would overshoot or stop short.
    """
    inside = sorted({v for v in values if min_size <= v < max_size})
    return validate_ladder([*inside, max_size])


def _check_bounds(min_size: Any, max_size: Any, where: str) -> tuple[int, int]:
    lo = _positive_int(min_size, f"{where}.min")
    hi = _positive_int(max_size, f"{where}.max")
    if hi < lo:
        raise ConfigError(f"{where}.max: must be at least min ({lo}) (got {hi})")
    return lo, hi


def pow2_ladder(min_size: int, max_size: int, *, where: str = "pow2") -> Ladder:
    """``min_size``, the powers of two strictly between the bounds, then ``max_size``.

    >>> pow2_ladder(16, 128)
    (16, 32, 64, 128)
    >>> pow2_ladder(12, 100)
    (12, 16, 32, 64, 100)
    """
    lo, hi = _check_bounds(min_size, max_size, where)
    rungs = [lo]
    power = 1
    while power < hi:
        rungs.append(power)
        power *= 2
    return clip_ladder(rungs, lo, hi)


def step_ladder(min_size: int, max_size: int, gap: int, *, where: str = "step") -> Ladder:
    """Double from ``min_size`` while below ``gap``, then step by ``gap`` up to ``max_size``.

    Doubling keeps padding waste bounded for small batches, where a fixed step would be coarse;
    linear steps above ``gap`` avoid the up-to-2x waste of a pure power-of-two ladder for large
    ones. Linear rungs are multiples of ``gap`` so ladders with the same gap share sizes.

    >>> step_ladder(16, 512, 128)
    (16, 32, 64, 128, 256, 384, 512)
    """
    lo, hi = _check_bounds(min_size, max_size, where)
    step = _positive_int(gap, f"{where}.gap")
    rungs = []
    size = lo
    while size < step:
        rungs.append(size)
        size *= 2
    rungs.extend(range(step, hi, step))
    rungs.append(lo)
    return clip_ladder(rungs, lo, hi)


_SPEC_KEYS = {"pow2": ("min", "max"), "step": ("min", "max", "gap")}


def ladder_from_spec(spec: Any, where: str) -> Ladder:
    """Build a ladder from its model.yaml form; ``where`` (e.g. ``model.yaml: buckets.tokens``)
    prefixes every error so the user sees which key is wrong."""
    if not isinstance(spec, Mapping):
        return validate_ladder(spec, where)
    forms = ", ".join(_SPEC_KEYS)
    if len(spec) != 1 or next(iter(spec)) not in _SPEC_KEYS:
        raise ConfigError(
            f"{where}: expected a list of integers or a mapping with one key out of ({forms}), "
            f"got keys {sorted(map(str, spec))}"
        )
    ((form, args),) = spec.items()
    form_where = f"{where}.{form}"
    allowed = _SPEC_KEYS[form]
    if not isinstance(args, Mapping):
        raise ConfigError(f"{form_where}: expected a mapping with keys {', '.join(allowed)}")
    for key in args:
        if key not in allowed:
            raise ConfigError(f"{form_where}.{key}: unknown key (allowed: {', '.join(allowed)})")
    for key in allowed:
        if key not in args:
            raise ConfigError(f"{form_where}.{key}: required key is missing")
    if form == "pow2":
        return pow2_ladder(args["min"], args["max"], where=form_where)
    return step_ladder(args["min"], args["max"], args["gap"], where=form_where)


def pick_bucket(ladder: Sequence[int], n: int, *, kind: str = "token") -> int:
    """The smallest bucket that holds ``n`` items (``kind`` names them in the error).

    >>> pick_bucket((16, 32, 64), 17)
    32
    """
    if n < 0:
        raise ValueError(f"cannot pick a {kind} bucket for a negative count ({n})")
    i = bisect.bisect_left(ladder, n)
    if i == len(ladder):
        largest = ladder[-1] if ladder else 0
        raise NoBucketError(f"no {kind} bucket fits {n} {kind}s; largest is {largest}")
    return ladder[i]
