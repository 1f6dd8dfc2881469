"""What callbacks see of a run: `RunState`, the part of the Trainer a callback may read and call (a Protocol, so
callbacks.py and progress.py never import trainer.py), and `TrainResult`, what a run produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .config import TrainConfig


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    saved_dir: Path  # the adapter (lora) or the model (full)
    steps: int  # the last optimizer step done (fewer than planned when a callback stopped the run)
    losses: list[float] = field(default_factory=list)  # training loss of every optimizer step
    eval: dict[str, float] = field(default_factory=dict)  # final evaluation
    trainable: int = 0
    total: int = 0
    seconds: float = 0.0
    task: str = "causal-lm"
    stopped_early: bool = False  # a callback set trainer.should_stop


class RunState(Protocol):
    """The Trainer as its callbacks see it (lorakit.train.Trainer implements it)."""

    model: nn.Module
    config: TrainConfig
    out_dir: Path
    saves: str  # "lora" (checkpoints hold the adapter) or "full" (the whole trainable state)
    saves_name: str  # "adapter" or "model": the directory a checkpoint or the final save holds
    total_steps: int
    start_step: int
    scaler: Any  # torch.amp.GradScaler for fp16, else None
    last_checkpoint: Path | None
    keep_checkpoint: Path | None  # never pruned (load_best_at_end's best checkpoint)
    should_stop: bool  # set by a callback: the step in progress finishes, then the run ends
    evaluating_final: bool

    def log(self, record: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def pop_extra_metrics(self) -> dict[str, Any]: ...

    def run_evaluation(self, step: int) -> dict[str, float]: ...

    def save_checkpoint(self, step: int) -> Path: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def load_checkpoint_weights(self, directory: Path) -> None: ...
