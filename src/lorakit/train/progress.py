"""The progress display of a run, as a Trainer callback: a tqdm bar on a terminal (step, loss, lr, tokens/s,
ETA; messages written above it), or one plain line per logged step elsewhere and with `--progress false`."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from .callbacks import Callback, StepOutput
from .hooks import RunState


def duration(seconds: float) -> str:
    """`75.2` -> "1m15s"; "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def step_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float, eta: float) -> str:
    """The plain log line of a step record."""
    return (f"step {step}/{total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
            f"ETA {duration(eta)}")


class Progress(Callback):
    """A bar (when `bar` and the stream is a terminal) or a line per logged step. The bar's tokens/s is the
    rate measured since the bar started, so it never reads 0 between log steps."""

    def __init__(self, bar: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.use_bar = bar and self.stream.isatty()
        self.bar: Any = None
        self.total = self.start_step = 0
        self.tokens, self.started = 0, time.perf_counter()

    def on_train_begin(self, trainer: RunState) -> None:
        self.total, self.start_step = trainer.total_steps, trainer.start_step
        self.tokens, self.started = 0, time.perf_counter()
        if self.use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start_step, file=self.stream, dynamic_ncols=True,
                            unit="step", leave=True)

    def on_step_end(self, trainer: RunState, out: StepOutput) -> None:
        self.tokens += out.tokens
        if self.bar is None:
            return
        seconds = time.perf_counter() - self.started
        rate = f"{self.tokens / seconds:,.0f}" if seconds > 0 and self.tokens else "?"
        self.bar.set_postfix_str(f"loss {out.loss:.4f}  lr {out.lr:.2e}  {rate} tok/s", refresh=False)
        self.bar.update(1)

    def on_log(self, trainer: RunState, record: dict[str, Any]) -> None:
        if self.bar is not None or "loss" not in record:
            return
        step = record["step"]
        done = step - self.start_step
        eta = (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else float("nan")
        self.write(step_line(step, self.total, record["loss"], record["lr"], record["tokens_per_s"], eta))

    def write(self, text: str) -> None:
        """A line above the bar (or a plain line)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
