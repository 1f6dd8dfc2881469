"""The data side of the Trainer: which examples micro-batch m holds (Batches: a function of seed, epoch and rank),
the default collate of a task, and evaluation on the validation set."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..distributed.sampler import epoch_order, micro_batches_per_epoch, shard_positions
from .config import TrainConfig
from .precision import autocast_context


class Batches:
    """Micro-batch `m` of the run: epoch m // per_epoch, drawn from a permutation seeded by (seed, epoch); on
    `world_size` processes, rank `rank`'s share of global micro-batch m (distributed.sampler)."""

    def __init__(self, examples: list[Any], batch_size: int, seed: int, collate: Any, rank: int = 0,
                 world_size: int = 1) -> None:
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world_size = rank, world_size
        self.per_epoch = micro_batches_per_epoch(len(examples), batch_size, world_size)
        self._order: tuple[int, torch.Tensor] | None = None

    def __call__(self, m: int) -> dict[str, torch.Tensor]:
        epoch, j = divmod(m, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.seed, epoch))
        positions = shard_positions(j, self.batch_size, len(self.examples), self.rank, self.world_size)
        return self.collate([self.examples[i] for i in self._order[1][positions].tolist()])


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Any], collate: Any, cfg: TrainConfig, task: str,
             device: torch.device) -> dict[str, float]:
    """LM: token-weighted loss and perplexity. Classification: loss and accuracy."""
    if not examples:
        return {}
    was_training = model.training
    model.eval()
    total_loss = weight = correct = 0.0
    with autocast_context(cfg.mixed_precision, device):
        for start in range(0, len(examples), cfg.per_device_eval_batch_size):
            batch = to_device(collate(examples[start:start + cfg.per_device_eval_batch_size]), device)
            output = model(**batch)
            if task == "classification":
                n = batch["labels"].numel()
                correct += (output.logits.argmax(-1) == batch["labels"]).sum().item()
            else:
                n = (batch["labels"][:, 1:] != -100).sum().item()  # tokens that carry loss
            total_loss += output.loss.float().item() * n
            weight += n
    model.train(was_training)
    loss = total_loss / max(weight, 1)
    if task == "classification":
        return {"eval_loss": loss, "eval_accuracy": correct / max(weight, 1)}
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}


def default_collate(task: str, model: nn.Module) -> Callable[[list[Any]], dict[str, torch.Tensor]]:
    """Right-padding collate of the task, padded with the model's pad_token_id (0 when it has none)."""
    from .data import collate_classification, collate_lm

    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    fn = collate_classification if task == "classification" else collate_lm
    return lambda batch: fn(batch, pad_id)


__all__ = ["Batches", "default_collate", "evaluate", "to_device"]
