"""The Trainer: the optimisation loop of `lorakit train` (AdamW or a given optimizer, warm-up + decay, gradient
accumulation and clipping, autocast and fp16 loss scaling) with callbacks for everything around it.

The data order is a function of (seed, epoch) and the position is the global step, so a resumed run draws
the same batches, the same dropout masks (RNG states are restored) and reproduces the loss curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import model as M
from ..adapter_steps import training_hooks
from ..distributed import fsdp
from ..distributed.ddp import sync_context, wrap_ddp
from ..distributed.env import Dist
from ..errors import ConfigError
from ..heap import tune_for_training
from ..io import save_adapter
from ..io.delta_lora import save_delta_lora
from ..io.lock import directory_lock
from ..io.publish import publishing
from ..optim import loraplus_optimizer
from ..variants import variant_for
from . import checkpoint as ckpt
from . import precision, rundir
from .batching import Batches, default_collate, evaluate, to_device
from .callbacks import (
    BestMetric,
    Callback,
    Checkpointing,
    Diagnostics,
    Evaluation,
    NanStop,
    StepLog,
    StepOutput,
    newest_finite_checkpoint,
    run_checkpoints,
)
from .config import TrainConfig
from .hooks import TrainResult
from .loggers import make_loggers
from .precision import TrainingError, autocast_context
from .progress import Progress
from .schedule import lr_factor


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: one learning rate, or LoRA+ groups when loraplus_ratio is set."""
    if cfg.loraplus_ratio is not None:
        return loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.learning_rate, ratio=cfg.loraplus_ratio,
                                  weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


class Trainer:
    """Train `model`'s trainable parameters (an attached adapter, or all of them for full fine-tuning) on
    tokenised examples, as `config` describes; `fit()` runs, calls the callbacks and returns a TrainResult.

    Built-in callbacks come from the config (NaN stop, diagnostics, step log, evaluation, early stopping /
    load-best, checkpoints, progress, loggers); `callbacks` run after the first two and before the step log,
    so the metrics they return are in the step's record. Stop a run with `trainer.should_stop = True`.

    Args:
        model: the model, adapters attached; it is moved to nothing (place it on `device` first).
        config: a TrainConfig (out, steps, optimisation, logging, evaluation and checkpoint settings).
        train_data: tokenised examples (dicts of input_ids / labels / attention_mask lists), as collate takes.
        eval_data: tokenised validation examples, or None.
        callbacks: user callbacks (lorakit.train.Callback subclasses).
        collate: examples -> a batch of tensors (default: right padding for the task).
        task: "causal-lm" or "classification" (evaluation metrics).
        tokenizer: saved next to a fully fine-tuned model.
        optimizer: default: AdamW (LoRA+ groups with loraplus_ratio).
        dist: the run's processes (lorakit.distributed.process_group); default: this process alone. With several,
            the model trains in DistributedDataParallel (or, sharded with lorakit.distributed.fsdp.shard_model
            before it is given here, as it is: FSDP2) and rank 0 alone writes files and prints.

    Raises:
        ConfigError: early stopping or load_best_at_end without validation data; report_to naming a missing
            package; no trainable parameter; an FSDP-sharded model with fp16 loss scaling or full fine-tuning.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: list[Any], eval_data: list[Any] | None = None,
                 callbacks: list[Callback] | None = None, *, collate: Callable | None = None,
                 task: str = "causal-lm", tokenizer: Any = None, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | None = None, dist: Dist | None = None) -> None:
        cfg = self.config = config
        self.model, self.task, self.tokenizer = model, task, tokenizer
        self.train_data, self.eval_data = list(train_data), list(eval_data or [])
        self.collate = collate or default_collate(task, model)
        self.device = device or next(model.parameters()).device
        self.out_dir = Path(cfg.out)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("Trainer: the model has no trainable parameter (attach an adapter first)")
        if (cfg.early_stopping_patience or cfg.load_best_at_end) and not self.eval_data:
            raise ConfigError("early_stopping_patience / load_best_at_end need validation data: give eval_data "
                              "or eval_fraction > 0 (found none)")
        self.saves = "full" if cfg.method == "full" else "lora"  # checkpoints hold the whole model or the adapter
        self.saves_name = "model" if self.saves == "full" else "adapter"
        self.sharded = fsdp.is_sharded(model)  # FSDP2: parameters are DTensor shards; saving gathers them
        self.dist = dist or Dist.single(self.device)
        self.batches = Batches(self.train_data, cfg.per_device_train_batch_size, cfg.seed, self.collate,
                               self.dist.rank, self.dist.world_size)
        self.steps_per_epoch = math.ceil(self.batches.per_epoch / cfg.gradient_accumulation_steps)
        warmup, self.total_steps = rundir.schedule_horizon(cfg, None, self.steps_per_epoch)
        self.optimizer = optimizer or build_optimizer(model, cfg)
        self.schedule = lr_factor(cfg.lr_scheduler_type, warmup, self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = precision.make_scaler(cfg.mixed_precision, model, self.device)  # fp16: loss scaling
        if self.sharded and (self.scaler.is_enabled() or self.saves == "full"
                             or M.get_config(model, "default").residual_init):
            raise ConfigError("Trainer: an FSDP-sharded model trains LoRA / DoRA / LoRA-FA adapters in bf16 or fp32: "
                              "fp16 loss scaling, full fine-tuning and PiSSA / OLoRA (saving needs the whole base "
                              "weights) are not supported with FSDP; train those with DDP (do not shard the model)")
        self.start_step, self.losses = 0, []
        self.last_checkpoint: Path | None = None
        self.keep_checkpoint: Path | None = None  # never pruned (load_best_at_end's best checkpoint)
        self.should_stop = self.evaluating_final = False
        self._skipped = 0  # optimizer steps skipped in a row by the loss scaler (inf / nan gradients)
        self._extra: dict[str, Any] = {}
        self.progress = Progress(bar=cfg.progress)
        self.callbacks = self._default_callbacks(callbacks or [])
        self.step_hooks: list[Any] = []  # variants acting after the optimizer step (AdaLoRA, Delta-LoRA): fit() makes them
        self.resumed_hook_states: list[dict[str, Any]] = []  # their state in the --resume checkpoint
        # what forward runs through: DDP all-reduces the gradients; a sharded model reduce-scatters its own
        self.train_model = model if self.sharded else wrap_ddp(model, self.dist)

    def _default_callbacks(self, user: list[Callback]) -> list[Callback]:
        cfg = self.config
        pre: list[Callback] = [NanStop()]
        if self.saves == "lora" and cfg.diagnostics_steps:
            pre.append(Diagnostics(cfg.diagnostics_steps))
        post: list[Callback] = [StepLog(cfg.logging_steps, self.steps_per_epoch)]
        if cfg.eval_steps and self.eval_data:
            post.append(Evaluation(cfg.eval_steps))
        if cfg.early_stopping_patience or cfg.load_best_at_end:
            post.append(BestMetric(cfg.metric_for_best_model, cfg.early_stopping_patience, cfg.load_best_at_end))
        if cfg.save_steps:
            post.append(Checkpointing(cfg.save_steps))
        return [*pre, *user, *post] + [self.progress] * self.dist.is_main

    # -- what callbacks call ------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Hand a record to every callback's on_log (metrics.jsonl, TensorBoard, W&B, the plain progress line)."""
        for callback in self.callbacks:
            callback.on_log(self, record)

    def message(self, text: str) -> None:
        """A line for the user, written above the progress bar (by rank 0 only)."""
        if self.dist.is_main:
            self.progress.write(text)

    def pop_extra_metrics(self) -> dict[str, Any]:
        """The metrics callbacks returned from on_step_end since the last step record."""
        extra, self._extra = self._extra, {}
        return extra

    def run_evaluation(self, step: int) -> dict[str, float]:
        """Evaluate on eval_data, call on_evaluate (returned dicts join the metrics), log and print them."""
        metrics = evaluate(self.model, self.eval_data, self.collate, self.config, self.task, self.device)
        if not metrics:
            return metrics
        for callback in self.callbacks:
            extra = callback.on_evaluate(self, step, metrics)
            if extra:
                metrics.update(extra)
        self.log({"step": step, **metrics})
        self.message(("final eval: " if self.evaluating_final else f"eval at step {step}: ") + _fmt(metrics))
        return metrics

    def save_checkpoint(self, step: int) -> Path:
        """Write checkpoint `step` (train/checkpoint.py; rank 0 writes, the others wait) with the callbacks' state
        and the number of processes; call on_save."""
        state = {"config": self.config.to_dict(), "losses": self.losses, "world_size": self.dist.world_size,
                 "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks if cb.state_dict()}}
        # FSDP: every rank takes part in gathering the adapter and the optimizer's moments; rank 0 writes them
        weights = fsdp.adapter_state_dict(self.model) if self.sharded else None
        moments = fsdp.gathered_optimizer_state(self.optimizer) if self.sharded else None
        hook_states = [hook.state_dict() for hook in self.step_hooks]
        self.last_checkpoint = self.dist.on_main(lambda: ckpt.save_checkpoint(
            self.out_dir, step, self.model, self.saves, self.optimizer, self.scheduler, state,
            self.config.save_total_limit, self.scaler, protect=self.keep_checkpoint, weights=weights,
            optimizer_state=moments, hook_states=hook_states)) or ckpt.step_dir(self.out_dir, step)
        for callback in self.callbacks:
            callback.on_save(self, step, self.last_checkpoint)
        return self.last_checkpoint

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable parameters (on the CPU), by name."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor)

    def load_checkpoint_weights(self, directory: Path) -> None:
        """The trainable weights of checkpoint `directory` into the model (its optimizer and RNG states too:
        called at the end of a run, when they no longer matter).

        Raises:
            ResumeError: the checkpoint's adapter has other modules than the model's.
        """
        ckpt.restore(directory, self.model, self.saves, self.optimizer, self.scheduler, self.scaler)
        self._load_hook_states(ckpt.read_hook_states(directory))

    def _load_hook_states(self, states: list[dict[str, Any]]) -> None:
        """The step hooks' run state from a checkpoint ([]: each goes on from the loaded weights).

        Raises:
            ResumeError: the checkpoint's hook states do not fit this run's adapters.
        """
        if states and len(states) != len(self.step_hooks):
            raise ckpt.ResumeError(f"the checkpoint holds the state of {len(states)} step hook(s), this run has "
                              f"{len(self.step_hooks)}")
        for hook, state in zip(self.step_hooks, states or [{}] * len(self.step_hooks)):
            try:
                hook.load_state_dict(state)
            except (KeyError, TypeError, ValueError) as err:
                raise ckpt.ResumeError(f"the checkpoint's step hook state does not fit this run ({err})") from err

    def resume(self, directory: Path) -> None:
        """Continue from checkpoint `directory`: weights, optimizer, scheduler, scaler, RNG, callbacks' state.

        Raises:
            ResumeError: not a checkpoint, or one from a run with other trajectory settings.
        """
        state = ckpt.read_state(directory, self.config.to_dict(), self.dist.world_size)
        # a raised --max-steps: the schedule is recomputed for the new total, with the first run's warm-up
        warmup, self.total_steps = rundir.schedule_horizon(self.config, state["config"], self.steps_per_epoch)
        self.schedule = lr_factor(self.config.lr_scheduler_type, warmup, self.total_steps)
        self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
        ckpt.restore(directory, self.model, self.saves, self.optimizer, self.scheduler, self.scaler)
        self.resumed_hook_states = ckpt.read_hook_states(directory)  # loaded once fit() has made the hooks
        self.start_step, self.losses = state["global_step"], list(state.get("losses", []))
        self.last_checkpoint = directory
        saved = state.get("callbacks", {})
        for callback in self.callbacks:
            if type(callback).__name__ in saved:
                callback.load_state_dict(saved[type(callback).__name__])

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train from `start_step` (0, or the resumed checkpoint's) to total_steps or until a callback stops.

        On the CPU this fixes glibc's malloc thresholds for the process (lorakit.tune_cpu_allocator: freed step
        memory is reused instead of faulted in again); LORAKIT_KEEP_HEAP=0 leaves malloc alone.

        The out directory is locked for the whole run (io.lock; re-entrant when lorakit.train already holds it; on
        several processes, by rank 0).

        Raises:
            TrainingError: a non-finite loss, or a collapsed fp16 loss scale (the last checkpoint is named).
            DirectoryLockedError: another live process is training into (or writing) the out directory.
            DistributedError: several processes: another one stopped, or did not answer within ddp_timeout.
        """
        if not self.dist.active:
            with directory_lock(self.out_dir, purpose="lorakit Trainer.fit"):
                return self._fit()
        with ExitStack() as lock:
            self.dist.on_main(lambda: lock.enter_context(directory_lock(self.out_dir, purpose="lorakit Trainer.fit")))
            return self._fit()

    def _fit(self) -> TrainResult:
        cfg = self.config
        tune_for_training(str(self.device))
        loggers = make_loggers(cfg.report_to, self.out_dir, cfg.to_dict()) if self.dist.is_main else []
        self.callbacks.extend(loggers)
        step, final = self.start_step, {}
        self.step_hooks = training_hooks(self.model)  # after a resume: they start from the checkpoint's weights
        self._load_hook_states(self.resumed_hook_states)  # and its run state (AdaLoRA's averages, masks, factors)
        try:
            for callback in self.callbacks:
                callback.on_train_begin(self)
            self.model.train()
            started = time.perf_counter()
            for step in range(self.start_step + 1, self.total_steps + 1):
                with self.dist.failures(f"step {step}", self._resume_hint):  # several processes: one stopped
                    self._step(step)
                if self.should_stop:
                    break
            seconds = time.perf_counter() - started
            for callback in self.callbacks:
                callback.on_loop_end(self, step)
            self.evaluating_final = True
            final = self.run_evaluation(step) if self.eval_data else {}
            saved = self.save_final()
            trainable, total = M.trainable_parameters(self.model)
            result = TrainResult(out_dir=self.out_dir, saved_dir=saved, steps=step, losses=self.losses, eval=final,
                                 trainable=trainable, total=total, seconds=seconds, task=self.task,
                                 stopped_early=self.should_stop)
            for callback in self.callbacks:
                callback.on_train_end(self, result)
        finally:
            for callback in self.callbacks:
                callback.close()
            del self.callbacks[len(self.callbacks) - len(loggers):]
        return result

    def _step(self, step: int) -> None:
        cfg, accumulate = self.config, self.config.gradient_accumulation_steps
        step_loss, tokens = 0.0, 0
        for micro in range(accumulate):
            batch = self.batches((step - 1) * accumulate + micro)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0  # on the CPU: no sync
            batch = to_device(batch, self.device)
            with sync_context(self.train_model, micro == accumulate - 1):  # DDP: all-reduce on the last only
                with autocast_context(cfg.mixed_precision, self.device):
                    loss = self.train_model(**batch).loss / accumulate
                self.scaler.scale(loss).backward()
            step_loss += loss.item()
        if self.dist.active:  # the loss logged is the mean over ranks, the tokens their sum
            total_loss, tokens_sum = self.dist.sum([step_loss, float(tokens)])
            step_loss, tokens = total_loss / self.dist.world_size, int(tokens_sum)
        self.scaler.unscale_(self.optimizer)  # true gradients for clipping and diagnostics (no-op without scaling)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        grad_norm = fsdp.whole(grad_norm) if grad_norm is not None else None  # FSDP: the norm over all shards
        for callback in self.callbacks:
            callback.on_pre_optimizer_step(self, step, step_loss)
        if precision.optimizer_step(self.scaler, self.optimizer):
            self.scheduler.step()  # as transformers' Trainer: a skipped step does not advance the schedule
            self._skipped = 0
            for hook in self.step_hooks:  # the gradients still present (AdaLoRA's importance reads them)
                hook.after_optimizer_step(step)
        else:
            self._skipped += 1
            if precision.scale_collapsed(self.scaler.get_scale()):
                good = newest_finite_checkpoint(run_checkpoints(self.out_dir, self.last_checkpoint), self.saves)
                raise TrainingError(precision.collapse_message(step, self.scaler.get_scale(), self._skipped, good))
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(step_loss)
        out = StepOutput(step=step, loss=step_loss, lr=cfg.learning_rate * self.schedule(self.scheduler.last_epoch),
                         grad_norm=grad_norm, tokens=tokens)
        for callback in self.callbacks:
            extra = callback.on_step_end(self, out)
            if extra:
                self._extra.update(extra)

    def _resume_hint(self) -> str:
        last = self.last_checkpoint
        return f"; the last checkpoint is {last} (--resume {last})" if last else "; no checkpoint was saved"

    def save_final(self) -> Path:
        """The adapter (PiSSA / OLoRA converted to a plain LoRA on the original weights) or the full model; on
        several processes rank 0 writes it while the others wait."""
        weights = fsdp.adapter_state_dict(self.model) if self.sharded else None  # FSDP: gathered by every rank
        saved = self.dist.on_main(lambda: self._save_final(weights), share=True)
        self.message(f"saved {self.saves_name} to {saved}")
        return saved

    def _save_final(self, weights: dict[str, torch.Tensor] | None) -> Path:
        lora = M.get_config(self.model, "default") if self.saves == "lora" else None
        if lora is not None and (variant_for(lora).abilities.trains_base or lora.init == "loftq"):
            # the base changed (Delta-LoRA in training, LoftQ at init): out/model (merged, loads with
            # from_pretrained alone), out/base (W0' / Q) and out/adapter (on that base)
            save_delta_lora(self.model, self.out_dir, tokenizer=self.tokenizer, with_base=True)
            return self.out_dir / "model"
        if self.saves == "lora":
            convert = M.get_config(self.model, "default").residual_init
            saved = save_adapter(self.model, self.out_dir / "adapter", convert_to_lora=convert, state_dict=weights)
        else:
            saved = self.out_dir / "model"
            with publishing(saved, carry=False, lock=False) as tmp:  # one rename; out is locked by fit
                self.model.save_pretrained(tmp)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
        return saved


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
