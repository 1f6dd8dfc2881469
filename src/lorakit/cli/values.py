"""argparse value types shared by the commands: a seed, a positive integer, a finite float. A bad value ends as
argparse's one-line `argument --flag: ...` error with exit status 2, before any work starts."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from ..checks import SEED_MAX


def _checked(text: str, convert: type, ok: Callable[[float], bool], expected: str) -> Any:
    """`convert(text)` when it parses and passes `ok`, else argparse's error naming what was expected."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, found {text!r}")
    return value


def seed(text: str) -> int:
    """An integer seed in [0, SEED_MAX] (numpy's range; -1 and 2**64 are refused)."""
    return _checked(text, int, lambda v: 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _checked(text, int, lambda v: v > 0, "a positive integer")


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (ranges are checked by the function that takes it)."""
    return _checked(text, float, math.isfinite, "a finite number")


__all__ = ["finite_float", "positive_int", "seed"]
