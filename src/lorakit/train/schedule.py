"""Learning-rate schedules: linear warm-up from 0, then cosine or linear decay to 0, or constant."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at optimizer step `i` (0-based), for LambdaLR."""

    def factor(i: int) -> float:
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (i - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor
