"""Progress output and the metrics log: a one-line bar on a terminal (a line per log step elsewhere), and
metrics.jsonl with one JSON object per event (appended and flushed as they happen)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Prints step / loss / lr / tokens per second / ETA and writes metrics.jsonl."""

    def __init__(self, metrics_path: Path, total_steps: int, start_step: int = 0, bar: bool = True,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.bar = bar and self.stream.isatty()
        self.total = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics_path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, force_line: bool) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else float("nan")
        text = (f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                f"ETA {_duration(eta)}")
        if self.bar:
            self.stream.write("\r" + text.ljust(100))
            if step == self.total:
                self.stream.write("\n")
            self.stream.flush()
        elif force_line:
            print(text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar:
            self.stream.write("\n")
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.metrics.close()
