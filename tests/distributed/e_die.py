"""A `lorakit train` run (the library's train(), errors printed as the CLI prints them) in which one rank dies with
os._exit(1) at a given step, as a crashed or killed process would, or hangs (MODE hang): for test_e_faults.py.

    python e_die.py MODEL DATA OUT DIE_RANK DIE_STEP DDP_TIMEOUT [exit | hang]
"""

from __future__ import annotations

import os
import sys
import time

from lorakit.errors import LorakitError
from lorakit.train.callbacks import Callback, StepOutput
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train


class Die(Callback):
    """os._exit(1) (or a long sleep: mode "hang") on rank `rank` after step `step` (its checkpoint, if any, is
    written by then)."""

    def __init__(self, rank: int, step: int, mode: str) -> None:
        self.rank, self.step, self.mode = rank, step, mode

    def on_step_end(self, trainer, out: StepOutput) -> None:  # noqa: ANN001
        if out.step == self.step and int(os.environ.get("RANK", "0")) == self.rank:
            print(f"rank {self.rank}: {self.mode} at step {out.step}", file=sys.stderr, flush=True)
            if self.mode == "hang":
                time.sleep(600)
            os._exit(1)


def main() -> int:
    model, data, out, rank, step, timeout = sys.argv[1:7]
    mode = sys.argv[7] if len(sys.argv) > 7 else "exit"
    cfg = TrainConfig(model=model, data=data, out=out, per_device_train_batch_size=2, max_steps=6, save_steps=2,
                      lora_dropout=0.0, r=4, logging_steps=1, diagnostics_steps=0, device="cpu", progress=False,
                      ddp_timeout=float(timeout), lr_scheduler_type="constant", warmup_steps=0)
    try:
        train(cfg, callbacks=[Die(int(rank), int(step), mode)])
    except LorakitError as err:
        print(f"lorakit: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
