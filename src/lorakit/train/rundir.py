"""A run's output directory: which checkpoint `--resume` means, the configuration a checkpoint carries, and the
rule that a second run never mixes with the first (refused, or the first cleared with `--overwrite`).

    runs/x/                      (--out)
      train_config.yaml  metrics.jsonl  adapter/ | model/
      checkpoints/step-0000040/  checkpoints/step-0000080/     (the newest is what `--resume` alone means)
      .tmp-*                     (temporary: a checkpoint or an output being deleted; swept at the next start)
      .<name>.lorakit-tmp-<pid>-*  (io.publish: a checkpoint / adapter / model being written; swept at the next start)
    runs/.x.lorakit-lock         (io.lock: held by the run for its whole duration; a second run is refused)

Resuming with a larger max_steps: the LR schedule is recomputed for the new horizon and continued from the
checkpoint's step, with the warm-up the first run had (`schedule_horizon`): lr(t) = peak * f(t; warmup, new total),
so cosine / linear decay is stretched to end at the new max_steps (the rate at the resume step rises to the
longer schedule's value there); a constant schedule is unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..distributed.env import launch_env
from ..errors import ConfigError
from ..io.publish import delete_entry, sweep_leftovers
from . import checkpoint as ckpt
from .checkpoint import TMP_PREFIX, ResumeError, read_checkpoint_state, remove_by_renaming
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
RUN_OUTPUTS = ("metrics.jsonl", CHECKPOINTS, "adapter", "model", "train_config.yaml")  # what a run writes
USED_MARKERS = ("metrics.jsonl", CHECKPOINTS, "adapter", "model")  # any of these: the directory holds a run
LEGACY_TMP = ".step-"  # temporary checkpoint directories of earlier versions
LATEST = "latest"


def checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints under out_dir/checkpoints, oldest first (temporary directories are not listed)."""
    parent = Path(out_dir) / CHECKPOINTS
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob("step-*") if p.is_dir())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in out_dir, or None when it has none."""
    found = checkpoints(out_dir)
    return found[-1] if found else None


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint directory cfg.resume names: None when not resuming; "latest" (a bare `--resume`) the
    newest checkpoint in cfg.out; else the given directory. The checkpoint is checked (read_checkpoint_state).

    Raises:
        ResumeError: "latest" with no checkpoint in cfg.out, or a missing / corrupt / foreign checkpoint.
    """
    if not cfg.resume:
        return None
    if cfg.resume == LATEST:
        found = latest_checkpoint(cfg.out)
        if found is None:
            raise ResumeError(f"--resume latest: no checkpoint in {Path(cfg.out) / CHECKPOINTS} (save some with "
                              f"--save-steps N, or give --out the run's directory)")
        directory = found
    else:
        directory = Path(cfg.resume)
    read_checkpoint_state(directory)
    return directory


def resume_config(checkpoint: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The configuration to continue checkpoint's run with: the one saved in the checkpoint, then `overrides`
    (the options given now; no need to repeat the first run's). resume is set to the checkpoint.

    Raises:
        ResumeError: the checkpoint is unreadable or foreign, an override changes a setting of the trajectory
            (named, with both values), or the new horizon ends before the checkpoint's step.
        ConfigError: the saved configuration plus overrides is invalid.
    """
    checkpoint = Path(checkpoint)
    saved = read_checkpoint_state(checkpoint)["config"]
    known = {name: value for name, value in saved.items() if name in TrainConfig.__dataclass_fields__}
    values = {**known, **overrides, "resume": str(checkpoint)}
    values.pop("overwrite", None)  # a resumed run continues its directory; never clears it
    try:
        cfg = TrainConfig(**values)
    except TypeError as err:
        raise ConfigError(f"--resume {checkpoint}: invalid training option: {err}") from err
    # the trajectory's settings unchanged (the global batch over this launch's processes); the horizon past the step
    ckpt.read_state(checkpoint, cfg.to_dict(), launch_env().world_size)
    return cfg


def schedule_horizon(cfg: TrainConfig, saved: dict[str, Any] | None, steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, total steps) of the LR schedule. A fresh run: from cfg. A resumed run (saved: the
    checkpoint's config): the total from cfg (a raised --max-steps), the warm-up the first run had."""
    total = _total_steps(cfg.max_steps, cfg.epochs, steps_per_epoch)
    source = saved if saved is not None else {"max_steps": cfg.max_steps, "epochs": cfg.epochs,
                                              "warmup_steps": cfg.warmup_steps, "warmup_ratio": cfg.warmup_ratio}
    first_total = _total_steps(source["max_steps"], source["epochs"], steps_per_epoch)
    warmup = source["warmup_steps"] or int(source["warmup_ratio"] * first_total)
    return warmup, total


def _total_steps(max_steps: int, epochs: float, steps_per_epoch: int) -> int:
    return max_steps if max_steps > 0 else math.ceil(epochs * steps_per_epoch)


def used_outputs(out_dir: str | Path) -> list[str]:
    """The names in out_dir that show a run already wrote there: metrics.jsonl, adapter, model, and checkpoints
    when it holds a complete one (only temporary directories: a run that crashed before its first checkpoint)."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    return [name for name in USED_MARKERS
            if (checkpoints(out) if name == CHECKPOINTS else (out / name).exists())]


def check_out_dir(cfg: TrainConfig, resume_dir: Path | None = None) -> None:
    """Refuse a run into an --out that holds another run, before anything is written. Resuming from one of
    out's own checkpoints continues that run and is allowed; with cfg.overwrite the old run is cleared later
    (prepare_out_dir).

    Raises:
        ConfigError: out exists and is not a directory, or holds another run (its outputs are named).
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    found = used_outputs(out)
    if not found or getattr(cfg, "overwrite", False):
        return
    if resume_dir is not None and _inside(resume_dir, out / CHECKPOINTS):
        return
    raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}); a second run would mix with it. "
                      f"Give another --out, continue it with --resume, or replace it with --overwrite")


def prepare_out_dir(cfg: TrainConfig, resume_dir: Path | None = None) -> Path:
    """Make --out ready for writing: check_out_dir, then sweep temporary directories a crashed run left
    (.tmp-*), then with cfg.overwrite remove the previous run's outputs (each renamed aside first, so none is
    left half-deleted under its name; other files in out are kept). Returns out, created if needed.

    Raises:
        ConfigError: see check_out_dir.
    """
    check_out_dir(cfg, resume_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_temporary(out)
    continuing = resume_dir is not None and _inside(resume_dir, out / CHECKPOINTS)
    if getattr(cfg, "overwrite", False) and not continuing:
        for name in RUN_OUTPUTS:
            if (out / name).exists():
                remove_by_renaming(out / name, out)
    return out


def sweep_temporary(out_dir: str | Path) -> list[Path]:
    """Remove the temporary directories and files an interrupted run left in out_dir and its checkpoints (the run
    holds out_dir's lock, so none belongs to a live run): first io.publish's (a previous copy left aside by a
    killed publication is put back), then the .tmp-* entries of pruning and earlier versions."""
    removed: list[Path] = []
    for parent in (Path(out_dir), Path(out_dir) / CHECKPOINTS):
        if not parent.is_dir():
            continue
        removed += sweep_leftovers(parent)
        for path in parent.iterdir():
            if path.name.startswith((TMP_PREFIX, LEGACY_TMP)):
                delete_entry(path)
                removed.append(path)
    return removed


def _inside(path: Path, parent: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(parent.resolve())
    except OSError:
        return False


def train_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The CLI's configuration: TrainConfig.from_sources, or, when resuming, the checkpoint's own configuration
    with the YAML file's and the flags' values on top (resume_config), so the first run's flags need not be
    repeated.

    Raises:
        ConfigError / ResumeError: see TrainConfig.from_sources and resume_config.
    """
    cfg = TrainConfig.from_sources(yaml_path, overrides)
    if not cfg.resume:
        return cfg
    checkpoint = resolve_resume(cfg)
    given = {name: getattr(cfg, name) for name in _given_names(yaml_path, overrides)}
    return resume_config(checkpoint, given)


def _given_names(yaml_path: str | None, overrides: dict[str, Any]) -> list[str]:
    """The option names the user set (in the YAML file or as flags), without resume itself."""
    names = set(overrides)
    if yaml_path:
        cfg = TrainConfig.from_sources(yaml_path, {})
        defaults = TrainConfig()
        names |= {n for n in TrainConfig.__dataclass_fields__ if getattr(cfg, n) != getattr(defaults, n)}
    return sorted(names - {"resume"})


__all__ = [
    "check_out_dir", "checkpoints", "latest_checkpoint", "prepare_out_dir", "read_checkpoint_state",
    "remove_by_renaming", "resolve_resume", "resume_config", "schedule_horizon", "sweep_temporary",
    "train_config", "used_outputs",
]
