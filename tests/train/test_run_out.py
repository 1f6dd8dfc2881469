"""`lorakit train` and its --out directory end to end: a used --out is refused before anything is written (or
replaced with --overwrite), a bare --resume continues from the newest checkpoint with the run's own settings,
a raised --max-steps continues on the longer schedule, and bad data writes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from test_loop import lm_config

from lorakit.cli.main import main
from lorakit.train.loop import train


def _argv(cfg, *extra):
    return ["train", "--model", cfg.model, "--data", cfg.data, "--out", cfg.out, "--batch-size", "4",
            "--learning-rate", "5e-3", "--seed", "3", "--no-progress", "--logging-steps", "1", *extra]


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def test_a_used_out_is_refused_before_anything_is_written_and_overwrite_replaces_it(tmp_path, causal_lm_dir,
                                                                                     capsys):
    cfg = lm_config(tmp_path, causal_lm_dir)
    assert main(_argv(cfg, "--max-steps", "2")) == 0
    out = tmp_path / "run"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_argv(cfg, "--max-steps", "3")) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert main(_argv(cfg, "--max-steps", "3", "--overwrite")) == 0
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3]  # the new run only, not appended to the old one


def test_bare_resume_continues_from_the_newest_checkpoint_without_repeating_flags(tmp_path, causal_lm_dir):
    full = train(lm_config(tmp_path / "full", causal_lm_dir, max_steps=8, save_steps=4))
    cfg = lm_config(tmp_path, causal_lm_dir, max_steps=8, save_steps=4)
    assert main(_argv(cfg, "--max-steps", "8", "--save-steps", "4", "--lora-dropout", "0.1",
                      "--warmup-steps", "2", "--diagnostics-steps", "4")) == 0
    out = tmp_path / "run"
    # remove the later checkpoint: the run is "interrupted" after step 4
    shutil.rmtree(out / "checkpoints" / "step-0000008")
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["loss"] for x in lines if x["step"] > 4][-4:] == pytest.approx(full.losses[4:], abs=0)


def test_bad_data_writes_nothing(tmp_path, causal_lm_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "one", "completion": " two"}\n{"prompt": \n')
    out = tmp_path / "never"
    assert main(["train", "--model", str(causal_lm_dir), "--data", str(bad), "--out", str(out), "--max-steps", "2"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not out.exists()


def test_raising_max_steps_on_resume_continues_on_the_longer_schedule(tmp_path, causal_lm_dir):
    first = train(lm_config(tmp_path, causal_lm_dir, max_steps=4, save_steps=4))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000004"
    longer = train(lm_config(tmp_path, causal_lm_dir, max_steps=8, save_steps=4, resume=str(checkpoint),
                             out=str(tmp_path / "longer")))
    assert longer.losses[:4] == first.losses and len(longer.losses) == 8
