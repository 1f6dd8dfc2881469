"""A run's directory: --resume latest, the configuration a checkpoint carries, a used --out refused (or cleared with
--overwrite), pruning by renaming, no temporary directories left, corrupt or foreign checkpoints as clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import checkpoint as ckpt
from lorakit.train import rundir
from lorakit.train.config import TrainConfig


def _config(out: Path, **fields) -> TrainConfig:
    values = {"model": "m", "data": "d.jsonl", "out": str(out), "method": "full", "max_steps": 10,
              "learning_rate": 1e-3, "warmup_steps": 2}
    return TrainConfig(**{**values, **fields})


def _parts() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def _save(cfg: TrainConfig, step: int, keep: int = 5) -> Path:
    model, optimizer, scheduler = _parts()
    state = {"config": cfg.to_dict(), "losses": [1.0] * step}
    return ckpt.save_checkpoint(Path(cfg.out), step, model, "full", optimizer, scheduler, state, keep)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    cfg = _config(tmp_path)
    assert rundir.latest_checkpoint(tmp_path) is None
    for step in (3, 12, 6):
        _save(cfg, step)
    (tmp_path / "checkpoints" / ".tmp-step-0000099.abc").mkdir()  # a checkpoint being written: not complete
    assert rundir.latest_checkpoint(tmp_path).name == "step-0000012"


def test_bare_resume_means_the_newest_checkpoint_in_out(tmp_path):
    cfg = _config(tmp_path)
    _save(cfg, 4)
    newest = _save(cfg, 8)
    assert rundir.resolve_resume(_config(tmp_path, resume="latest")) == newest
    with pytest.raises(ckpt.ResumeError, match=r"no checkpoint in .*empty"):
        rundir.resolve_resume(_config(tmp_path / "empty", resume="latest"))


def test_resume_config_carries_the_runs_settings_and_takes_new_options(tmp_path):
    first = _config(tmp_path, r=4, learning_rate=3e-4, seed=7, logging_steps=5)
    checkpoint = _save(first, 6)
    cfg = rundir.resume_config(checkpoint, {"max_steps": 20, "logging_steps": 1})
    assert (cfg.r, cfg.learning_rate, cfg.seed, cfg.model) == (4, 3e-4, 7, "m")  # not repeated
    assert (cfg.max_steps, cfg.logging_steps, cfg.resume) == (20, 1, str(checkpoint))


def test_resume_refuses_a_changed_trajectory_or_a_horizon_before_the_checkpoint(tmp_path):
    checkpoint = _save(_config(tmp_path, learning_rate=1e-3), 6)
    with pytest.raises(ckpt.ResumeError, match=r"learning_rate was 0\.001 there, 0\.01 now"):
        rundir.resume_config(checkpoint, {"learning_rate": 1e-2})
    with pytest.raises(ckpt.ResumeError, match=r"max_steps 5 ends before the checkpoint's step 6"):
        rundir.resume_config(checkpoint, {"max_steps": 5})


def test_cli_config_resumes_latest_without_repeating_flags(tmp_path):
    _save(_config(tmp_path, r=16, seed=3), 5)
    cfg = rundir.train_config(None, {"resume": "latest", "out": str(tmp_path), "max_steps": 30})
    assert (cfg.r, cfg.seed, cfg.max_steps) == (16, 3, 30)
    assert cfg.resume == str(tmp_path / "checkpoints" / "step-0000005")


def test_schedule_horizon_keeps_the_first_runs_warmup_for_a_longer_run(tmp_path):
    first = _config(tmp_path, max_steps=100, warmup_steps=0, warmup_ratio=0.1)
    assert rundir.schedule_horizon(first, None, steps_per_epoch=50) == (10, 100)
    longer = _config(tmp_path, max_steps=300, warmup_steps=0, warmup_ratio=0.1)
    assert rundir.schedule_horizon(longer, first.to_dict(), steps_per_epoch=50) == (10, 300)
    by_epochs = _config(tmp_path, max_steps=-1, epochs=2.0, warmup_steps=0, warmup_ratio=0.1)
    assert rundir.schedule_horizon(by_epochs, None, steps_per_epoch=50) == (10, 100)


@pytest.mark.parametrize("content, match", [
    ("{not json", r"unreadable trainer_state\.json"),
    (json.dumps({"global_step": 10, "log_history": [], "best_metric": None}), r"not a lorakit checkpoint's"),
    ("[" * 100_000 + "]" * 100_000, r"unreadable trainer_state\.json"),
    (b"\xff\xfe{}", r"unreadable trainer_state\.json"),
])
def test_a_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path, content, match):
    checkpoint = _save(_config(tmp_path), 2)
    path = checkpoint / ckpt.STATE_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ckpt.ResumeError, match=match) as err:
        rundir.resolve_resume(_config(tmp_path, resume=str(checkpoint)))
    assert str(checkpoint) in str(err.value)
    with pytest.raises(ckpt.ResumeError, match=match):
        ckpt.read_state(checkpoint, _config(tmp_path).to_dict())


def test_missing_or_truncated_checkpoint_files_are_named(tmp_path):
    cfg = _config(tmp_path)
    checkpoint = _save(cfg, 2)
    blob = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(blob[: len(blob) // 2])
    model, optimizer, scheduler = _parts()
    with pytest.raises(ckpt.ResumeError, match=r"cannot read optimizer\.pt"):
        ckpt.restore(checkpoint, model, "full", optimizer, scheduler)
    (checkpoint / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.ResumeError, match=r"cannot read trainable\.safetensors"):
        ckpt.restore(checkpoint, model, "full", optimizer, scheduler)
    (checkpoint / "optimizer.pt").unlink()
    with pytest.raises(ckpt.ResumeError, match=r"incomplete checkpoint, optimizer\.pt is missing"):
        rundir.resolve_resume(_config(tmp_path, resume=str(checkpoint)))
    with pytest.raises(ckpt.ResumeError, match="no such checkpoint directory"):
        rundir.resolve_resume(_config(tmp_path, resume=str(tmp_path / "nowhere")))


def test_a_good_checkpoint_restores_its_weights(tmp_path):
    checkpoint = _save(_config(tmp_path), 2)
    model, optimizer, scheduler = _parts()
    with torch.no_grad():
        model.weight.zero_()
    ckpt.restore(checkpoint, model, "full", optimizer, scheduler)
    assert torch.equal(model.weight, _parts()[0].weight)


def test_a_second_run_into_a_used_out_is_refused_before_anything_is_written(tmp_path):
    _save(_config(tmp_path), 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(tmp_path)
    used = r"already holds a run \(metrics\.jsonl, checkpoints\).*--overwrite"
    with pytest.raises(ConfigError, match=used) as err:
        rundir.prepare_out_dir(_config(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert _tree(tmp_path) == before


def test_overwrite_clears_the_previous_run_and_keeps_other_files(tmp_path):
    _save(_config(tmp_path), 2)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    out = rundir.prepare_out_dir(_config(tmp_path, overwrite=True))
    assert out == tmp_path
    assert _tree(tmp_path) == ["notes.txt"]


def test_resuming_from_outs_own_checkpoint_continues_the_run(tmp_path):
    checkpoint = _save(_config(tmp_path), 2)
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    cfg = _config(tmp_path, resume=str(checkpoint))
    rundir.prepare_out_dir(cfg, rundir.resolve_resume(cfg))
    assert (tmp_path / "metrics.jsonl").exists() and checkpoint.is_dir()
    with pytest.raises(ConfigError, match="already holds a run"):  # another run's checkpoint into a used out
        other = _save(_config(tmp_path / "other"), 2)
        rundir.prepare_out_dir(_config(tmp_path, resume=str(other)), other)


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(LorakitError, match="not a directory"):
        rundir.check_out_dir(_config(tmp_path / "out"))


def test_pruning_keeps_the_newest_and_leaves_no_temporary_directory(tmp_path):
    cfg = _config(tmp_path)
    for step in (1, 2, 3, 4):
        _save(cfg, step, keep=2)
    assert _tree(tmp_path / "checkpoints")[:2] == ["step-0000003", "step-0000003/optimizer.pt"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert [p.name for p in rundir.checkpoints(tmp_path)] == ["step-0000003", "step-0000004"]


def test_pruning_interrupted_while_deleting_leaves_no_half_checkpoint_under_its_name(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    _save(cfg, 1, keep=1)

    def crash(path, ignore_errors=False):
        (Path(path) / "optimizer.pt").unlink()  # half deleted...
        raise KeyboardInterrupt  # ...then the process is stopped

    monkeypatch.setattr(ckpt.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(cfg, 2, keep=1)
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-0000001" not in names and "step-0000002" in names
    assert any(name.startswith(".tmp-removed-step-0000001") for name in names)
    assert rundir.latest_checkpoint(tmp_path).name == "step-0000002"
    rundir.prepare_out_dir(_config(tmp_path, resume="latest"), rundir.latest_checkpoint(tmp_path))  # next start
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000002"]


def test_a_checkpoint_write_that_fails_leaves_no_temporary_directory(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    _save(cfg, 1)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        _save(cfg, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000001"]


def test_a_crashed_runs_temporary_directories_are_swept_at_the_next_start(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-0000005.x1").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".step-0000004.old").mkdir()  # earlier versions' temporary name
    (tmp_path / ".tmp-removed-adapter-12").mkdir()
    rundir.prepare_out_dir(_config(tmp_path))  # nothing complete there: not a used directory
    assert _tree(tmp_path) == ["checkpoints"]
