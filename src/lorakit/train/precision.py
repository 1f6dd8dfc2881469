"""Precision of a training run: autocast (bf16 / fp16), loss scaling for fp16 (torch.amp.GradScaler), and the
check that stops a run whose loss scale has collapsed.

fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero. GradScaler multiplies the loss by a scale S
(2**16 at first), so backward runs on S·g; before the optimizer step the gradients are divided by S again
(`unscale_`, also before clipping). A step whose gradients hold inf / nan is skipped and S halves; after 2000
good steps in a row S doubles. bf16 has fp32's exponent range and needs no scaling.

    scaled loss S·L --backward--> S·g --unscale_--> g --clip--> step (skipped when g has inf / nan)

A scale that keeps halving means the gradients overflow whatever the scale: the run stops when S falls below
MIN_LOSS_SCALE (2**-14; from 2**16 that is 31 skipped steps in a row).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import LorakitError

MIN_LOSS_SCALE = 2.0 ** -14  # below this, gradients overflow fp16 even after dividing the loss by 16384


class TrainingError(LorakitError):
    """The run cannot go on (a NaN or inf loss, a collapsed loss scale, an unsupported precision here)."""


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to bf16 / fp16 for `precision` "bf16" / "fp16"; no autocast for "no".

    torch supports both on the CPU and on CUDA; a GPU without bf16 is refused.

    Raises:
        TrainingError: bf16 asked for on a GPU that does not support it.
    """
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision=bf16: this GPU does not support bf16; use fp16")
    return torch.autocast(device.type, dtype=dtype)


def wants_loss_scaling(precision: str, trainable: Iterable[torch.dtype],
                       frozen: Iterable[torch.dtype]) -> bool:
    """Loss scaling is on for fp16 autocast, and for fp32 trainable weights on a frozen fp16 base (the
    activations and their gradients are fp16 there too); never for bf16 or fp32, and never when a trainable
    weight is itself fp16 (GradScaler cannot unscale fp16 gradients)."""
    trainable = set(trainable)
    if torch.float16 in trainable:
        return False
    return precision == "fp16" or torch.float16 in set(frozen)


def make_scaler(precision: str, model: nn.Module, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler for `device`, enabled when `wants_loss_scaling` says so (a disabled one passes through:
    scale() returns the loss, step() is optimizer.step(), state_dict() is empty)."""
    trainable = [p.dtype for p in model.parameters() if p.requires_grad]
    frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    return torch.amp.GradScaler(device.type, enabled=wants_loss_scaling(precision, trainable, frozen))


def scale_collapsed(scale: float, floor: float = MIN_LOSS_SCALE) -> bool:
    """True when the loss scale has fallen below `floor` (every recent step overflowed)."""
    return scale < floor


def collapse_message(step: int, scale: float, skipped: int, last_checkpoint: object | None) -> str:
    """The TrainingError text for a collapsed loss scale: where, how far it fell, what to do."""
    where = f"; the last good checkpoint is {last_checkpoint}" if last_checkpoint else ""
    return (f"the fp16 loss scale collapsed to {scale:.3g} (below {MIN_LOSS_SCALE:.3g}) at step {step}, "
            f"after {skipped} skipped steps in a row: the gradients overflow fp16 at any scale. "
            f"Training stopped{where}. Try --mixed-precision bf16 (or no), a lower --learning-rate, "
            f"and check the data for extreme values")


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """scaler.step + scaler.update; True when the step was taken, False when GradScaler skipped it (inf / nan
    gradients, the scale then halves). Without loss scaling every step is taken."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


__all__ = ["MIN_LOSS_SCALE", "TrainingError", "autocast_context", "collapse_message", "make_scaler",
           "optimizer_step", "scale_collapsed", "wants_loss_scaling"]
