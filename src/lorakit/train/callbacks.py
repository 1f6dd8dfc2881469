"""Callbacks of the Trainer: the hooks a run calls (Callback), and the built-in ones that log, stop on a
non-finite loss, report adapter diagnostics, evaluate, checkpoint, stop early and keep the best adapter.

Hooks, in the order of a run (every hook gets the Trainer first, typed as hooks.RunState; all default to doing nothing):

    on_train_begin(trainer)
    per optimizer step:
        on_pre_optimizer_step(trainer, step, loss)   gradients unscaled and clipped, weights not yet updated
        on_step_end(trainer, out: StepOutput)        after the optimizer step: loss, lr, grad norm, tokens
        on_evaluate(trainer, step, metrics)          when a callback ran an evaluation
        on_save(trainer, step, path)                 when a checkpoint was written
    on_loop_end(trainer, step)                       the last step is done (or the run was stopped)
    on_evaluate(...)                                 the final evaluation
    on_train_end(trainer, result)                    after the final save
    on_log(trainer, record)                          each record logged (metrics.jsonl, TensorBoard, ...)

Stopping: set `trainer.should_stop = True` in any hook; the step in progress finishes (its evaluation and
checkpoint included), then the run evaluates and saves as at a normal end. Extra metrics: return a dict from
`on_step_end` (merged into the next logged step record) or from `on_evaluate` (merged into that evaluation's
record).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import ConfigError, LorakitError
from ..io.files import read_weights
from . import diagnostics as diag
from .hooks import RunState, TrainResult
from .precision import TrainingError


@dataclass
class StepOutput:
    """What one optimizer step produced (the argument of on_step_end)."""

    step: int  # the global optimizer step, from 1
    loss: float  # the step's training loss (summed over its micro-batches)
    lr: float  # the base learning rate after the step's schedule update (LoRA+: A's)
    grad_norm: torch.Tensor | None  # total norm before clipping, on the device (float() syncs); None: no clipping
    tokens: int  # non-padding tokens in the step's micro-batches


class Callback:
    """Base class: override the hooks you need. See the module docstring for order, stopping and metrics."""

    def on_train_begin(self, trainer: RunState) -> None: ...

    def on_pre_optimizer_step(self, trainer: RunState, step: int, loss: float) -> None: ...

    def on_step_end(self, trainer: RunState, out: StepOutput) -> dict[str, Any] | None: ...

    def on_evaluate(self, trainer: RunState, step: int, metrics: dict[str, float]) -> dict[str, Any] | None: ...

    def on_save(self, trainer: RunState, step: int, path: Path) -> None: ...

    def on_loop_end(self, trainer: RunState, step: int) -> None: ...

    def on_train_end(self, trainer: RunState, result: TrainResult) -> None: ...

    def on_log(self, trainer: RunState, record: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """State saved in each checkpoint (trainer_state.json, JSON values) and given back on resume."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release files and writers; called once when the run ends, also on an error."""


class NanStop(Callback):
    """Stop with TrainingError when a step's loss is not finite, before the optimizer applies it. The message names
    the newest checkpoint whose saved trainable tensors are all finite (weights can diverge a few steps before the
    loss does, so the newest checkpoint is not trusted by its step number alone), or says there is none."""

    def on_pre_optimizer_step(self, trainer: RunState, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {step}: training stopped{_resume_from(trainer)}. "
                                f"Try a lower --learning-rate or --max-grad-norm")

    def on_loop_end(self, trainer: RunState, step: int) -> None:
        """The last step's update is seen by no later loss: refuse to save weights that are not finite."""
        bad = next((name for name, p in trainer.model.named_parameters()
                    if p.requires_grad and p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
        if bad is not None:
            raise TrainingError(f"the weights became non-finite at step {step} ({bad}): training stopped before "
                                f"saving them{_resume_from(trainer)}. Try a lower --learning-rate or --max-grad-norm")


def _resume_from(trainer: RunState) -> str:
    """The tail of a divergence message: the newest checkpoint with finite weights, or why there is none."""
    candidates = run_checkpoints(trainer.out_dir, trainer.last_checkpoint)
    good = newest_finite_checkpoint(candidates, trainer.saves)
    if good is not None:
        return f"; the last good checkpoint is {good} (resume with --resume {good})"
    if candidates:
        return f"; none of the {len(candidates)} checkpoint(s) has finite weights: start again"
    return "; no checkpoint was saved"


def run_checkpoints(out_dir: Path, last: Path | None = None) -> list[Path]:
    """The run's complete checkpoints (out_dir/checkpoints/step-N), newest first, and `last` (a --resume
    checkpoint, possibly elsewhere) among them by its step number."""
    found = {p for p in (Path(out_dir) / "checkpoints").glob("step-*") if p.is_dir()}
    if last is not None and Path(last).is_dir():
        found.add(Path(last))
    return sorted(found, key=lambda p: (p.name, str(p)), reverse=True)


def tensors_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor holds only finite values (no NaN, no +-inf)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def newest_finite_checkpoint(checkpoints: list[Path], saves: str) -> Path | None:
    """The first of `checkpoints` (newest first) whose trainable tensors (adapter/ for "lora", trainable.safetensors
    for "full") can be read and are all finite; None when there is none."""
    for checkpoint in checkpoints:
        try:
            if saves == "lora":
                tensors = read_weights(checkpoint / "adapter")
            else:
                tensors = load_file(str(checkpoint / "trainable.safetensors"))
        except (LorakitError, OSError, ValueError, RuntimeError):  # unreadable: not a checkpoint to resume from
            continue
        if tensors_finite(tensors):
            return checkpoint
    return None


class Diagnostics(Callback):
    """Every `every` steps: the adapter's update and gradient ratios per layer, logged, with warnings."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.w0_norms: dict[str, float] = {}

    def on_train_begin(self, trainer: RunState) -> None:
        self.w0_norms = diag.weight_norms(trainer.model)

    def on_pre_optimizer_step(self, trainer: RunState, step: int, loss: float) -> None:
        if not self.w0_norms or step % self.every:
            return
        layers = diag.layer_diagnostics(trainer.model, self.w0_norms)
        trainer.log({"step": step, "diagnostics": diag.summarise(layers), "layers": layers})
        for warning in diag.check(layers):
            trainer.message(f"lorakit: warning: step {step}: {warning}")


class StepLog(Callback):
    """Every `every` steps (and at the last): the mean loss of the window, lr, tokens/s, epoch, grad norm and
    the metrics other callbacks returned, as one record."""

    def __init__(self, every: int, steps_per_epoch: int) -> None:
        self.every, self.steps_per_epoch = max(every, 1), steps_per_epoch
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.tokens, self.started = 0, time.perf_counter()
        self.last: StepOutput | None = None

    def on_train_begin(self, trainer: RunState) -> None:
        self._reset()

    def on_step_end(self, trainer: RunState, out: StepOutput) -> None:
        self.losses.append(out.loss)
        self.tokens += out.tokens
        self.last = out
        if out.step % self.every == 0 or out.step == trainer.total_steps:
            self.flush(trainer)

    def on_loop_end(self, trainer: RunState, step: int) -> None:
        self.flush(trainer)  # a stopped run: the steps since the last record

    def flush(self, trainer: RunState) -> None:
        if not self.losses or self.last is None:
            return
        seconds = time.perf_counter() - self.started
        record: dict[str, Any] = {"step": self.last.step, "loss": sum(self.losses) / len(self.losses),
                                  "lr": self.last.lr, "tokens_per_s": self.tokens / seconds if seconds > 0 else 0.0,
                                  "epoch": self.last.step / self.steps_per_epoch}
        if self.last.grad_norm is not None:
            record["grad_norm"] = float(self.last.grad_norm)  # one device sync per logged step
        if trainer.scaler.is_enabled():
            record["loss_scale"] = trainer.scaler.get_scale()
        record.update(trainer.pop_extra_metrics())
        trainer.log(record)
        self._reset()


class Evaluation(Callback):
    """Evaluate every `every` steps (not at the last step: the final evaluation follows it)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: RunState, out: StepOutput) -> None:
        if out.step % self.every == 0 and out.step != trainer.total_steps:
            trainer.run_evaluation(out.step)


class Checkpointing(Callback):
    """A checkpoint every `every` steps (train/checkpoint.py: atomic, the newest save_total_limit kept)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: RunState, out: StepOutput) -> None:
        if out.step % self.every == 0:
            trainer.save_checkpoint(out.step)


def lower_is_better(metric: str) -> bool:
    """eval_loss, eval_perplexity: lower is better; accuracy and anything else: higher."""
    return metric.endswith("loss") or metric.endswith("perplexity")


def improved(value: float, best: float | None, lower: bool) -> bool:
    """Whether `value` beats `best` (None: nothing yet); a NaN never improves."""
    if math.isnan(value):
        return False
    return best is None or (value < best if lower else value > best)


class BestMetric(Callback):
    """Tracks the best value of `metric` over the evaluations: early stopping (stop after `patience`
    evaluations without improvement; 0: never) and load-best (a copy of the trainable weights at the best
    evaluation, loaded back before the final save)."""

    def __init__(self, metric: str, patience: int = 0, load_best: bool = False) -> None:
        self.metric, self.patience, self.load_best = metric, patience, load_best
        self.lower = lower_is_better(metric)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0  # evaluations in a row without improvement
        self.weights: dict[str, torch.Tensor] | None = None
        self.best_checkpoint: str | None = None  # the checkpoint written at best_step, if any

    def on_evaluate(self, trainer: RunState, step: int, metrics: dict[str, float]) -> None:
        if trainer.evaluating_final:
            return  # the final evaluation decides nothing
        if self.metric not in metrics:
            raise ConfigError(f"metric_for_best_model {self.metric!r} is not among the evaluation's metrics "
                              f"({', '.join(metrics)})")
        value = metrics[self.metric]
        if improved(value, self.best, self.lower):
            self.best, self.best_step, self.bad = value, step, 0
            if self.load_best:
                self.weights = trainer.trainable_state()
            return
        self.bad += 1
        if self.patience and self.bad >= self.patience:
            trainer.should_stop = True
            trainer.message(f"early stopping at step {step}: {self.metric} has not improved on "
                            f"{self.best:.4f} (step {self.best_step}) for {self.bad} evaluations")

    def on_train_begin(self, trainer: RunState) -> None:
        if self.load_best and self.best_checkpoint:  # resumed
            trainer.keep_checkpoint = Path(self.best_checkpoint)

    def on_save(self, trainer: RunState, step: int, path: Path) -> None:
        if step == self.best_step:
            self.best_checkpoint = str(path)
            if self.load_best:
                trainer.keep_checkpoint = path  # pruning leaves it

    def on_loop_end(self, trainer: RunState, step: int) -> None:
        if not self.load_best or self.best_step is None or self.best_step == step:
            return
        if self.weights is not None:
            trainer.load_trainable_state(self.weights)
        elif self.best_checkpoint and Path(self.best_checkpoint).is_dir():  # resumed: the copy is in the checkpoint
            trainer.load_checkpoint_weights(Path(self.best_checkpoint))
        else:
            trainer.message(f"lorakit: warning: load_best_at_end: the best {self.metric} was at step "
                            f"{self.best_step} before the resume and its checkpoint is gone; saving the last step's")
            return
        trainer.message(f"load_best_at_end: the saved {trainer.saves_name} is the one of step "
                        f"{self.best_step} ({self.metric} {self.best:.4f}), not of the last step {step}")
        trainer.log({"step": step, "best_step": self.best_step, f"best_{self.metric}": self.best})

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad,
                "best_checkpoint": self.best_checkpoint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state.get("best"), state.get("best_step"), state.get("bad", 0)
        self.best_checkpoint = state.get("best_checkpoint")
