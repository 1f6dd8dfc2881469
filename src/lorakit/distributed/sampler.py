"""The data order of a run on N processes: one permutation per epoch, seeded by (seed, epoch), split into global
micro-batches of N x b examples; rank r takes the r-th b of each, so N x b on N ranks sees what 1 x Nb sees.

    epoch order  [ 17  3  9 | 41  0 12 | ... ]      global micro-batch j: positions j*N*b .. (j+1)*N*b - 1
                   rank 0    rank 1                 rank r: positions j*N*b + r*b .. j*N*b + (r+1)*b - 1

With N > 1, positions past the epoch's end wrap to its start (every rank gets a full batch, as torch's
DistributedSampler pads); with N = 1 the last micro-batch is short, as it always was.
"""

from __future__ import annotations

import math

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of n examples for `epoch` of a run seeded with `seed` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def micro_batches_per_epoch(n: int, batch: int, world_size: int = 1) -> int:
    """Global micro-batches in one pass over n examples: ceil(n / (world_size * batch))."""
    return math.ceil(n / (batch * world_size))


def shard_positions(j: int, batch: int, n: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """Positions in the epoch order of rank `rank`'s part of global micro-batch j (see the module docstring)."""
    start = j * batch * world_size + rank * batch
    if world_size == 1:
        return list(range(start, min(start + batch, n)))
    return [p % n for p in range(start, start + batch)]
