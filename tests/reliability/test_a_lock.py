"""Two writers, one directory: a second save, merge or training run into a directory another live process is
writing is refused by name (directory, lock file, owner's pid); a lock whose owner is dead is taken over; a run
that starts after a killed one leaves no temporary entry and no lock behind."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from a_kill import dead_pid, fork, kill, leftovers
from torch import nn

import lorakit
from conftest import randomize_adapters, tiny_llama
from lorakit.hf import merge_to_dir
from lorakit.io.lock import DirectoryLockedError, directory_lock, lock_path
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

RECORDS = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {(a + b) % 10}"} for a in range(4) for b in range(4)]


def _model() -> nn.Module:
    model = tiny_llama()
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    return model


def _hold_lock(directory: Path, signal_file: Path) -> int:
    """A child process that takes `directory`'s lock, says so, and keeps it."""
    def hold() -> None:
        with directory_lock(directory, purpose="test holder"):
            signal_file.write_text("held")
            time.sleep(600)

    pid = fork(hold)
    deadline = time.monotonic() + 60
    while not signal_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return pid


def _write_lock(directory: Path, pid: int, host: str | None = None) -> Path:
    path = lock_path(directory)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "process_start": None,
                                "started": "2026-12-01T00:00:00Z", "purpose": "lorakit train"}))
    return path


def test_a_second_save_into_a_directory_being_saved_is_refused_by_name(tmp_path):
    model = _model()
    out = tmp_path / "adapter"
    pid = fork(lambda: lorakit.save_adapter(model, out), "before-swap", tmp_path / "reached")  # holds the lock
    try:
        with pytest.raises(DirectoryLockedError) as caught:
            lorakit.save_adapter(model, out)
        message = str(caught.value)
        assert str(out) in message and str(lock_path(out)) in message and f"pid {pid}" in message
        assert not out.exists()  # the refused save wrote nothing
    finally:
        kill(pid)
    lorakit.save_adapter(model, out)  # the killed owner's lock is stale now: taken over
    assert (out / "adapter_config.json").is_file() and leftovers(tmp_path, out) == []


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_removed(tmp_path):
    out = tmp_path / "adapter"
    _write_lock(out, dead_pid())
    lorakit.save_adapter(_model(), out)
    assert (out / "adapter_config.json").is_file() and leftovers(tmp_path) == []


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "adapter"
    path = _write_lock(out, 1, host="elsewhere-node-7")
    with pytest.raises(DirectoryLockedError, match="elsewhere-node-7.*delete the lock file"):
        lorakit.save_adapter(_model(), out)
    assert path.is_file() and not out.exists()


def test_merge_into_a_directory_being_written_is_refused(tmp_path, causal_lm_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(causal_lm_dir)
    lorakit.attach(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    pid = _hold_lock(out, tmp_path / "held")
    try:
        with pytest.raises(DirectoryLockedError, match=f"pid {pid}"):
            merge_to_dir(causal_lm_dir, tmp_path / "adapter", out)
    finally:
        kill(pid)
    assert not out.exists()


def _train_config(tmp_path: Path, causal_lm_dir: Path, out: Path, **values) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    return TrainConfig(model=str(causal_lm_dir), data=str(data), out=str(out), per_device_train_batch_size=4,
                       learning_rate=5e-3, progress=False, seed=3, **values)


def test_a_second_training_run_into_a_locked_out_is_refused(tmp_path, causal_lm_dir):
    out = tmp_path / "run"
    pid = _hold_lock(out, tmp_path / "held")
    try:
        with pytest.raises(DirectoryLockedError) as caught:
            train(_train_config(tmp_path, causal_lm_dir, out, max_steps=2))
        assert f"pid {pid}" in str(caught.value) and str(lock_path(out)) in str(caught.value)
        assert not out.exists()
    finally:
        kill(pid)


def test_a_run_after_a_killed_one_takes_its_lock_and_leaves_nothing_temporary(tmp_path, causal_lm_dir):
    out = tmp_path / "run"
    gone = dead_pid()
    _write_lock(out, gone)
    (out / "checkpoints" / f".step-0000001.lorakit-tmp-{gone}-0123abcd").mkdir(parents=True)  # killed mid-write
    (out / f".adapter.lorakit-tmp-{gone}-0123abcd").mkdir()
    (out / "checkpoints" / ".tmp-removed-step-0000000-0123abcd").mkdir()  # killed mid-prune
    result = train(_train_config(tmp_path, causal_lm_dir, out, max_steps=3, save_steps=1, save_total_limit=1))
    assert (result.saved_dir / "adapter_config.json").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000003"]
    assert leftovers(tmp_path, out, out / "checkpoints", out / "checkpoints" / "step-0000003") == []


def test_another_thread_of_the_same_process_is_refused_and_the_owner_re_enters(tmp_path):
    errors: list[BaseException] = []
    with directory_lock(tmp_path / "d", purpose="test"):
        with directory_lock(tmp_path / "d", purpose="test again"):  # re-entrant for the owning thread
            pass
        assert lock_path(tmp_path / "d").is_file()

        def other() -> None:
            try:
                with directory_lock(tmp_path / "d", purpose="thread"):
                    pass
            except DirectoryLockedError as err:
                errors.append(err)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    assert not lock_path(tmp_path / "d").exists() and os.listdir(tmp_path) == []
