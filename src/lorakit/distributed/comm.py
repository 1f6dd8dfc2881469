"""What DDP sends: a communication hook that counts the bytes all-reduced per step, then averages as DDP does.

With LoRA only the adapter's gradients are in DDP's reducer, so a step sends O(r d) per layer instead of O(d^2).
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations are the real classes
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from ..errors import ConfigError


@dataclass
class ByteCounter:
    """State of the counting hook: bytes of the gradient buckets all-reduced, per backward that synchronised.

    A step ends with the bucket DDP marks last (`GradBucket.is_last()`); micro-batches run under `no_sync()`
    send nothing and count nothing.
    """

    process_group: dist.ProcessGroup | None = None  # None: the default (WORLD) group
    bytes_per_step: int = 0  # bytes all-reduced by the last completed step
    steps: int = 0  # completed (synchronised) steps since the last reset
    total_bytes: int = 0  # bytes all-reduced since the last reset
    buckets_per_step: int = 0  # buckets in the last completed step
    _pending_bytes: int = field(default=0, repr=False)  # the step in progress
    _pending_buckets: int = field(default=0, repr=False)

    def record(self, buffer: torch.Tensor, last: bool) -> None:
        """Add one bucket's flat gradient buffer; `last` closes the step."""
        self._pending_bytes += buffer.numel() * buffer.element_size()
        self._pending_buckets += 1
        if last:
            self.bytes_per_step, self.buckets_per_step = self._pending_bytes, self._pending_buckets
            self.total_bytes += self._pending_bytes
            self.steps += 1
            self._pending_bytes = self._pending_buckets = 0

    def reset(self) -> None:
        """Forget every count (the process group stays)."""
        self.bytes_per_step = self.steps = self.total_bytes = self.buckets_per_step = 0
        self._pending_bytes = self._pending_buckets = 0


def counting_allreduce_hook(state: ByteCounter, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: count `bucket`'s bytes in `state`, then all-reduce and average (DDP's default)."""
    state.record(bucket.buffer(), bucket.is_last())
    return allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]  # None means WORLD


def install_byte_counter(
    ddp_model: nn.Module, process_group: dist.ProcessGroup | None = None
) -> ByteCounter:
    """Register the counting hook on `ddp_model` (before its first backward) and return its counter.

        ddp = DistributedDataParallel(model); counter = install_byte_counter(ddp)
        loss.backward(); counter.bytes_per_step   # == sum(p.numel() * p.element_size()) of trainable params

    Raises:
        ConfigError: `ddp_model` is not a torch.nn.parallel.DistributedDataParallel (found type named), or a
            communication hook is already registered on it (DDP allows one).
    """
    if not isinstance(ddp_model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            "install_byte_counter(ddp_model): expected a torch.nn.parallel.DistributedDataParallel, "
            f"found {type(ddp_model).__name__}"
        )
    counter = ByteCounter(process_group=process_group)
    try:
        ddp_model.register_comm_hook(counter, counting_allreduce_hook)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"install_byte_counter: DDP refused the hook: {err}") from err
    return counter


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of the parameters that require a gradient: what DDP's reducer all-reduces per step."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def full_finetune_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (each counted once): what full fine-tuning would all-reduce per step."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def square_layer_ratio(hidden: int, r: int) -> float:
    """Gradient elements of a d x d weight over its rank-r adapter's (A: r x d, B: d x r): d^2 / (2 r d)."""
    if hidden <= 0 or r <= 0:
        raise ConfigError(f"square_layer_ratio: hidden and r must be positive, found hidden={hidden}, r={r}")
    return hidden * hidden / (2 * r * hidden)
