"""One-line checks of request fields: a bad value is a ValueError naming the field and what it must be."""

from __future__ import annotations

import math
import numbers


def check_integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> None:
    """ValueError naming the request field unless `value` is an integer (not a bool) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}={value!r}: must be an integer")
    _check_range(name, value, minimum, maximum)


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None) -> None:
    """ValueError naming the request field unless `value` is a finite real number within the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    _check_range(name, value, minimum, maximum)


def _check_range(name: str, value, minimum, maximum) -> None:
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value!r}: must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value!r}: must be <= {maximum}")
