"""DistributedDataParallel for an adapter run: only the trainable parameters (requires_grad) are in DDP's reducer,
so a step all-reduces the adapter's gradients (O(r d) per layer), never the frozen base's (O(d^2)).

The frozen base is not broadcast at start (every rank loads the same checkpoint); the trainable tensors are, from
rank 0, so a rank whose init differed cannot drift. Gradient accumulation syncs only on the last micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from .env import Dist


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """`model` in DistributedDataParallel (one device per process), or `model` itself on one process.

    The reducer holds the parameters that require a gradient (DDP skips the others); every trainable parameter is
    used in each forward, so find_unused_parameters stays off. Buffers are not broadcast on each forward.
    """
    if not dist.active:
        return model
    trainable = [p for p in model.parameters() if p.requires_grad]
    dist.broadcast_tensors(trainable)  # rank 0's adapter init on every rank
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    with dist.failures("DistributedDataParallel's setup"):
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False, init_sync=False)


def sync_context(module: nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's no_sync() (FSDP2: no reduce-scatter) when this micro-batch must not synchronise gradients (all but the
    last of a step); else nothing."""
    if sync:
        return nullcontext()
    if isinstance(module, FSDPModule):
        return _fsdp_no_sync(module)
    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


@contextmanager
def _fsdp_no_sync(module: FSDPModule) -> Iterator[None]:
    module.set_requires_gradient_sync(False)  # gradients accumulate unsharded until the step's last micro-batch
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def reducer_bytes(module: nn.Module) -> int:
    """Bytes of the gradients DDP all-reduces per step: its trainable parameters' (0 for a plain module)."""
    if not isinstance(module, DistributedDataParallel):
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


__all__ = ["reducer_bytes", "sync_context", "wrap_ddp"]
