"""Checks of the arguments the field, the samplers and the integrations share, each raising an
error that names the argument, the value given and what is expected."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_count", "check_number", "check_window"]


def check_number(
    value: Any,
    name: str,
    *,
    minimum: float = 0.0,
    strict: bool = False,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value, ok = value.item(), True  # a 0-d tensor or numpy scalar
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and (v > minimum if strict else v >= minimum)):
        rel = ">" if strict else ">="
        raise error(f"{name} must be a finite number {rel} {minimum:g}; got {value!r}")
    return v


def check_count(value: Any, name: str, *, minimum: int = 0, error: type[Exception] = ValueError):
    """``value`` as an int ``>= minimum`` (integral floats such as 3.0 are accepted)."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        raise error(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def check_window(
    window: Any, name: str = "window", *, error: type[Exception] = ValueError
) -> tuple[float, float]:
    """``window`` as ``(t_lo, t_hi)`` with ``0 <= t_lo <= t_hi <= 1``."""
    try:
        lo, hi = window
        lo, hi = check_number(lo, name), check_number(hi, name)
    except (TypeError, ValueError):
        raise error(
            f"{name} must be a pair (t_lo, t_hi) with 0 <= t_lo <= t_hi <= 1; got {window!r}"
        ) from None
    if not 0 <= lo <= hi <= 1:
        raise error(f"{name} must satisfy 0 <= t_lo <= t_hi <= 1; got {window!r}")
    return lo, hi
