"""Faults of a 2-process `lorakit train`: when one rank dies (or hangs), the other stops within --ddp-timeout with a
message naming the failure and the last checkpoint, torchrun reports the failed rank, and that checkpoint resumes on
one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e_runs import HERE, adapter, child_env, free_port, make_run_inputs, torchrun

DIE = str(HERE / "e_die.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_run_inputs(tmp_path_factory.mktemp("faults"))


def launch_by_hand(model: Path, data: Path, out: Path, mode: str, timeout_s: float) -> list[subprocess.Popen]:
    """Two processes started with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* set by hand (no torchrun agent to kill
    the survivor): rank 1 exits (or hangs) after step 3."""
    port, procs = free_port(), []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, DIE, str(model), str(data), str(out), "1", "3",
                                       str(timeout_s), mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the process did not stop within {timeout} s:\n{err[-3000:]}") from None
    return proc.returncode, err


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_survivor_stops_with_a_clear_message_and_the_checkpoint_resumes(inputs: tuple[Path, Path], tmp_path: Path,
                                                                        mode: str) -> None:
    model, data = inputs
    out = tmp_path / "run"
    procs = launch_by_hand(model, data, out, mode, timeout_s=8.0)
    try:
        code, err = finish(procs[0], timeout=90)  # without --ddp-timeout a hung peer would hold it 30 minutes
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert code == 2, err[-3000:]
    checkpoint = out / "checkpoints" / "step-0000002"
    assert "lorakit: error: rank 0 of 2: step 4 failed: another process of the run stopped" in err
    assert f"the last checkpoint is {checkpoint}" in err
    assert not (out / "adapter").exists()  # rank 0 saved nothing past the checkpoint
    if mode == "hang":
        return
    # the last checkpoint loads and finishes the run on one process (global batch 2 x 2 = 1 x 4)
    resumed = tmp_path / "resumed"
    torchrun(["train", "--resume", str(checkpoint), "--out", str(resumed), "--batch-size", "4", "--no-progress"],
             nproc=0)
    assert all(t.isfinite().all() for t in adapter(resumed).values())


def test_torchrun_reports_the_dead_rank(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = inputs
    out = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), DIE, str(model), str(data), str(out), "1", "3", "30"]
    proc = subprocess.run(launcher, env=child_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "rank 1: exit at step 3" in proc.stderr
    assert "ChildFailedError" in proc.stderr or "exitcode" in proc.stderr
    assert (out / "checkpoints" / "step-0000002" / "adapter").is_dir()
