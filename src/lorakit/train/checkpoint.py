"""Checkpoints of a training run: adapter (PEFT format) or trainable weights, optimizer, scheduler, fp16 loss
scaler, RNG states and the data position (the global step), so that `--resume` continues the exact loss curve.

A checkpoint is written to a temporary directory and renamed into place; only then are checkpoints beyond
the last K removed, so a crash never leaves the run without its previous complete checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import LorakitError
from ..io import save_adapter
from ..io.files import read_weights
from ..io.peft import adapter_state

STATE_NAME = "trainer_state.json"
# TrainConfig fields that change the trajectory: a checkpoint only resumes a run that agrees on all of them
TRAJECTORY_FIELDS = (
    "model", "data", "task", "eval_data", "eval_fraction", "max_length", "packing", "completion_only", "method",
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "init", "learning_rate", "weight_decay",
    "loraplus_ratio", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "max_grad_norm", "epochs", "max_steps", "mixed_precision", "dtype", "seed",
)


class ResumeError(LorakitError):
    """A --resume directory that is not a checkpoint, or one made by a different run."""


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
) -> Path:
    """Write checkpoint `step` under root/checkpoints/, then prune all but the newest `keep`.

    optimizer.pt holds the optimizer, the scheduler, the RNG states and the loss scaler's state (scale and
    growth tracker; empty when loss scaling is off).
    """
    parent = root / "checkpoints"
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=parent))
    try:
        if method == "lora":
            # as trained (PiSSA / OLoRA: the residual form the resumed run attaches again), not for serving
            save_adapter(model, tmp / "adapter", convert_to_lora=False, vllm_check=False)
        else:
            trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rng_state()},
                   tmp / "optimizer.pt")
        (tmp / STATE_NAME).write_text(json.dumps({**trainer_state, "global_step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted(p for p in parent.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The trainer state of checkpoint `directory`, after checking it belongs to this run.

    Raises:
        ResumeError: not a checkpoint, or a trajectory setting differs (the message names it).
    """
    path = directory / STATE_NAME
    if not path.is_file():
        raise ResumeError(f"--resume {directory}: not a lorakit checkpoint (no {STATE_NAME})")
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeError(f"--resume {directory}: unreadable {STATE_NAME}: {err}") from err
    saved = state.get("config", {})
    for name in TRAJECTORY_FIELDS:
        if name in saved and saved[name] != config.get(name):
            raise ResumeError(
                f"--resume {directory} does not match this run: {name} was {saved[name]!r} there, "
                f"{config.get(name)!r} now"
            )
    return state


def restore(directory: Path, model: nn.Module, method: str, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: torch.amp.GradScaler | None = None) -> None:
    """Load weights, optimizer, scheduler, loss scaler and RNG states from checkpoint `directory` into the run.

    A checkpoint without scaler state (one written before fp16 loss scaling existed) leaves the run's fresh
    scaler as it is.

    Raises:
        ResumeError: the checkpoint's adapter has other modules than the run's.
    """
    if method == "lora":
        saved = read_weights(directory / "adapter")
        live = adapter_state(model, "default")
        if set(saved) != set(live):
            raise ResumeError(f"--resume {directory}: the adapter in the checkpoint has other modules than this run's")
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(saved[key])
    else:
        weights = load_file(str(directory / "trainable.safetensors"))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
    blob = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    if scaler is not None and scaler.is_enabled() and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    set_rng_state(blob["rng"])
