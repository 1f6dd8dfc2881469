"""LoRA+ (Hayou, Ghosh and Yu 2024, arXiv 2402.12354): B learns `ratio` times faster than A.

    lr(A) = lr,   lr(B) = ratio · lr  (the paper's λ = ηB / ηA, default 16),   embedding adapters: lr_embedding

With A and B on one learning rate, the update of B A is dominated by one factor as the width grows; a
larger rate for B (which starts at zero) makes feature learning efficient (LoRA+, sections 3-4). The groups
follow PEFT's `create_loraplus_optimizer` for A, B and embeddings. Every other trainable parameter
(modules_to_save copies, biases, norms, DoRA's magnitude) keeps the base rate `lr`, where PEFT would give
1-D ones `ratio · lr`; biases and other 1-D parameters get no weight decay, as in transformers' Trainer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .model import lora_layers


def _check_rate(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"loraplus: {name} must be a finite number {expected}, got {value!r}")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """The LoRA+ parameter groups of `model`'s trainable parameters, each named by its "name" key.

    Groups (empty ones left out):
        "lora_A": A of every non-embedding adapter, lr;  "lora_B": their B, ratio · lr;
        "embedding": A and B of embedding adapters, lr_embedding;
        "other": other trainable parameters with 2+ dims (modules_to_save copies), lr;
        "other_no_decay": other 1-D parameters (biases, norms, DoRA magnitude), lr, weight decay 0.
    Only parameters with requires_grad count (LoRA-FA's frozen A is in no group); shared ones count once.

    Raises:
        ConfigError: lr or ratio <= 0, lr_embedding or weight_decay < 0, or no trainable adapter factor.
    """
    _check_rate("lr", lr)
    _check_rate("ratio", ratio)
    _check_rate("lr_embedding", lr_embedding, allow_zero=True)
    _check_rate("weight_decay", weight_decay, allow_zero=True)
    names = ("lora_A", "lora_B", "embedding", "other", "other_no_decay")
    groups: dict[str, list[nn.Parameter]] = {k: [] for k in names}
    seen: set[int] = set()

    def put(group: str, param: nn.Parameter) -> None:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            groups[group].append(param)

    roles = {"A": "lora_A", "B": "lora_B", "embedding": "embedding"}  # the variant's roles (param_groups)
    for layer in lora_layers(model):
        for adapter in layer.adapters.values():
            for role, params in adapter.param_groups().items():
                for param in params:
                    put(roles.get(role, "other" if param.dim() >= 2 else "other_no_decay"), param)
    if not (groups["lora_A"] or groups["lora_B"] or groups["embedding"]):
        raise ConfigError(
            "loraplus: the model has no trainable adapter parameters (lora_A / lora_B); attach() an adapter "
            "and keep it trainable first"
        )
    for param in model.parameters():
        put("other" if param.dim() >= 2 else "other_no_decay", param)
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_B": (lr * ratio, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "other": (lr, weight_decay),
        "other_no_decay": (lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    lr: float = 2e-4,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over `model`'s trainable parameters in LoRA+ groups (see `loraplus_param_groups`).

    Args:
        model: a model with lorakit adapters attached.
        optimizer_cls: any torch optimizer class whose param groups take "lr" and "weight_decay"
            (AdamW, Adam, SGD, ...).
        lr: A's learning rate (and that of other trainable parameters). ratio: B's rate is ratio · lr.
        lr_embedding: the rate of embedding adapters' A and B. weight_decay: for every group but 1-D others.
        optimizer_kwargs: passed on to `optimizer_cls` (betas, eps, momentum, ...).

    Raises:
        ConfigError: as `loraplus_param_groups`.
    """
    groups = loraplus_param_groups(model, lr, ratio, lr_embedding, weight_decay)
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)


__all__ = ["loraplus_optimizer", "loraplus_param_groups"]
