"""Checks of the arguments users pass, one way everywhere: a ValueError that names the argument,
what it must be and what was given."""

from __future__ import annotations

import math
from typing import Any


def count(name: str, value: Any, hint: str = "") -> int:
    """`value` as an int >= 1 (a bool is not one); `hint` adds what else is allowed."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{hint}, got {value!r}")
    return value


def positive(name: str, value: Any) -> float:
    """`value` as a positive finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
