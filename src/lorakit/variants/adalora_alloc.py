"""AdaLoRA's rank allocator: the importance averages of one run and the masks they set, on the budget schedule
(what PEFT's RankAllocator and AdaLoraModel.update_and_allocate do; here called after each optimizer step).

    t < T - tfinal:   update Ī, Ū from |w ⊙ ∇w|; every deltaT steps past tinit, keep the b(t) best triplets
    t = T - tfinal:   keep the target budget target_r x layers (the final mask); the averages are dropped
    t > T - tfinal:   the final mask is applied again (E = 0 where masked)
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.adalora import budget_masks, budget_schedule, triplet_scores, update_importance


class AdaloraAllocator:
    """The step hook of one AdaLoRA adapter (all its layers): `after_optimizer_step(step)`, with gradients present.

    `adapters`: its AdaloraAdapter objects (lora_A, lora_E, lora_B, set_kept, reapply_mask, options)."""

    def __init__(self, adapters: list[Any]) -> None:
        self.adapters = adapters
        opts = adapters[0].schedule
        self.target_r, self.tinit, self.tfinal = opts["target_r"], opts["tinit"], opts["tfinal"]
        self.delta_t, self.total_step = opts["deltaT"], opts["total_step"]
        self.beta1, self.beta2 = opts["beta1"], opts["beta2"]
        self.init_budget = sum(a.r for a in adapters)  # PEFT: the sum of the layers' ranks
        self.target_budget = self.target_r * len(adapters)
        self.avg_ipt: list[torch.Tensor] | None = None  # Ī per tensor (A, E, B of each layer)
        self.avg_unc: list[torch.Tensor] | None = None  # Ū per tensor
        self.budget = self.init_budget  # the budget of the last masking

    def _tensors(self) -> list[torch.Tensor]:
        return [t for a in self.adapters for t in (a.lora_A, a.lora_E, a.lora_B)]

    def update_importance(self) -> None:
        """One EMA update of sensitivity and uncertainty from the current weights and gradients."""
        params = self._tensors()
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(params):  # a step without gradients (frozen or unused layer): skip it
            return
        if self.avg_ipt is None or self.avg_unc is None:
            self.avg_ipt = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            self.avg_unc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        update_importance([p.detach().float() for p in params], [g.float() for g in grads],
                          self.avg_ipt, self.avg_unc, self.beta1, self.beta2)

    def scores(self) -> list[torch.Tensor]:
        """(r,) triplet scores per layer from S = Ī ⊙ Ū."""
        assert self.avg_ipt is not None and self.avg_unc is not None
        s = [ipt * unc for ipt, unc in zip(self.avg_ipt, self.avg_unc)]
        return [triplet_scores(s[i], s[i + 1], s[i + 2]) for i in range(0, len(s), 3)]

    def mask_to(self, budget: int) -> None:
        """Keep the `budget` most important triplets across all layers (no scores yet: nothing changes)."""
        if self.avg_ipt is None:
            return
        for adapter, keep in zip(self.adapters, budget_masks(self.scores(), budget)):
            adapter.set_kept(keep)
        self.budget = budget

    def state_dict(self) -> dict[str, Any]:
        """The run state a checkpoint needs to go on exactly: the importance averages, the last budget, each layer's
        mask and its uncut Q, E, P (the adapter file holds the kept triplets only, as PEFT saves; the masked ones
        still train through the regulariser and may be kept again). CPU copies."""
        def copies(tensors: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if tensors is None else [t.detach().cpu().clone() for t in tensors]

        return {"avg_ipt": copies(self.avg_ipt), "avg_unc": copies(self.avg_unc), "budget": self.budget,
                "kept": [a.kept.detach().cpu().clone() for a in self.adapters],
                "factors": [[t.detach().cpu().clone() for t in (a.lora_A, a.lora_E, a.lora_B)] for a in self.adapters]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (`state_dict` of a run with the same layers); {} keeps the fresh state.

        Raises:
            ValueError: the state has another number of layers, or tensors of other shapes.
        """
        if not state:
            return
        if len(state["kept"]) != len(self.adapters) or len(state["factors"]) != len(self.adapters):
            raise ValueError(f"AdaLoRA state: {len(state['kept'])} layers saved, {len(self.adapters)} in this run")
        for adapter, kept, factors in zip(self.adapters, state["kept"], state["factors"]):
            live = (adapter.lora_A, adapter.lora_E, adapter.lora_B)
            for tensor, saved in zip(live, factors):
                if tuple(tensor.shape) != tuple(saved.shape):
                    raise ValueError(f"AdaLoRA state: a factor of shape {tuple(saved.shape)} saved, "
                                     f"{tuple(tensor.shape)} in this run")
                tensor.copy_(saved)
            adapter.kept.copy_(kept)
        device = self.adapters[0].lora_A.device
        for key in ("avg_ipt", "avg_unc"):
            saved = state[key]
            setattr(self, key, None if saved is None else [t.to(device) for t in saved])
        self.budget = int(state["budget"])

    def after_optimizer_step(self, step: int) -> None:
        """Update the importance and mask on the schedule (PEFT's update_and_allocate(step))."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_importance()
            budget, mask_now = budget_schedule(step, self.init_budget, self.target_budget, self.tinit, self.tfinal,
                                               self.total_step, self.delta_t)
            if mask_now:
                self.mask_to(budget)
        elif step == final:
            self.mask_to(self.target_budget)
            self.avg_ipt = self.avg_unc = None
        else:
            for adapter in self.adapters:
                adapter.reapply_mask()


__all__ = ["AdaloraAllocator"]
