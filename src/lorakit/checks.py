"""Checks of the plain numbers a user gives lorakit (seeds, finite floats), shared by the library's verbs and the
command line. Each raises ConfigError naming the option, the range expected and the value found."""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's and transformers.set_seed's range (torch.manual_seed takes it too)


def check_seed(value: Any, name: str = "seed") -> int:
    """`value` as a seed: an integer in [0, SEED_MAX].

    Raises:
        ConfigError: a bool, a non-integer, a negative seed or one above SEED_MAX (named by `name`).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer in [0, {SEED_MAX}]; got {value!r}")
    return value


def check_finite(value: Any, name: str) -> float:
    """`value` as a finite float (not NaN, not +-inf).

    Raises:
        ConfigError: a bool, a non-number, NaN or an infinity (named by `name`).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


__all__ = ["SEED_MAX", "check_finite", "check_seed"]
