"""The resumable cells of an experiment and its progress line (re-exported by lorakit.experiments.core).

A cell (a rank and a seed, a method, a subspace dimension, ...) is one unit of work whose JSON-able result is saved
atomically under out/cells/<key>.json; out/experiment.json holds the experiment's name and settings, so a rerun
with the same settings skips every finished cell and one with other settings is refused, by name.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from ..errors import ConfigError


# -- resumable cells --------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (JSON values; lists stay whole)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def settings_difference(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first setting (dotted name, in sorted order) whose value differs, with (saved, current); None if equal.
    A setting present on one side only reads as None (missing) on the other."""
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


class CellStore:
    """The finished cells of one experiment in one --out: out/experiment.json (the experiment's name and settings)
    and out/cells/<key>.json (one cell's result), each written atomically. A rerun with the same settings reuses
    every finished cell; one with other settings is refused unless `restart` (the old cells are removed first).

    Raises:
        ConfigError: out holds another experiment, or this one with other settings (the first setting that differs
            and both values are named).
    """

    def __init__(self, out_dir: Path, experiment: str, settings: dict, restart: bool = False) -> None:
        from ..io.files import atomic_write

        self.out_dir, self.experiment = Path(out_dir), experiment
        self.settings = json.loads(json.dumps(settings))  # JSON-normalised: tuples -> lists
        self.cells_dir = self.out_dir / "cells"
        self.computed: list[str] = []  # keys computed by this process
        self.reused: list[str] = []  # keys read back from an earlier run
        marker = self.out_dir / "experiment.json"
        if restart:
            shutil.rmtree(self.cells_dir, ignore_errors=True)
            marker.unlink(missing_ok=True)
        elif marker.is_file():
            self._check(json.loads(marker.read_text()))
        record = json.dumps({"experiment": experiment, "settings": self.settings}, indent=1, sort_keys=True)
        atomic_write(self.out_dir, {"experiment.json": lambda path: path.write_text(record)})

    def _check(self, saved: dict[str, Any]) -> None:
        if saved.get("experiment") != self.experiment:
            raise ConfigError(f"--out {self.out_dir} holds the experiment {saved.get('experiment')!r}, not "
                              f"{self.experiment!r}: give another --out, or --restart to discard its results")
        diff = settings_difference(saved.get("settings", {}), self.settings)
        if diff is not None:
            key, old, new = diff
            raise ConfigError(f"--out {self.out_dir}: its {self.experiment} cells were run with {key}={old!r}; this "
                              f"run has {key}={new!r}. Use the same settings to resume, another --out, or --restart "
                              f"to discard the finished cells")

    def path(self, key: str) -> Path:
        """out/cells/<key>.json. Raises ConfigError for a key that is not a plain file name."""
        if not key or not all(c.isalnum() or c in "._-=+" for c in key) or key.startswith("."):
            raise ConfigError(f"cell key {key!r}: use letters, digits and . _ - = + only")
        return self.cells_dir / f"{key}.json"

    def done(self, key: str) -> bool:
        """Whether cell `key` finished (in this run or an earlier one)."""
        return self.path(key).is_file()

    def run(self, key: str, fn: Callable[[], dict]) -> dict:
        """The saved result of cell `key` if it finished before; else fn()'s (a JSON-able dict), saved atomically."""
        from ..io.files import atomic_write

        path = self.path(key)
        if path.is_file():
            self.reused.append(key)
            return json.loads(path.read_text())
        result = fn()
        text = json.dumps(result, indent=1, allow_nan=True)
        atomic_write(self.cells_dir, {path.name: lambda tmp: tmp.write_text(text)})
        self.computed.append(key)
        return json.loads(text)


# -- progress -----------------------------------------------------------------------------------------------------
def duration(seconds: float) -> str:
    """75.2 -> "1m15s"; "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """The experiment's progress: one line when a cell starts and one when it ends,
    "[3/16 ###------- 19%] rank-sweep r=4 seed 1 ... 12.3 s, ETA 2m10s". The ETA is the mean time of the cells
    computed so far times the cells left (cells read back from an earlier run take no time and are not counted)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 10) -> None:
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = stream or sys.stderr
        self.finished = 0
        self.spent: list[float] = []
        self._what, self._started = "", 0.0

    def _head(self, count: int) -> str:
        filled = round(self.width * count / self.total)
        return (f"[{count}/{self.total} {'#' * filled}{'-' * (self.width - filled)} "
                f"{100 * count / self.total:.0f}%] {self.label}")

    def start(self, what: str) -> None:
        """A cell begins."""
        self._what, self._started = what, time.perf_counter()
        print(f"{self._head(self.finished)} {what} ...", file=self.stream, flush=True)

    def done(self, note: str = "", reused: bool = False) -> None:
        """The cell begun last ended (`reused`: read back from an earlier run); `note`: its result in a few words."""
        seconds = time.perf_counter() - self._started
        self.finished += 1
        if not reused:
            self.spent.append(seconds)
        left = self.total - self.finished
        eta = sum(self.spent) / len(self.spent) * left if self.spent else (0.0 if left == 0 else float("nan"))
        timing = "resumed (finished before)" if reused else f"{seconds:.1f} s"
        print(f"{self._head(self.finished)} {self._what}{': ' + note if note else ''} ... {timing}, "
              f"ETA {duration(eta)}", file=self.stream, flush=True)


def run_cell(store: CellStore, progress: Progress, key: str, what: str, fn: Callable[[], dict],
             note: Callable[[dict], str] | None = None) -> dict:
    """store.run(key, fn) between progress.start(what) and progress.done(note(result))."""
    progress.start(what)
    reused = store.done(key)
    result = store.run(key, fn)
    progress.done(note(result) if note else "", reused=reused)
    return result
