"""`lorakit train` under real torchrun (2 gloo CPU processes, a tiny Llama): 2 processes x batch b give the losses and
adapter of 1 process x batch 2b; gradient accumulation with no_sync; resume 1 -> 2 and 2 -> 1 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from e_runs import adapter, make_run_inputs, step_losses, torchrun, train_args

STEPS = 4


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = adapter(a), adapter(b)
    assert set(left) == set(right)
    for key in left:
        torch.testing.assert_close(left[key], right[key], atol=atol, rtol=0, msg=key)


def assert_same_losses(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = step_losses(a), step_losses(b)
    assert sorted(left) == list(range(1, STEPS + 1)) == sorted(right)
    for step in left:
        assert left[step] == pytest.approx(right[step], abs=atol), step


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process x batch 4 and two processes x batch 2, 4 steps each, a checkpoint every 2 steps."""
    root = tmp_path_factory.mktemp("ddp")
    model, data = make_run_inputs(root)
    outs = {"model": model, "data": data, "one": root / "one", "two": root / "two"}
    torchrun(train_args(model, data, outs["one"], 4, "--max-steps", str(STEPS), "--save-steps", "2"), nproc=0)
    torchrun(train_args(model, data, outs["two"], 2, "--max-steps", str(STEPS), "--save-steps", "2"), nproc=2)
    return outs


def test_two_processes_match_one_process_with_twice_the_batch(runs: dict[str, Path]) -> None:
    assert_same_losses(runs["one"], runs["two"])
    assert_same_adapter(runs["one"], runs["two"])
    trained = [t for key, t in adapter(runs["two"]).items() if "lora_B" in key]
    assert trained and all(t.abs().max() > 0 for t in trained)  # B starts at zero: the steps did update it


def test_rank_0_alone_writes_the_run(runs: dict[str, Path]) -> None:
    records = [json.loads(line) for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # once each, not once per rank
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    state = json.loads((runs["two"] / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 2
    leftovers = [p.name for p in runs["two"].rglob("*") if "tmp" in p.name or "lock" in p.name]
    assert leftovers == []


def test_resume_one_to_two_processes_with_accumulation(runs: dict[str, Path], tmp_path: Path) -> None:
    """1 x batch 4 -> 2 x batch 1 x 2 accumulation steps (no_sync on the first micro-batch): same global batch, so
    the resumed run ends where the uninterrupted one did."""
    checkpoint = runs["one"] / "checkpoints" / "step-0000002"
    out = tmp_path / "resumed"
    torchrun(train_args(runs["model"], runs["data"], out, 1, "--max-steps", str(STEPS), "--resume", str(checkpoint),
                        "--gradient-accumulation-steps", "2"), nproc=2)
    assert_same_adapter(runs["one"], out)
    after = step_losses(out)
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(step_losses(runs["one"])[step], abs=1e-5)


def test_resume_two_to_one_process(runs: dict[str, Path], tmp_path: Path) -> None:
    """2 x batch 2 -> 1 x batch 4 from the two-process run's step 2: the uninterrupted run's steps 3, 4 and adapter."""
    checkpoint = runs["two"] / "checkpoints" / "step-0000002"
    out = tmp_path / "resumed"
    torchrun(["train", "--resume", str(checkpoint), "--out", str(out), "--batch-size", "4", "--no-progress"], nproc=0)
    assert_same_adapter(runs["one"], out)
    after, before = step_losses(out), step_losses(runs["one"])
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(before[step], abs=1e-5)


def test_resume_with_another_global_batch_is_refused(runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """One process's per-device batch on 2 processes would double the global batch: refused, the fix named."""
    from lorakit.train import rundir
    from lorakit.train.checkpoint import ResumeError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    checkpoint = runs["one"] / "checkpoints" / "step-0000002"
    with pytest.raises(ResumeError, match=r"global batch .* was 4 there \(4 x 1 x 1\), 8 now \(4 x 1 x 2\).*"
                                          r"--per-device-train-batch-size 2"):
        rundir.train_config(None, {"resume": str(checkpoint), "out": str(runs["one"])})
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert rundir.train_config(None, {"resume": str(checkpoint), "out": str(runs["one"])}).resume == str(checkpoint)
