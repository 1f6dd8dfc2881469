"""A kill -9 at any instant of a save, a checkpoint or a merge leaves the old directory or the new one, whole
(config and weights of one version), and the next save or run leaves no temporary entry behind."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest
import torch
from a_kill import dead_pid, fork, kill, leftovers, snapshot
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.errors import ConfigError
from lorakit.hf import merge_to_dir
from lorakit.io import publish
from lorakit.io.files import atomic_write
from lorakit.io.peft import adapter_state
from lorakit.train import checkpoint as ckpt
from lorakit.train import rundir
from lorakit.train.config import TrainConfig

POINTS = ["before-swap", "after-swap"]


def _model(version: int) -> nn.Module:
    """Adapter version 1 (r=2, alpha=4) or 2 (r=4, alpha=16): different config and values."""
    model = tiny_llama()
    r = 2 if version == 1 else 4
    lorakit.attach(model, lorakit.LoraConfig(r=r, alpha=r * r, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=version)
    return model


MODELS = {1: _model(1), 2: _model(2)}


def _version(directory: Path) -> int:
    """Which version `directory` holds, whole: the config and every tensor of one version (a mix fails to load or
    matches neither)."""
    fresh = tiny_llama()
    lorakit.load_adapter(fresh, directory)
    loaded = adapter_state(fresh, "default")
    for version, model in MODELS.items():
        expected = adapter_state(model, "default")
        if set(expected) == set(loaded) and all(torch.equal(expected[k], loaded[k]) for k in expected):
            return version
    raise AssertionError(f"{directory} holds neither version whole")


@pytest.mark.parametrize("point", POINTS)
def test_a_save_killed_at_its_worst_instant_leaves_one_whole_version(tmp_path, point):
    out = tmp_path / "adapter"
    lorakit.save_adapter(MODELS[1], out)
    pid = fork(lambda: lorakit.save_adapter(MODELS[2], out), point, tmp_path / "reached")
    kill(pid)
    assert _version(out) == (1 if point == "before-swap" else 2)
    lorakit.save_adapter(MODELS[1], out)  # the next save cleans up after the killed one
    assert _version(out) == 1 and leftovers(tmp_path, out) == []


def test_the_fallback_swap_killed_between_its_renames_is_recovered_by_the_next_load(tmp_path):
    out = tmp_path / "adapter"
    lorakit.save_adapter(MODELS[1], out)
    pid = fork(lambda: lorakit.save_adapter(MODELS[2], out), "fallback-aside", tmp_path / "reached", exchange=False)
    kill(pid)
    assert not out.exists()  # the old version is aside, the new one not yet in
    assert _version(out) == 1  # reading it puts the old one back
    pid = fork(lambda: lorakit.save_adapter(MODELS[2], out), "after-swap", tmp_path / "reached", exchange=False)
    kill(pid)
    assert _version(out) == 2
    lorakit.save_adapter(MODELS[1], out)
    assert leftovers(tmp_path, out) == []


def test_random_kills_during_repeated_saves_always_leave_a_whole_adapter(tmp_path):
    out = tmp_path / "adapter"
    lorakit.save_adapter(MODELS[1], out)
    rng = random.Random(15)

    def save_forever() -> None:
        while True:
            for version in (2, 1):
                lorakit.save_adapter(MODELS[version], out)

    for _ in range(12):  # one save takes ~0.1 s here: the kills land at every stage of a publication
        pid = fork(save_forever)
        time.sleep(rng.uniform(0.0, 0.4))
        kill(pid)
        assert _version(out) in (1, 2)
    lorakit.save_adapter(MODELS[1], out)
    assert leftovers(tmp_path, out) == []


def test_entries_the_save_does_not_write_survive_it(tmp_path):
    lorakit.save_adapter(MODELS[1], tmp_path / "out")
    model = _model(2)
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), name="other")
    lorakit.save_adapter(model, tmp_path / "out", name="other")
    (tmp_path / "out" / "README.md").write_text("notes")
    lorakit.save_adapter(MODELS[2], tmp_path / "out")
    assert _version(tmp_path / "out") == 2 and (tmp_path / "out" / "README.md").read_text() == "notes"
    assert (tmp_path / "out" / "other" / "adapter_config.json").is_file()
    assert leftovers(tmp_path, tmp_path / "out") == []


def test_temporary_files_of_dead_writers_are_swept_but_a_live_writers_are_kept(tmp_path):
    live_pid = fork(lambda: time.sleep(60))
    dead = tmp_path / f".a.json.lorakit-tmp-{dead_pid()}-0123abcd.tmp"
    live = tmp_path / f".b.json.lorakit-tmp-{live_pid}-0123abcd.tmp"
    dead.write_text("half")
    live.write_text("being written")
    try:
        atomic_write(tmp_path, {"c.json": lambda path: path.write_text("{}")})
        assert not dead.exists() and live.exists()
    finally:
        kill(live_pid)


# -- checkpoints -------------------------------------------------------------------------------------------
def _config(out: Path) -> TrainConfig:
    return TrainConfig(model="m", data="d.jsonl", out=str(out), method="full", max_steps=10, warmup_steps=2)


def _checkpoint(out: Path, step: int, version: int, keep: int = 5) -> Path:
    torch.manual_seed(version)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = {"config": _config(out).to_dict(), "version": version}
    return ckpt.save_checkpoint(out, step, model, "full", optimizer, scheduler, state, keep)


def _checkpoint_version(directory: Path) -> int:
    """The version a checkpoint holds, checked whole: its weights are the ones its trainer_state names."""
    state = ckpt.read_checkpoint_state(directory)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.restore(directory, model, "full", optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    torch.manual_seed(state["version"])
    assert torch.equal(model.weight, nn.Linear(4, 3).weight)
    return state["version"]


@pytest.mark.parametrize(("point", "exchange"), [("before-swap", True), ("after-swap", True),
                                                 ("fallback-aside", False)])
def test_a_checkpoint_rewritten_and_killed_is_whole_at_the_next_start(tmp_path, point, exchange):
    _checkpoint(tmp_path, 1, 1)
    _checkpoint(tmp_path, 2, 1)
    pid = fork(lambda: _checkpoint(tmp_path, 2, 2), point, tmp_path / "reached", exchange=exchange)
    kill(pid)
    rundir.prepare_out_dir(_config(tmp_path), rundir.latest_checkpoint(tmp_path))  # the next run's start
    latest = rundir.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-0000002"
    assert _checkpoint_version(latest) == (1 if point != "after-swap" else 2)
    assert leftovers(tmp_path, tmp_path / "checkpoints") == []


def test_a_kill_while_pruning_leaves_no_half_checkpoint_and_the_next_start_sweeps(tmp_path, monkeypatch):
    _checkpoint(tmp_path, 1, 1, keep=1)

    def prune_slowly() -> None:
        def stop(path, ignore_errors=False):  # the old checkpoint renamed aside, then killed while deleting
            while True:
                time.sleep(60)

        monkeypatch.setattr(ckpt.shutil, "rmtree", stop)
        _checkpoint(tmp_path, 2, 2, keep=1)

    pid = fork(prune_slowly)
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-removed-") for p in (tmp_path / "checkpoints").iterdir()):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    kill(pid)
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["step-0000002"]
    rundir.prepare_out_dir(_config(tmp_path), rundir.latest_checkpoint(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]
    assert _checkpoint_version(tmp_path / "checkpoints" / "step-0000002") == 2


# -- lorakit merge ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory, causal_lm_dir):
    """Two adapters on the tiny causal LM and the merged directory each gives."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge")
    merged = {}
    for version in (1, 2):
        model = LlamaForCausalLM.from_pretrained(causal_lm_dir)
        lorakit.attach(model, lorakit.LoraConfig(r=2 * version, target_modules=["q_proj", "v_proj"]))
        randomize_adapters(model, seed=version)
        lorakit.save_adapter(model, root / f"a{version}")
        merged[version] = snapshot(merge_to_dir(causal_lm_dir, root / f"a{version}", root / f"m{version}"))
    assert merged[1] != merged[2]
    return root, merged


@pytest.mark.parametrize(("point", "exchange"), [("before-swap", True), ("after-swap", True),
                                                 ("fallback-aside", False)])
def test_a_merge_killed_leaves_the_old_or_the_new_model_whole(tmp_path, causal_lm_dir, merge_inputs, point,
                                                              exchange):
    root, merged = merge_inputs
    out = tmp_path / "merged"
    merge_to_dir(causal_lm_dir, root / "a1", out)
    pid = fork(lambda: merge_to_dir(causal_lm_dir, root / "a2", out, force=True), point, tmp_path / "reached",
               exchange=exchange)
    kill(pid)
    if point == "fallback-aside":
        assert not out.exists()
        with pytest.raises(ConfigError, match="not empty"):  # the next merge puts the old one back and refuses
            merge_to_dir(causal_lm_dir, root / "a2", out)
    assert snapshot(out) == merged[1 if point != "after-swap" else 2]
    merge_to_dir(causal_lm_dir, root / "a2", out, force=True)
    assert snapshot(out) == merged[2] and leftovers(tmp_path) == []


def test_publishing_refuses_a_target_that_is_a_file(tmp_path):
    (tmp_path / "adapter").write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        lorakit.save_adapter(MODELS[1], tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a directory" and leftovers(tmp_path) == []
    assert publish.sweep_leftovers(tmp_path / "missing") == []


def test_a_mount_point_is_published_entry_by_entry_and_keeps_its_other_entries(tmp_path, monkeypatch):
    out = tmp_path / "mounted"
    lorakit.save_adapter(MODELS[1], out)
    (out / "README.md").write_text("notes")
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))  # `out` cannot be renamed
    inode = out.stat().st_ino
    lorakit.save_adapter(MODELS[2], out)
    assert _version(out) == 2 and out.stat().st_ino == inode  # written inside, not swapped
    assert (out / "README.md").read_text() == "notes" and leftovers(tmp_path, out) == []
