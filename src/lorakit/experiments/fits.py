"""Least-squares fits and summaries of an experiment's numbers: the seeds' claim that quality grows like a ln r + b.

    x_i = ln r_i,   a = sum (x_i - x̄)(y_i - ȳ) / sum (x_i - x̄)^2,   b = ȳ - a x̄
    R^2 = 1 - sum (y_i - (a x_i + b))^2 / sum (y_i - ȳ)^2       (computed, never assumed)
    gain per doubling of r = a ln 2

Pure functions on plain floats (no torch, no numpy needed); each degenerate case has a clear value and a reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class LogFit:
    """metric ≈ a ln r + b over n points (one per run: seeds are separate points)."""

    a: float | None  # slope per unit of ln r (None: fewer than 2 distinct r)
    b: float | None  # intercept: the fitted value at r = 1
    r2: float | None  # coefficient of determination (None: undefined, see reason)
    gain_per_doubling: float | None  # a ln 2: what each doubling of r adds
    n: int  # points fitted
    distinct_r: int  # distinct ranks among them
    reason: str | None = None  # why a, b or R^2 is None

    def predict(self, r: float) -> float | None:
        """a ln r + b (None without a fit)."""
        return None if self.a is None or self.b is None else self.a * math.log(r) + self.b

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_points(rs: Sequence[float], values: Sequence[float]) -> None:
    if len(rs) != len(values):
        raise ConfigError(f"fit_log: {len(rs)} ranks but {len(values)} values")
    for r, y in zip(rs, values):
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ConfigError(f"fit_log: every r must be a finite number > 0 (ln r); got {r!r}")
        if not (isinstance(y, (int, float)) and math.isfinite(y)):
            raise ConfigError(f"fit_log: every value must be a finite number; got {y!r} at r={r}")


def fit_log(rs: Sequence[float], values: Sequence[float]) -> LogFit:
    """The least-squares fit values ≈ a ln r + b, its R^2 and the gain per doubling a ln 2.

    Degenerate inputs: no point or one distinct r -> a, b, R^2 None (a line through ln r is not determined); values
    all equal -> a = 0, b = the value, R^2 None (sum (y - ȳ)^2 = 0: R^2 is undefined, the fit is exact).

    Raises:
        ConfigError: lengths differ, an r <= 0 or not finite, a value not finite.
    """
    _check_points(rs, values)
    n, distinct = len(rs), len(set(rs))
    if distinct < 2:
        return LogFit(None, None, None, None, n, distinct,
                      reason=f"{'no point' if n == 0 else 'one distinct r'}: a ln r + b is not determined")
    xs = [math.log(r) for r in rs]
    x_mean, y_mean = sum(xs) / n, sum(values) / n
    sxx = sum((x - x_mean) ** 2 for x in xs)
    sxy = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, values))
    a = sxy / sxx
    b = y_mean - a * x_mean
    ss_tot = sum((y - y_mean) ** 2 for y in values)
    if ss_tot == 0.0:
        return LogFit(0.0, y_mean, None, 0.0, n, distinct,
                      reason="the values are all equal: R^2 = 1 - SS_res / SS_tot is undefined (SS_tot = 0)")
    ss_res = sum((y - (a * x + b)) ** 2 for x, y in zip(xs, values))
    return LogFit(a, b, 1.0 - ss_res / ss_tot, a * math.log(2.0), n, distinct)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with n - 1); std None for fewer than 2 values, both None for none."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def gain(means: dict[int, float], r_from: int, r_to: int) -> float | None:
    """means[r_to] - means[r_from] (None if either rank is missing)."""
    if r_from not in means or r_to not in means:
        return None
    return means[r_to] - means[r_from]


def largest_pair(ranks: Sequence[int]) -> tuple[int, int] | None:
    """The two largest distinct ranks (smaller first): (32, 64) for 1..64; None for fewer than two."""
    distinct = sorted(set(ranks))
    return (distinct[-2], distinct[-1]) if len(distinct) >= 2 else None


def relative(value: float | None, reference: float | None, higher_is_better: bool) -> float | None:
    """value against a reference as a share: value / reference when higher is better (accuracy), reference / value
    when lower is better (loss); None when either is missing or the divisor is 0."""
    if value is None or reference is None:
        return None
    num, den = (value, reference) if higher_is_better else (reference, value)
    return num / den if den != 0 else None


__all__ = ["LogFit", "fit_log", "gain", "largest_pair", "mean_std", "relative"]
