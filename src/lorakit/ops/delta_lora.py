"""Delta-LoRA's update of the base weight as pure functions (Zi et al. 2023, arXiv 2309.02411, Algorithm 1).

    after optimizer step t >= K:   W0 <- W0 + λ s (B_{t+1} A_{t+1} - B_t A_t)

The difference of two rank-r products has rank <= 2r, so it is one GEMM of stacked factors added into W0 in place:

    [B_{t+1}, -B_t] (d, 2r)  @  [A_{t+1}; A_t] (2r, k)   ──addmm_──►  W0 (d, k)   (no d × k temporary for fp32 W0)

The stacked factors live in one fp32 buffer pair per layer (`DeltaFactors`): the old halves hold -B_t and A_t, the
new halves are overwritten with B_{t+1}, A_{t+1} at each step. A low-precision W0 (bf16 / fp16) is updated through
an fp32 copy of the layer's weight, the sum rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DeltaFactors:
    """The stacked factors of one layer, fp32: left = [B_new, -B_old] (d, 2r), right = [A_new; A_old] (2r, k')."""

    left: torch.Tensor  # (d, 2r): columns :r the new B, r: the old B negated
    right: torch.Tensor  # (2r, k'): rows :r the new A, r: the old A (k' = k · kernel for convolutions)

    @property
    def r(self) -> int:
        return self.right.shape[0] // 2


def new_delta_factors(lora_A: torch.Tensor, lora_B: torch.Tensor) -> DeltaFactors:
    """Buffers for a pair A (r, k, *kernel), B (d, r, *ones) whose old halves hold the current A and -B."""
    r = lora_A.shape[0]
    a2, b2 = lora_A.detach().flatten(1), lora_B.detach().flatten(1)  # (r, k'), (d, r)
    left = torch.empty(b2.shape[0], 2 * r, dtype=torch.float32, device=b2.device)  # (d, 2r)
    right = torch.empty(2 * r, a2.shape[1], dtype=torch.float32, device=a2.device)  # (2r, k')
    factors = DeltaFactors(left, right)
    load_new(factors, lora_A, lora_B)
    roll(factors)
    return factors


@torch.no_grad()
def load_new(factors: DeltaFactors, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """The new halves <- the current A and B (cast to fp32)."""
    r = factors.r
    factors.left[:, :r].copy_(lora_B.detach().flatten(1))
    factors.right[:r].copy_(lora_A.detach().flatten(1))


@torch.no_grad()
def roll(factors: DeltaFactors) -> None:
    """The old halves <- the new ones (B negated): the reference for the next step's difference."""
    r = factors.r
    torch.neg(factors.left[:, :r], out=factors.left[:, r:])
    factors.right[r:].copy_(factors.right[:r])


@torch.no_grad()
def add_low_rank_(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float, layout: str) -> None:
    """weight += alpha · left @ right, in place, in the weight's layout.

    Args:
        weight: W0, "dk" (d, k, *kernel: nn.Linear, nn.ConvNd) or "kd" (k, d: GPT-2 Conv1D, nn.Embedding).
        left: (d, m) fp32.  right: (m, k') fp32, k' = k · kernel.
        alpha: the factor (λ s for Delta-LoRA).
        layout: "dk" or "kd".

    An fp32 contiguous weight takes one addmm_ into itself; any other dtype (or a strided weight) goes through an
    fp32 copy of the weight, the sum rounded once into it.

    Raises:
        ValueError: an unknown layout.
    """
    if layout not in ("dk", "kd"):
        raise ValueError(f"add_low_rank_: layout must be 'dk' or 'kd', got {layout!r}")
    direct = weight.dtype == torch.float32 and weight.is_contiguous()
    target = weight if direct else weight.float()
    if layout == "dk":
        target.view(target.shape[0], -1).addmm_(left, right, alpha=alpha)  # (d, k') += α (d, m) @ (m, k')
    else:
        target.addmm_(right.t(), left.t(), alpha=alpha)  # (k, d) += α (k, m) @ (m, d)
    if not direct:
        weight.copy_(target)


@torch.no_grad()
def delta_lora_step_(weight: torch.Tensor, layout: str, factors: DeltaFactors, lora_A: torch.Tensor,
                     lora_B: torch.Tensor, alpha: float, move: bool) -> None:
    """One step of Delta-LoRA on one layer: W0 += alpha (B A - B_old A_old) if `move`, then A, B become the old.

    Args:
        weight: W0 in `layout` ("dk" / "kd", see add_low_rank_).
        factors: the layer's buffers (their old halves: the A, B of the previous call).
        lora_A, lora_B: the adapter's factors after the optimizer step.
        alpha: λ s.
        move: False before update_start_step: only the reference is renewed.
    """
    load_new(factors, lora_A, lora_B)
    if move:
        add_low_rank_(weight, factors.left, factors.right, alpha, layout)
    roll(factors)


__all__ = ["DeltaFactors", "add_low_rank_", "delta_lora_step_", "load_new", "new_delta_factors", "roll"]
