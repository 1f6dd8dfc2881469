"""`lorakit train --fsdp` under real torchrun (2 gloo CPU processes, a tiny Llama): the frozen base sharded with FSDP2,
2 processes x batch b give the losses, diagnostics and adapter of 1 process x batch 2b; a sharded run's checkpoint
resumes on one unsharded process and an unsharded checkpoint on two sharded ones (with gradient accumulation)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from e_runs import adapter, make_run_inputs, step_losses, torchrun, train_args
from test_e_ddp_train import assert_same_adapter

STEPS = 4
EXTRA = ("--max-steps", str(STEPS), "--save-steps", "2", "--diagnostics-steps", "2")


def diagnostics(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["layers"] for r in records if "layers" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_train")
    model, data = make_run_inputs(root)
    outs = {"model": model, "data": data, "one": root / "one", "two": root / "two"}
    torchrun(train_args(model, data, outs["one"], 4, *EXTRA), nproc=0)
    proc = torchrun(train_args(model, data, outs["two"], 2, *EXTRA, "--fsdp"), nproc=2)
    (root / "two.stdout").write_text(proc.stdout + proc.stderr)
    outs["stdout"] = root / "two.stdout"
    return outs


def test_sharded_two_processes_match_one_process_with_twice_the_batch(runs: dict[str, Path]) -> None:
    one, two = step_losses(runs["one"]), step_losses(runs["two"])
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    assert_same_adapter(runs["one"], runs["two"])
    trained = [t for key, t in adapter(runs["two"]).items() if "lora_B" in key]
    assert trained and all(t.abs().max() > 0 for t in trained)


def test_diagnostics_are_of_the_whole_weights_not_of_a_shard(runs: dict[str, Path]) -> None:
    """||sBA|| / ||W0|| and |grad A| / |grad B| under FSDP are the unsharded run's (a shard's norm would differ)."""
    one, two = diagnostics(runs["one"]), diagnostics(runs["two"])
    assert sorted(one) == sorted(two) == [2, 4]
    for step, layers in one.items():
        assert sorted(layers) == sorted(two[step])
        for path, values in layers.items():
            assert values["update_ratio"] > 0
            for key, value in values.items():
                assert two[step][path][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (step, path, key)


def test_each_process_holds_about_half_of_the_frozen_base(runs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(runs["model"])
    whole = sum(p.numel() * p.element_size() for p in base.parameters())
    text = runs["stdout"].read_text()
    found = re.search(r"2 processes \(FSDP, global batch 4\); this process holds [\d.]+ MiB \(([\d,]+) bytes\) of the frozen base",
                      text)
    assert found, text
    held = int(found.group(1).replace(",", ""))
    assert 0.45 * whole <= held <= 0.6 * whole, (held, whole)


def test_rank_0_alone_writes_the_sharded_run(runs: dict[str, Path]) -> None:
    records = [json.loads(line) for line in (runs["two"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    # the checkpoint holds full tensors (gathered): the same keys and shapes as the unsharded run's
    for name in ("step-0000002", "step-0000004"):
        sharded = torch.load(runs["two"] / "checkpoints" / name / "optimizer.pt", weights_only=True)["optimizer"]
        plain = torch.load(runs["one"] / "checkpoints" / name / "optimizer.pt", weights_only=True)["optimizer"]
        assert sorted(sharded["state"]) == sorted(plain["state"])
        for index, entry in plain["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(sharded["state"][index][key], value, atol=1e-5, rtol=0)
    assert [p.name for p in runs["two"].rglob("*") if "tmp" in p.name or "lock" in p.name] == []


def test_a_sharded_checkpoint_resumes_on_one_process(runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = runs["two"] / "checkpoints" / "step-0000002"
    out = tmp_path / "resumed"
    torchrun(["train", "--resume", str(checkpoint), "--out", str(out), "--batch-size", "4", "--no-progress"], nproc=0)
    assert_same_adapter(runs["one"], out)
    after, before = step_losses(out), step_losses(runs["one"])
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(before[step], abs=1e-5)


def test_an_unsharded_checkpoint_resumes_sharded_with_accumulation(runs: dict[str, Path], tmp_path: Path) -> None:
    """1 x batch 4 -> 2 sharded processes x batch 1 x 2 accumulation steps (no reduce-scatter on the first
    micro-batch): the optimizer's moments are cut into shards and the run ends where the uninterrupted one did."""
    checkpoint = runs["one"] / "checkpoints" / "step-0000002"
    out = tmp_path / "resumed"
    torchrun(train_args(runs["model"], runs["data"], out, 1, "--max-steps", str(STEPS), "--resume", str(checkpoint),
                        "--gradient-accumulation-steps", "2", "--fsdp"), nproc=2)
    assert_same_adapter(runs["one"], out)
    after, before = step_losses(out), step_losses(runs["one"])
    assert sorted(after) == [3, 4]
    for step in after:
        assert after[step] == pytest.approx(before[step], abs=1e-5)
