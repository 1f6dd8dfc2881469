"""Metric loggers of the Trainer (`--report-to jsonl,tensorboard,wandb`): callbacks whose `on_log` receives
every record the run logs. JSONL (metrics.jsonl) is always written; the others only when asked for.

TensorBoard goes through `torch.utils.tensorboard` (needs the `tensorboard` package); Weights & Biases
through `wandb` (its own settings decide online or offline; nothing is sent unless `wandb` is asked for).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .callbacks import Callback
from .config import LOGGERS, parse_report_to  # noqa: F401 - parse_report_to: re-exported


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a record for a scalar logger: top-level numbers, and one level of nested dicts as
    `parent/key` (diagnostics); per-layer tables, strings and None are left out. `step` is not a scalar."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step" or key == "layers":
            continue
        if isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if _is_number(v)})
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class JsonlLogger(Callback):
    """metrics.jsonl: one JSON object per record, appended and flushed as it happens."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("a")

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger(Callback):
    """Event files under `<out>/tensorboard`, one scalar per number of each record, at the record's step.

    Raises:
        ConfigError: torch.utils.tensorboard cannot be imported (the `tensorboard` package is missing).
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"report_to tensorboard needs the 'tensorboard' package (pip install tensorboard); "
                              f"importing torch.utils.tensorboard failed: {err}") from err
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Callback):
    """A Weights & Biases run named after the output directory, with the run's configuration.

    Raises:
        ConfigError: `wandb` is not installed.
    """

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("report_to wandb needs the 'wandb' package (pip install wandb); it is not "
                              "installed") from err
        self.run = wandb.init(name=out_dir.name, dir=str(out_dir), config=config)

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


def check_available(report_to: str) -> None:
    """Fail before anything is written when a logger's package is missing.

    Raises:
        ConfigError: an unknown name, or tensorboard / wandb asked for and not installed.
    """
    for name in parse_report_to(report_to)[1:]:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"report_to {name} needs the '{name}' package (pip install {name}); it is not "
                              f"installed")


def make_loggers(report_to: str, out_dir: Path, config: dict[str, Any]) -> list[Callback]:
    """The loggers `report_to` names, JSONL first. Optional packages are checked before any file is opened.

    Raises:
        ConfigError: an unknown name, or an optional package that is not installed.
    """
    names = parse_report_to(report_to)
    loggers: list[Callback] = []
    try:
        if "tensorboard" in names:
            loggers.append(TensorBoardLogger(out_dir / "tensorboard"))
        if "wandb" in names:
            loggers.append(WandbLogger(out_dir, config))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return [JsonlLogger(out_dir / "metrics.jsonl"), *loggers]
