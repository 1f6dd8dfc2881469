"""`lorakit experiment NAME`: the seeds' claims, reproducible with one command each, on the embedded default (MiniLM on
the standard library's docstrings) or a user's --model and --data. Each experiment module exposes NAME, DESCRIPTION
and run(task, out_dir, quick, seeds, store, progress_stream) -> its results dict (it writes results.json, table.md
and page.html itself). The registry imports a module only when its experiment is run."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import ConfigError


@dataclass(frozen=True)
class Experiment:
    """One registered experiment: its command-line name, a one-line description and the module that runs it."""

    name: str  # lorakit experiment NAME
    description: str  # one line for --list
    module: str  # lorakit.experiments.<module>, imported on first use

    def load(self) -> ModuleType:
        """The experiment's module (it has run(task, out_dir, quick, seeds, store, progress_stream))."""
        return importlib.import_module(f"{__name__}.{self.module}")


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("rank-sweep", "LoRA at r = 1, 2, 4, ..., 64 against full fine-tuning: quality vs r, the fit a ln r + b "
               "with its R^2, the gain per doubling", "rank_sweep"),
    Experiment("intrinsic-dim", "training in a random d-dimensional subspace (frozen random B, or a projection of the "
               "whole update): quality vs d, d90", "intrinsic_dim"),
    Experiment("lora-vs-full", "the spectrum of full fine-tuning's update, the rank-r bound against LoRA's error, "
               "and the alignment of their singular subspaces over training", "lora_vs_full"),
    Experiment("magnitude-direction", "DoRA's Delta M / Delta D per layer over checkpoints for full fine-tuning, LoRA "
               "and DoRA, with their correlations", "magnitude_direction"),
    Experiment("variants", "lorakit's methods on one task: trainable parameters, quality, time, memory, adapter size",
               "variants"),
)}


def experiment_named(name: str) -> Experiment:
    """The registered experiment `name`.

    Raises:
        ConfigError: an unknown name (the valid ones are listed).
    """
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; expected one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


__all__ = ["EXPERIMENTS", "Experiment", "experiment_named"]
