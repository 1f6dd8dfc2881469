"""Helpers for engineer F's distributed tests: launch a script under real torchrun (gloo, CPU) with a free port
and a timeout, and the deterministic data every rank and the single-process reference share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VOCAB = 64  # as tests/conftest.py


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run tests/distributed/<script> on `nproc` CPU processes; fail (with the output) on error or timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(HERE / script), *args,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers (each in a session of its own) and stops them
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun {script} did not finish in {timeout} s:\n{stdout}\n{stderr[-6000:]}") from None
    assert proc.returncode == 0, f"torchrun {script} failed ({proc.returncode}):\n{stdout}\n{stderr[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def global_batch(step: int, batch: int, length: int = 8) -> torch.Tensor:
    """The whole batch of `step` (all ranks together); rank r takes rows [r*b, (r+1)*b)."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def rank_rows(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s equal share of a global batch."""
    per = ids.shape[0] // world
    return ids[rank * per:(rank + 1) * per]


PER_RANK = 2  # rows per rank per step
LR = 1e-2


def f_lora_config(modules_to_save: list[str] | None = None):
    """The adapter F's tests train: rank 4 on every linear layer, no dropout (runs compare exactly), and
    optionally fully trained copies of `modules_to_save`."""
    import lorakit

    return lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0, modules_to_save=modules_to_save)
