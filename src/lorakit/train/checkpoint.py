"""Checkpoints of a training run: adapter (PEFT format) or trainable weights, optimizer, scheduler, fp16 loss
scaler, RNG states and the data position (the global step), so that `--resume` continues the exact loss curve.

A checkpoint is written to a temporary directory beside it and published with one rename (io.publish: a kill at any
instant leaves no checkpoint or a whole one under `step-N`); only then are checkpoints beyond the last K removed,
each renamed to a .tmp-* name before it is deleted, so a crash never leaves the run without its previous complete
checkpoint nor a half-deleted one under its final name (rundir.sweep_temporary clears what a crash left).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed.fsdp import copy_whole_, load_optimizer_state
from ..errors import ConfigError
from ..io import save_adapter
from ..io.files import read_weights
from ..io.peft import adapter_state
from ..io.publish import publishing
from ..model import lora_layers

STATE_NAME = "trainer_state.json"
HOOKS_NAME = "step_hooks.pt"  # the step hooks' run state (AdaLoRA: importance averages, masks, uncut factors)
BASE_NAME = "base_weights.safetensors"  # the adapted layers' base weights, for variants that train them (Delta-LoRA)
# TrainConfig fields that change the trajectory: a checkpoint only resumes a run that agrees on all of them
TRAJECTORY_FIELDS = (
    "model", "data", "task", "eval_data", "eval_fraction", "max_length", "packing", "completion_only", "method",
    "method_options",
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init", "learning_rate", "weight_decay",
    "loraplus_ratio", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_grad_norm", "epochs", "max_steps", "mixed_precision", "dtype", "seed",
)


TMP_PREFIX = ".tmp-"  # temporary directories: being written, or being deleted
HORIZON_FIELDS = ("max_steps", "epochs")  # may change on resume: a run may continue for longer
# may change on resume when their product with the number of processes (the global batch) does not
SPLIT_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")


class ResumeError(ConfigError):
    """A --resume directory that is not a checkpoint, a corrupt one, or one made by a different run."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Path, step: int, model: nn.Module, method: str, optimizer: torch.optim.Optimizer,
    scheduler: Any, trainer_state: dict[str, Any], keep: int, scaler: torch.amp.GradScaler | None = None,
    protect: Path | None = None, weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None, hook_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint `step` under root/checkpoints/, then prune all but the newest `keep` (and `protect`,
    the best checkpoint load_best_at_end keeps). `hook_states`: the step hooks' `state_dict()`s, in
    adapter_steps.training_hooks order (written to step_hooks.pt when any is non-empty).

    optimizer.pt holds the optimizer, the scheduler, the RNG states and the loss scaler's state (scale and
    growth tracker; empty when loss scaling is off). `weights` / `optimizer_state`: the adapter's tensors and the
    optimizer's state gathered from an FSDP-sharded model (distributed.fsdp), instead of the model's own.
    """
    final = step_dir(root, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    # the run's out directory is locked by the caller (loop.train / Trainer.fit): no lock of its own
    with publishing(final, carry=False, lock=False) as tmp:
        if method == "lora":
            # as trained (PiSSA / OLoRA: the residual form the resumed run attaches again), not for serving
            save_adapter(model, tmp / "adapter", convert_to_lora=False, vllm_check=False, state_dict=weights)
            moved = moved_base_weights(model)  # Delta-LoRA: the base weights training changed
            if moved:
                save_file({k: v.detach().cpu().contiguous() for k, v in moved.items()}, str(tmp / BASE_NAME))
            if hook_states and any(hook_states):
                torch.save(hook_states, tmp / HOOKS_NAME)
        else:
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "global_step": step}, indent=1))
    done = sorted(p for p in parent.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if protect is None or old != Path(protect):
            remove_by_renaming(old)
    return final


def moved_base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<layer path>.base_layer.weight": weight} of the layers whose adapter's variant changes W0 in training
    (abilities.trains_base: Delta-LoRA); empty for every other adapter."""
    out: dict[str, torch.Tensor] = {}
    for layer in lora_layers(model):
        if any(adapter.abilities.trains_base for adapter in layer.adapters.values()):
            out[f"{layer.path}.base_layer.weight"] = layer.base_layer.weight
    return out


def step_dir(root: Path, step: int) -> Path:
    """Where checkpoint `step` of the run in `root` lives: root/checkpoints/step-NNNNNNN."""
    return Path(root) / "checkpoints" / f"step-{step:07d}"


def remove_by_renaming(path: Path, parent: Path | None = None) -> None:
    """Delete `path` (a checkpoint, or any file or directory): renamed to a .tmp-* name in `parent` (default:
    its own directory) first, so an interruption never leaves it half-deleted under its real name (only a
    temporary entry, swept at the next start by rundir.sweep_temporary)."""
    aside = (parent or path.parent) / f"{TMP_PREFIX}removed-{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def read_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state of a lorakit checkpoint, checked for shape (not yet against a run's settings).

    Raises:
        ResumeError: not a directory, no trainer_state.json, unreadable or corrupt JSON, a foreign checkpoint
            (e.g. transformers' Trainer: no lorakit "config"), or a weights / optimizer file missing.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ResumeError(f"--resume {directory}: no such checkpoint directory")
    path = directory / STATE_NAME
    if not path.is_file():
        raise ResumeError(f"--resume {directory}: not a lorakit checkpoint (no {STATE_NAME})")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ResumeError(f"--resume {directory}: unreadable {path.name} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ResumeError(f"--resume {directory}: {path.name} is not a lorakit checkpoint's (expected a 'config' "
                          f"mapping; a transformers Trainer checkpoint? resume it with the tool that wrote it)")
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ResumeError(f"--resume {directory}: {path.name}: global_step must be an integer >= 0; got {step!r}")
    weights = ("trainable.safetensors",) if state["config"].get("method") == "full" else ("adapter",)
    for name in (*weights, "optimizer.pt"):
        if not (directory / name).exists():
            raise ResumeError(f"--resume {directory}: incomplete checkpoint, {name} is missing")
    return state


def global_batch(config: dict[str, Any], world_size: int) -> int:
    """Examples per optimizer step over all processes: per-device batch x accumulation steps x processes."""
    return config["per_device_train_batch_size"] * config["gradient_accumulation_steps"] * world_size


def read_state(directory: Path, config: dict[str, Any], world_size: int = 1) -> dict[str, Any]:
    """The trainer state of checkpoint `directory`, after checking it belongs to this run. The horizon
    (max_steps, epochs) may differ: a resumed run may train for longer (see rundir.schedule_horizon). So may
    the number of processes, the per-device batch and the accumulation steps, as long as the global batch
    (their product) is the checkpoint's: the data position is the global step, which then names the same examples.

    Raises:
        ResumeError: not a lorakit checkpoint (foreign, corrupt JSON, no global_step), or a trajectory setting
            differs (the message names it, with both values), or the global batch does (with what gives it back).
    """
    state = read_checkpoint_state(directory)
    saved = state["config"]
    _check_global_batch(directory, saved, state.get("world_size", 1), config, world_size)
    for name in TRAJECTORY_FIELDS:
        if name in HORIZON_FIELDS or name in SPLIT_FIELDS:
            continue
        if name in saved and saved[name] != config.get(name):
            raise ResumeError(
                f"--resume {directory} does not match this run: {name} was {saved[name]!r} there, "
                f"{config.get(name)!r} now"
            )
    max_steps = config.get("max_steps", -1)
    if isinstance(max_steps, int) and 0 < max_steps < state["global_step"]:
        raise ResumeError(f"--resume {directory}: max_steps {max_steps} ends before the checkpoint's step "
                          f"{state['global_step']}; give a larger --max-steps")
    return state


def _check_global_batch(directory: Path, saved: dict[str, Any], saved_world: int, config: dict[str, Any],
                        world_size: int) -> None:
    if not all(name in saved for name in SPLIT_FIELDS):
        return
    before, now = global_batch(saved, saved_world), global_batch(config, world_size)
    if before == now:
        return
    per_device = before // (config["gradient_accumulation_steps"] * world_size)
    hint = (f"; on {world_size} process(es) give --per-device-train-batch-size {per_device}"
            if per_device * config["gradient_accumulation_steps"] * world_size == before else "")
    raise ResumeError(
        f"--resume {directory} does not match this run: the global batch (per-device batch x accumulation steps x "
        f"processes) was {before} there ({saved['per_device_train_batch_size']} x "
        f"{saved['gradient_accumulation_steps']} x {saved_world}), {now} now "
        f"({config['per_device_train_batch_size']} x {config['gradient_accumulation_steps']} x {world_size}){hint}")


def restore(directory: Path, model: nn.Module, method: str, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: torch.amp.GradScaler | None = None) -> None:
    """Load weights, optimizer, scheduler, loss scaler and RNG states from checkpoint `directory` into the run.

    A checkpoint without scaler state (one written before fp16 loss scaling existed) leaves the run's fresh
    scaler as it is.

    Raises:
        ResumeError: the checkpoint's adapter has other modules than the run's, or a file of the checkpoint is
            missing, truncated or corrupt (the file is named).
    """
    if method == "lora":
        moved = moved_base_weights(model)
        if moved:  # Delta-LoRA: W0 as the checkpoint's step left it
            base = _load(directory / BASE_NAME, lambda f: load_file(str(f)))
            if set(base) != set(moved):
                raise ResumeError(f"--resume {directory}: {BASE_NAME} holds other layers than this run's")
            with torch.no_grad():
                for key, tensor in moved.items():
                    copy_whole_(tensor, base[key])
        saved = read_weights(directory / "adapter")
        live = adapter_state(model, "default")
        if set(saved) != set(live):
            raise ResumeError(f"--resume {directory}: the adapter in the checkpoint has other modules than this run's")
        uncut = (directory / HOOKS_NAME).is_file()  # AdaLoRA: the step hooks' state holds the uncut factors
        for key, tensor in live.items():
            if tuple(saved[key].shape) != tuple(tensor.shape) and not uncut:  # AdaLoRA's file cut to kept triplets
                raise ResumeError(f"--resume {directory}: {key} has shape {tuple(saved[key].shape)} in the checkpoint, "
                                  f"{tuple(tensor.shape)} in this run (and no {HOOKS_NAME} with the uncut factors)")
        with torch.no_grad():
            for key, tensor in live.items():
                if tuple(saved[key].shape) == tuple(tensor.shape):
                    copy_whole_(tensor, saved[key])  # an FSDP shard takes its rows of the full tensor
    else:
        weights = _load(directory / "trainable.safetensors", lambda f: load_file(str(f)))
        params = dict(model.named_parameters())
        if not set(weights) <= set(params):
            raise ResumeError(f"--resume {directory}: trainable.safetensors has parameters this model lacks")
        with torch.no_grad():
            for name, tensor in weights.items():
                copy_whole_(params[name], tensor)
    blob = _load(directory / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
    try:
        load_optimizer_state(optimizer, blob["optimizer"])  # full tensors, cut to this rank's shard under FSDP
        scheduler.load_state_dict(blob["scheduler"])
        if scaler is not None and scaler.is_enabled() and blob.get("scaler"):
            scaler.load_state_dict(blob["scaler"])
        set_rng_state(blob["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ResumeError(f"--resume {directory}: optimizer.pt does not fit this run "
                          f"({type(err).__name__}: {err})") from err


def read_hook_states(directory: Path) -> list[dict[str, Any]]:
    """The step hooks' states saved in checkpoint `directory` ([] when it has none: a run without step hooks, or
    one written before they were saved).

    Raises:
        ResumeError: the file is unreadable.
    """
    path = Path(directory) / HOOKS_NAME
    if not path.is_file():
        return []
    return list(_load(path, lambda f: torch.load(f, map_location="cpu", weights_only=True)))


def _load(path: Path, read: Any) -> Any:
    """read(path), with a missing or corrupt file reported as a ResumeError naming it."""
    if not path.is_file():
        raise ResumeError(f"--resume {path.parent}: incomplete checkpoint, {path.name} is missing")
    try:
        return read(path)
    except Exception as err:  # torch.load / safetensors raise many types for a truncated or foreign file
        raise ResumeError(f"--resume {path.parent}: cannot read {path.name} ({type(err).__name__}: "
                          f"{str(err)[:200]})") from err
