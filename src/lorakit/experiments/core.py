"""The core of `lorakit experiment`: the task every experiment trains on (the embedded MiniLM / docstring default or a
user's --model and --data), one training run through `lorakit train`'s loop, the resumable cell store and the
progress line.

An experiment is a grid of cells (a rank and a seed, a method, a subspace dimension, ...). Each cell is one call of
`train_run` (or a few) whose JSON-able result `CellStore.run` saves atomically under out/cells/, so an interrupted
experiment run again with the same settings starts where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..demo.stdlib_docs import DEFAULT_PACKAGES
from ..errors import ConfigError, DataError
from ..io.publish import publishing
from ..train.trainer import Trainer
from .cells import CellStore, Progress, duration, run_cell, settings_difference

DEFAULT_NAME = "embedded MiniLM / stdlib docstrings"
# The embedded default (lorakit.demo's task, smaller): sized so that one LoRA run of `steps` steps takes ~40 s on a
# 2-core CPU (0.7 s a step; full fine-tuning 1.6 s) and the default rank sweep (7 ranks + full fine-tuning, 2 seeds)
# stays within 15 minutes; 48 steps of 16 are ~0.9 epoch of the 7 x 120 training docstrings.
EMBEDDED: dict[str, Any] = {"packages": DEFAULT_PACKAGES, "max_train_per_label": 120, "max_test_per_label": 40, "max_length": 32,
            "batch_size": 16, "steps": 48}
EMBEDDED_QUICK: dict[str, Any] = {"packages": ("email", "logging", "unittest"), "max_train_per_label": 60, "max_test_per_label": 20,
                  "max_length": 24, "batch_size": 16, "steps": 12}
# every task: the optimisation (lorakit.demo's settings: LoRA 2e-3, full fine-tuning 1e-4, VeRA 4e-3)
COMMON: dict[str, Any] = {"eval_batch_size": 64, "warmup_ratio": 0.06, "lr_scheduler_type": "linear", "weight_decay": 0.0,
          "max_grad_norm": 1.0, "lora_scale": 2.0, "lora_dropout": 0.05,
          "learning_rates": {"adapter": 2e-3, "full": 1e-4, "vera": 4e-3}}
EVAL_FRACTION = 0.2  # a user's data: the share held out for evaluation (a permutation fixed by the seed)


# -- the task -----------------------------------------------------------------------------------------------------
@dataclass
class Task:
    """What every experiment trains on: a base model, its tokenizer, train / eval records and the settings."""

    name: str  # "embedded MiniLM / stdlib docstrings", or "<model> on <data>"
    model_name: str  # a model directory or ID (the embedded default: lorakit.demo.minilm.model_dir())
    kind: str  # "classification" | "causal-lm"
    train_records: list[dict]  # lorakit train's records ({text, label}, {text}, {prompt, completion}, ...)
    eval_records: list[dict]  # held out: the metric is measured on these
    tokenizer: Any
    metric: str  # "eval_accuracy" (classification) or "eval_loss" (causal LM)
    higher_is_better: bool
    settings: dict  # JSON-able: max_length, batch_size, steps, learning_rates, target_modules, device, quick, ...
    labels: list[str] = field(default_factory=list)  # classification: the label names, sorted

    def fresh_model(self, seed: int) -> nn.Module:
        """A new copy of the base model on the CPU; classification: with a new head drawn from `seed` (a
        torch.Generator; the random state of the process is restored after transformers' own head init)."""
        from ..loading import load_model

        with torch.random.fork_rng(devices=[]):
            if self.kind == "classification":
                model = _load_classifier(self.model_name, self.labels, self.settings["dtype"])
                seed_head(model, seed)
                return model
            return load_model(self.model_name, task="causal-lm", dtype=self.settings["dtype"], device="cpu")

    def describe(self) -> dict[str, Any]:
        """The task for results.json: name, model, kind, metric, example counts, labels, settings."""
        return {"name": self.name, "model": self.model_name, "kind": self.kind, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "train_examples": len(self.train_records),
                "eval_examples": len(self.eval_records), "labels": self.labels, "settings": self.settings}


def _load_classifier(model_name: str, labels: list[str], dtype: str) -> nn.Module:
    from ..demo import minilm
    from ..loading import load_model

    if Path(model_name) == minilm.model_dir():
        return minilm.load_classifier(labels)  # no seed: seed_head draws the head
    return load_model(model_name, task="classification", num_labels=len(labels), dtype=dtype, device="cpu")


def seed_head(model: nn.Module, seed: int) -> None:
    """Draw the classification head's Linear layers anew: weight ~ N(0, initializer_range^2) from
    torch.Generator(seed), bias 0 (what transformers does for a new head, reproducibly)."""
    from ..train.loop import HEAD_NAMES

    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in HEAD_NAMES:
            head = getattr(model, name, None)
            for module in head.modules() if isinstance(head, nn.Module) else ():
                if isinstance(module, nn.Linear):
                    weight = torch.randn(module.weight.shape, generator=gen) * std
                    module.weight.copy_(weight.to(module.weight.dtype))
                    if module.bias is not None:
                        module.bias.zero_()


def load_task(model: str | None, data: str | None, quick: bool, seed: int = 0, device: str = "auto") -> Task:
    """The task of an experiment: the embedded default (MiniLM on standard-library docstrings) when both `model`
    and `data` are None, else the user's model (a directory or ID) trained on `data` (any file `lorakit train
    --data` reads: {text, label} records make a classification task measured by accuracy, every other format a
    causal LM measured by eval loss); EVAL_FRACTION of it is held out by a permutation fixed by `seed`.

    Raises:
        ConfigError: only one of model / data given; a device that is not there.
        DataError: unreadable data, records of mixed formats, too few records to hold out an eval split.
        ModelDirError / LorakitError: a model (or the embedded one's package) that cannot be found.
    """
    from ..loading.options import resolve_device

    if (model is None) != (data is None):
        given, missing = ("--model", "--data") if data is None else ("--data", "--model")
        raise ConfigError(f"{given} needs {missing}: give both (your model and your data) or neither (the embedded "
                          f"default: MiniLM on the standard library's docstrings)")
    device = str(resolve_device(device))  # "auto" -> "cuda" or "cpu": the settings name the device used
    settings: dict[str, Any] = {**COMMON, "quick": quick, "device": device,
                                "dtype": "fp32" if device == "cpu" else "auto"}
    if model is None:
        return _embedded_task(settings, quick)
    return _user_task(str(model), str(data), settings, quick, seed)


def _embedded_task(settings: dict[str, Any], quick: bool) -> Task:
    from ..demo import minilm
    from ..demo.settings import LORA_TARGETS
    from ..demo.stdlib_docs import build_dataset

    size = EMBEDDED_QUICK if quick else EMBEDDED
    data = build_dataset(size["packages"], max_train_per_label=size["max_train_per_label"],
                         max_test_per_label=size["max_test_per_label"])
    settings.update({**size, "packages": list(size["packages"]), "target_modules": list(LORA_TARGETS)})
    return Task(name=DEFAULT_NAME, model_name=str(minilm.model_dir()), kind="classification",
                train_records=data.train, eval_records=data.test, tokenizer=minilm.load_tokenizer(),
                metric="eval_accuracy", higher_is_better=True, settings=settings, labels=list(data.labels))


def default_steps(n_train: int, batch_size: int, quick: bool) -> int:
    """Optimizer steps on a user's data: 3 epochs (quick: 1), at least 10 and at most 300 (quick: 40) steps."""
    epochs, low, high = (1, 10, 40) if quick else (3, 10, 300)
    return int(min(high, max(low, math.ceil(epochs * n_train / batch_size))))


def _user_task(model: str, data: str, settings: dict[str, Any], quick: bool, seed: int) -> Task:
    from ..loading import load_tokenizer
    from ..train.data import detect_format, split_records
    from ..train.readers import data_paths, read_many

    paths = data_paths(data)
    if not paths:
        raise DataError("--data: no file given")
    records = read_many(paths)
    fmt = detect_format(records, paths[0])
    kind = "classification" if fmt == "classification" else "causal-lm"
    train, held = split_records(records, EVAL_FRACTION, seed)
    train_records, eval_records = [dict(r) for r in train], [dict(r) for r in held]
    labels = sorted({str(r["label"]) for r in records}) if kind == "classification" else []
    if kind == "classification" and len(labels) < 2:
        raise DataError(f"{paths[0]}: classification needs at least 2 labels; found {labels}")
    batch = 16 if kind == "classification" else 8
    settings.update({"max_length": 128 if kind == "classification" else 256, "batch_size": batch,
                     "steps": default_steps(len(train_records), batch, quick), "target_modules": "all-linear",
                     "data": [str(Path(p)) for p in paths], "eval_fraction": EVAL_FRACTION, "split_seed": seed})
    return Task(name=f"{model} on {', '.join(paths)}", model_name=model, kind=kind, train_records=train_records,
                eval_records=eval_records, tokenizer=load_tokenizer(model),
                metric="eval_accuracy" if kind == "classification" else "eval_loss",
                higher_is_better=kind == "classification", settings=settings, labels=labels)


# -- one training run -----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What one training run produced."""

    metric: float  # task.metric on the eval records after training
    metrics: dict  # the final evaluation + steps, first_loss, last_loss (mean of the last 10), train_seconds
    trainable: int  # trainable parameters
    total: int  # all parameters (adapter included)
    seconds: float  # wall time of the whole run: loading, training, evaluation, saving
    peak_memory_bytes: int | None  # GPU: peak allocated; CPU: the process's peak resident set during the run
    out_dir: Path  # the run's `lorakit train` directory: metrics.jsonl, train_config.yaml, checkpoints/, adapter/
    saved_dir: Path | None = None  # out_dir/adapter (PEFT), out_dir/model (full), out_dir/trainable (custom)
    model: nn.Module | None = None  # the trained model, for analysis (None once released)

    def release(self) -> None:
        """Drop the trained model (memory)."""
        self.model = None


def learning_rate_for(task: Task, method: str) -> float:
    """The task's learning rate of `method`: full fine-tuning's, VeRA's, or every other adapter's."""
    rates = task.settings["learning_rates"]
    return float(rates.get(method, rates["adapter"]))


def run_config(task: Task, method: str, *, seed: int, out_dir: Path, r: int = 8, lora_alpha: float | None = None,
               learning_rate: float | None = None, steps: int | None = None, save_steps: int | None = None,
               method_options: dict | None = None, target_modules: list[str] | str | None = None,
               lora_dropout: float | None = None) -> Any:
    """The TrainConfig of one run (what `lorakit train` would be given). method "custom" trains as "full" (the
    trainable parameters are the caller's: see train_run). lora_alpha default: lora_scale x r (s = alpha / r stays
    the task's lora_scale at every rank); Delta-LoRA's dropout is 0 (it refuses dropout).

    Raises:
        ConfigError: an invalid value (TrainConfig's checks, by field name).
    """
    from ..train.config import TrainConfig

    s = task.settings
    steps = int(steps or s["steps"])
    dropout = s["lora_dropout"] if lora_dropout is None else lora_dropout
    return TrainConfig(
        model=task.model_name, out=str(out_dir), overwrite=True, task=task.kind,
        method="full" if method == "custom" else method, method_options=dict(method_options or {}),
        max_length=s["max_length"], r=r, lora_alpha=lora_alpha if lora_alpha is not None else s["lora_scale"] * r,
        lora_dropout=0.0 if method == "delta_lora" else dropout,
        target_modules=target_modules if target_modules is not None else s["target_modules"],
        learning_rate=learning_rate if learning_rate is not None else learning_rate_for(task, method),
        max_steps=steps, per_device_train_batch_size=s["batch_size"], per_device_eval_batch_size=s["eval_batch_size"],
        warmup_ratio=s["warmup_ratio"], lr_scheduler_type=s["lr_scheduler_type"], weight_decay=s["weight_decay"],
        max_grad_norm=s["max_grad_norm"], seed=seed, logging_steps=max(1, steps // 4), diagnostics_steps=0,
        save_steps=save_steps or 0, save_total_limit=max(2, steps // save_steps + 1) if save_steps else 2,
        device=s["device"], progress=True, dtype=s["dtype"],
    )


def train_run(task: Task, method: str, *, seed: int, out_dir: Path, r: int = 8, lora_alpha: float | None = None,
              learning_rate: float | None = None, steps: int | None = None, save_steps: int | None = None,
              method_options: dict | None = None, model: nn.Module | None = None,
              configure: Callable[[nn.Module], None] | None = None, callbacks: list | None = None,
              target_modules: list[str] | str | None = None, lora_dropout: float | None = None) -> RunResult:
    """One run of `method` on `task` through `lorakit train`'s loop (lorakit.train.loop.train: metrics.jsonl, the
    final adapter / model and, every `save_steps`, out_dir/checkpoints/step-NNNNNNN, all kept), evaluated on the
    task's eval records. The process's random state is restored afterwards.

    method: lora | dora | adalora | vera | lora_fa | delta_lora | full, or "custom".
    model: the model to train instead of task.fresh_model(seed).
    configure(model): called after the adapter is attached and before the optimizer is built: it may freeze or
        unfreeze parameters, set factors (e.g. a frozen random B: `lora_B.requires_grad_(False)`), wrap modules.
    method "custom": nothing is attached; the caller's `model` trains exactly the parameters it left with
        requires_grad (e.g. one d-dimensional subspace vector); checkpoints and the final save (out_dir/trainable/
        trainable.safetensors) hold those parameters only.
    callbacks: lorakit.train.Callback instances (e.g. to record the factors every N steps in memory).
    Peak memory: on Linux the process's resident-set high-water mark (VmHWM) is reset at the start of the run
    (lorakit.train.memory.PeakMemory), so a caller reading VmHWM itself sees it restart there.

    Raises:
        ConfigError: method "custom" without a model, an invalid setting (by name), no trainable parameter.
        TrainingError: a NaN / inf loss.
    """
    from ..train.memory import PeakMemory

    if method == "custom" and model is None:
        raise ConfigError("train_run: method 'custom' trains the caller's model: pass model=")
    cfg = run_config(task, method, seed=seed, out_dir=out_dir, r=r, lora_alpha=lora_alpha,
                     learning_rate=learning_rate, steps=steps, save_steps=save_steps, method_options=method_options,
                     target_modules=target_modules, lora_dropout=lora_dropout)
    memory = PeakMemory().start()
    started = time.perf_counter()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        from ..train.loop import Setup, train

        model = model if model is not None else task.fresh_model(seed)
        custom = method == "custom"  # nothing attached; the final save holds the trainable parameters alone
        setup = Setup(attach=not custom, configure=configure, trainer_cls=_TrainableOnlyTrainer if custom else Trainer)
        result = train(cfg, model=model, tokenizer=task.tokenizer, train_records=task.train_records,
                       eval_records=task.eval_records, callbacks=callbacks, setup=setup)
    seconds = time.perf_counter() - started
    peak = memory.stop()
    losses = result.losses or [float("nan")]
    metrics = {**result.eval, "steps": result.steps, "first_loss": losses[0],
               "last_loss": sum(losses[-10:]) / len(losses[-10:]), "train_seconds": result.seconds}
    if task.metric not in result.eval:
        raise ConfigError(f"train_run: the run reported no {task.metric} (eval records: {len(task.eval_records)})")
    return RunResult(metric=float(result.eval[task.metric]), metrics=metrics, trainable=result.trainable,
                     total=result.total, seconds=seconds,
                     peak_memory_bytes=int(peak.get("peak_gpu_bytes", peak["peak_rss_bytes"])),
                     out_dir=Path(out_dir), saved_dir=Path(result.saved_dir), model=model)


class _TrainableOnlyTrainer(Trainer):
    """A Trainer whose final save is the trainable parameters alone (a custom run: no adapter, no full model)."""

    def _save_final(self, weights: dict[str, torch.Tensor] | None) -> Path:
        saved = self.out_dir / "trainable"
        with publishing(saved, carry=False, lock=False) as tmp:  # the out directory is locked by fit
            state = {n: t.contiguous() for n, t in self.trainable_state().items()}
            save_file(state, str(tmp / "trainable.safetensors"))
        return saved


__all__ = ["COMMON", "EMBEDDED", "EMBEDDED_QUICK", "CellStore", "Progress", "RunResult", "Task", "default_steps",
           "duration", "learning_rate_for", "load_task", "run_cell", "run_config", "seed_head", "settings_difference",
           "train_run"]
