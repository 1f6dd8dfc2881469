"""Helpers for engineer E's tests of `lorakit train` on several processes: a tiny Llama directory, data whose
examples all have the same number of tokens, and `python -m lorakit train` under real torchrun (gloo, CPU), with a
free port and a timeout on every launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from model_dirs import make_causal_lm_dir

WORDS = "one two three four five six seven eight nine ten cat dog bird fish red green blue big small hot".split()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a launched process: one thread, offline, the repository on the path, no launcher vars."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": path, "LORAKIT_DATA_CACHE": "off", **extra}


def free_port() -> int:
    """A TCP port that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_run_inputs(root: Path, n: int = 16) -> tuple[Path, Path]:
    """A tiny Llama directory and n text examples of exactly 6 words each (same token count on every rank)."""
    model = make_causal_lm_dir(root / "model")
    data = root / "train.jsonl"
    lines = [json.dumps({"text": " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 7))}) for i in range(n)]
    data.write_text("\n".join(lines) + "\n")
    return model, data


def train_args(model: Path, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    """`lorakit train` flags of the runs compared here: no dropout, constant LR, every step logged."""
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", str(batch),
            "--lora-dropout", "0", "--lr-scheduler-type", "constant", "--warmup-steps", "0", "--learning-rate",
            "1e-2", "--logging-steps", "1", "--diagnostics-steps", "0", "--rank", "4", "--device", "cpu",
            "--no-progress", *extra]


def torchrun(args: list[str], nproc: int, timeout: float = 120.0, check: bool = True,
             **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc -m lorakit <args>`; nproc 0: plain `python -m lorakit` (no launcher)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", "1",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m"] if nproc else [sys.executable,
                                                                                                     "-m"]
    try:
        proc = subprocess.run([*launcher, "lorakit", *args], env=child_env(**env), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{args} on {nproc} processes did not finish in {timeout} s:\n{err.stdout}\n"
                             f"{err.stderr}") from err
    if check:
        assert proc.returncode == 0, f"{args} on {nproc} processes failed ({proc.returncode}):\n{proc.stdout}\n" \
                                     f"{proc.stderr[-6000:]}"
    return proc


def step_losses(out: Path) -> dict[int, float]:
    """The loss of each logged step in out/metrics.jsonl (the last record of a step wins)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapter(out: Path) -> dict:
    """The saved adapter's tensors."""
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))
