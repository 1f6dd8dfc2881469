"""argparse value types shared by the commands: a seed, a positive integer, a finite float. A bad value ends as
argparse's one-line `argument --flag: ...` error with exit status 2, before any work starts."""

from __future__ import annotations

import argparse
import math

from ..checks import SEED_MAX


def seed(text: str) -> int:
    """An integer seed in [0, SEED_MAX] (numpy's range; -1 and 2**64 are refused)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {SEED_MAX}], found {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (ranges are checked by the function that takes it)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


__all__ = ["finite_float", "positive_int", "seed"]
