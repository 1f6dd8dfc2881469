"""The step hooks of a model's adapters: what a training loop calls after each optimizer step for the variants
that act there (`abilities.step_hook`: AdaLoRA's rank allocation, Delta-LoRA's update of W0).

lorakit's Trainer calls them itself; transformers' Trainer does through lorakit.AdapterStepCallback; a loop of
one's own calls them by hand:

    hooks = lorakit.training_hooks(model)       # once, after attach, before the first step
    ...; optimizer.step()
    for hook in hooks: hook.after_optimizer_step(step)   # the gradients still present
    optimizer.zero_grad()
"""

from __future__ import annotations

from torch import nn

from .model import adapter_names, get_config
from .variants import TrainingHook, variant_for


def training_hooks(model: nn.Module) -> list[TrainingHook]:
    """One hook per attached adapter whose variant acts around the optimizer step, in attach order (none for
    LoRA, DoRA, LoRA-FA). Each hook keeps the state of one run (e.g. AdaLoRA's importance averages)."""
    hooks = []
    for name in adapter_names(model):
        variant = variant_for(get_config(model, name))
        if variant.abilities.step_hook:
            hook = variant.training_hook(model, name)
            if hook is not None:
                hooks.append(hook)
    return hooks


__all__ = ["training_hooks"]
