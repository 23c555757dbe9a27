"""Argument checks shared by several modules."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_int(value: Any, name: str, minimum: int) -> int:
    """`value` as an int, checked to be an integer (not a bool) >= `minimum`."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a Python int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}.")
    return value
